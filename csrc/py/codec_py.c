/* codec_py.c: _core.Codec, a built-in C codec configured from Python.
 *
 * Codec(kind, wire_dtype="", per_channel=False, axis=0, algorithm=0, level=0, inner=None)
 *   kind: an sl_codec_kind number (the Python classes in splitlearn_comm.codecs pick it);
 *   inner: None or the inner codec's own argument tuple (kind, wire_dtype, ...)
 *   .name: the wire name
 *   .accepts(dtype_name) -> bool
 *   .encode(tensor) -> (payload DLPackTensor, metadata dict)     (GIL released)
 * decode(name, payload, shape, dtype, metadata) -> DLPackTensor    (GIL released)
 * python_codec(codec, name, accepts, wrap, prepare) -> Codec: a Python TensorCodec
 *   in the core's codec table, through the trampolines below
 * Codecs(codecs): the custom codecs one side decodes (sl_codecs)
 */
#include "slpy.h"

typedef struct codec_obj {
  PyObject_HEAD
  sl_codec *codec;
  PyObject *inner; /* strong: the inner codec's argument tuple, or None */
} codec_obj;

const sl_codec *slpy_codec_of(slpy_state *st, PyObject *obj, int *error) {
  *error = 0;
  if (obj == NULL || obj == Py_None) return NULL;
  if (!PyObject_TypeCheck(obj, st->codec_type)) {
    PyErr_Format(PyExc_TypeError, "expected a _core.Codec, got %.100s", Py_TYPE(obj)->tp_name);
    *error = 1;
    return NULL;
  }
  return ((codec_obj *)obj)->codec;
}

static int dtype_arg(const char *name, sl_dtype *out) {
  if (name == NULL || name[0] == '\0') {
    *out = SL_DTYPE_INVALID;
    return 0;
  }
  if (sl_dtype_from_name(name, strlen(name), out) != SL_OK) {
    PyErr_Format(PyExc_ValueError, "unknown dtype '%s'", name);
    return -1;
  }
  return 0;
}

/* Fill a spec from (kind, wire_dtype, per_channel, axis, algorithm, level). */
static int spec_from_args(PyObject *args, PyObject *kwargs, sl_codec_spec *spec,
                          PyObject **inner) {
  static char *kwlist[] = {"kind", "wire_dtype", "per_channel", "axis", "algorithm", "level",
                           "inner", NULL};
  int kind, per_channel = 0, axis = 0, algorithm = 0, level = 0;
  const char *wire_dtype = "";
  memset(spec, 0, sizeof(*spec));
  *inner = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|spiiiO", kwlist, &kind, &wire_dtype,
                                   &per_channel, &axis, &algorithm, &level, inner)) {
    return -1;
  }
  spec->kind = (sl_codec_kind)kind;
  if (dtype_arg(wire_dtype, &spec->wire_dtype) < 0) return -1;
  spec->per_channel = per_channel;
  spec->axis = axis;
  spec->algorithm = (sl_compression)algorithm;
  spec->level = level;
  return 0;
}

static int codec_init(codec_obj *self, PyObject *args, PyObject *kwargs) {
  sl_codec_spec spec, inner_spec;
  PyObject *inner = Py_None, *unused;
  sl_err e;

  if (self->codec != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Codec.__init__ called twice");
    return -1;
  }
  if (spec_from_args(args, kwargs, &spec, &inner) < 0) return -1;
  if (inner != Py_None) {
    /* the inner codec as its own argument tuple (kind, wire_dtype, ...) */
    if (!PyTuple_Check(inner)) {
      PyErr_SetString(PyExc_TypeError, "inner must be a tuple of Codec arguments or None");
      return -1;
    }
    if (spec_from_args(inner, NULL, &inner_spec, &unused) < 0) return -1;
    spec.inner = &inner_spec;
  }
  sl_err_clear(&e);
  if (sl_codec_create(&spec, &self->codec, &e) != SL_OK) {
    PyErr_SetString(PyExc_ValueError, e.msg);
    return -1;
  }
  Py_XSETREF(self->inner, Py_NewRef(inner));
  return 0;
}

static PyObject *codec_get_name(codec_obj *self, void *closure) {
  (void)closure;
  return PyUnicode_FromString(self->codec ? sl_codec_name(self->codec) : "");
}

static PyObject *codec_accepts(codec_obj *self, PyObject *arg) {
  sl_dtype dt;
  const char *name = PyUnicode_AsUTF8(arg);
  if (name == NULL) return NULL;
  if (sl_dtype_from_name(name, strlen(name), &dt) != SL_OK) Py_RETURN_FALSE;
  return PyBool_FromLong(self->codec && sl_codec_accepts(self->codec, dt));
}

static PyObject *codec_encode(codec_obj *self, PyObject *arg) {
  slpy_state *st = slpy_state_of_type(Py_TYPE(self));
  slpy_export ex;
  void *payload = NULL;
  size_t len = 0;
  sl_meta meta = {NULL, 0};
  sl_err e;
  int rc;
  PyObject *holder = NULL, *md = NULL, *result = NULL;
  sl_tensor_desc pd;

  if (st == NULL || slpy_export_tensor(arg, &ex) < 0) return NULL;
  sl_err_clear(&e);
  Py_BEGIN_ALLOW_THREADS
  rc = sl_codec_encode(self->codec, &ex.desc, ex.data, ex.nbytes, &payload, &len, &meta, &e);
  slpy_export_release(ex.dlm);
  Py_END_ALLOW_THREADS
  if (rc != SL_OK) {
    PyErr_SetString(e.code == SL_STATUS_RESOURCE_EXHAUSTED ? PyExc_MemoryError : PyExc_ValueError,
                    e.msg);
    goto cleanup;
  }
  pd.dtype = SL_DTYPE_UINT8;
  pd.ndim = 1;
  pd.shape[0] = (int64_t)len;
  holder = slpy_holder_new(st, payload, &pd);
  payload = NULL;
  if (holder == NULL) goto cleanup;
  md = slpy_meta_to_dict(&meta);
  if (md == NULL) goto cleanup;
  result = PyTuple_Pack(2, holder, md);
cleanup:
  Py_XDECREF(holder);
  Py_XDECREF(md);
  sl_storage_free(payload);
  sl_meta_clear(&meta);
  return result;
}

static int codec_traverse(codec_obj *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(self->inner);
  return 0;
}

static int codec_clear(codec_obj *self) {
  Py_CLEAR(self->inner);
  return 0;
}

static void codec_dealloc(codec_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  sl_codec_destroy(self->codec);
  self->codec = NULL;
  Py_CLEAR(self->inner);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static PyMethodDef codec_methods[] = {
    {"accepts", (PyCFunction)codec_accepts, METH_O, "accepts(dtype_name) -> bool"},
    {"encode", (PyCFunction)codec_encode, METH_O,
     "encode(tensor) -> (payload, metadata): run the codec in C without the GIL."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef codec_getset[] = {
    {"name", (getter)codec_get_name, NULL, "The codec's wire name.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot codec_slots[] = {
    {Py_tp_init, codec_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, codec_dealloc},
    {Py_tp_traverse, codec_traverse},
    {Py_tp_clear, codec_clear},
    {Py_tp_methods, codec_methods},
    {Py_tp_getset, codec_getset},
    {Py_tp_doc, "A built-in C codec (internal; use the classes in splitlearn_comm.codecs)."},
    {0, NULL}};

PyType_Spec slpy_codec_spec = {
    .name = "splitlearn_comm._core.Codec",
    .basicsize = sizeof(codec_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = codec_slots,
};

/* ---- Python codecs in the core's codec table (trampolines) ----
 *
 * A TensorCodec subclass written in Python becomes an sl_codec whose functions
 * are the trampolines below and whose `user` is a pycodec: the core encodes and
 * decodes its tensors like any other codec's, on whatever thread it runs (a
 * server worker, the client's calling thread with the GIL released, the async
 * client's completion thread). Each trampoline that runs Python is called
 * without the GIL: it takes it on its first line, has one exit that gives it
 * back, and turns a Python exception into SL_ECODEC with "codec 'name':
 * encode() raised Type: message" (never a pending exception). `accepts` and the
 * bound need no Python: the dtypes a codec takes are asked once, at creation.
 *
 * Memory: encode() is given a tensor over a copy of the caller's bytes (the codec
 * may keep it; the caller's own tensor is released when the core is done with
 * it, not when Python is); what it returns is copied into sl_storage before the
 * GIL is given back. decode() is given a memoryview of a DLPackTensor that owns
 * the payload; the tensor it returns is copied into sl_storage.
 *
 * No reference cycle runs through here: a pycodec holds the TensorCodec, the
 * TensorCodec does not hold its _core.Codec (the codec registry does). */

typedef struct pycodec {
  PyObject *codec;   /* strong: the TensorCodec */
  PyObject *wrap;    /* strong: DLPackTensor -> the tensor encode() is given */
  PyObject *prepare; /* strong: decode()'s result -> something slpy_export_tensor takes */
  PyObject *module;  /* strong: _core (the DLPackTensor type is in its state) */
  unsigned accepts;  /* bit d: takes sl_dtype d */
  char name[256];
} pycodec;

static int pycodec_fail(sl_err *err, const pycodec *pc, const char *what) {
  char msg[400];
  PyObject *type = NULL, *value = NULL, *tb = NULL;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (value != NULL) {
    slpy_format_exception(value, msg, sizeof(msg));
  } else {
    snprintf(msg, sizeof(msg), "failed");
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  PyErr_Clear();
  return sl_err_set(err, SL_ECODEC, SL_STATUS_INVALID_ARGUMENT, "codec '%s': %s %s", pc->name,
                    what, msg);
}

static int pycodec_accepts(void *user, sl_dtype dtype) {
  const pycodec *pc = user;
  return (pc->accepts >> (unsigned)dtype) & 1u;
}

/* numel(wire) x max(itemsize, 8): a Python decoder may widen the dtype (e.g. a
 * float16 tensor quantized on the wire and decoded to float32), not the count. */
static int pycodec_bound(void *user, const sl_tensor_desc *wire, const sl_meta *meta,
                         size_t *bound, sl_err *err) {
  const pycodec *pc = user;
  size_t n = 1, size = sl_dtype_itemsize(wire->dtype);
  (void)meta;
  if (size < 8) size = 8;
  for (int i = 0; i < wire->ndim; i++) {
    if (wire->shape[i] < 0 || __builtin_mul_overflow(n, (size_t)wire->shape[i], &n)) {
      return sl_err_set(err, SL_ECODEC, SL_STATUS_INVALID_ARGUMENT,
                        "codec '%s': the payload declares an invalid shape", pc->name);
    }
  }
  if (__builtin_mul_overflow(n, size, bound)) *bound = SIZE_MAX;
  return SL_OK;
}

static int shape_from_python(PyObject *shape, sl_tensor_desc *desc) {
  PyObject *seq = PySequence_Fast(shape, "the shape encode() returns must be a sequence of ints");
  int status = -1;
  if (seq == NULL) return -1;
  if (PySequence_Fast_GET_SIZE(seq) > SL_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "the shape encode() returns has more than %d dimensions",
                 SL_MAX_NDIM);
    goto cleanup;
  }
  desc->ndim = (int)PySequence_Fast_GET_SIZE(seq);
  for (int i = 0; i < desc->ndim; i++) {
    long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (v == -1 && PyErr_Occurred()) goto cleanup;
    if (v < 0 || v > INT32_MAX) {
      PyErr_Format(PyExc_ValueError, "dimension %d (%lld) of the shape encode() returns is out "
                   "of range", i, v);
      goto cleanup;
    }
    desc->shape[i] = v;
  }
  status = 0;
cleanup:
  Py_DECREF(seq);
  return status;
}

/* Called without the GIL. */
static int pycodec_encode(void *user, const sl_tensor_desc *desc, const void *data, size_t nbytes,
                          sl_tensor_desc *wire, void **payload, size_t *payload_len,
                          sl_meta *meta, sl_err *err) {
  pycodec *pc = user;
  PyGILState_STATE g;
  int status = -1, have_view = 0;
  void *copy = NULL, *out = NULL;
  PyObject *holder = NULL, *tensor = NULL, *res = NULL, *md = Py_None;
  Py_buffer view;
  Py_ssize_t arity = 0;
  slpy_state *st;

  if (slpy_is_finalizing()) {
    return sl_err_set(err, SL_ECODEC, SL_STATUS_UNAVAILABLE,
                      "codec '%s': the interpreter is shutting down", pc->name);
  }
  g = PyGILState_Ensure();
  st = slpy_state_of_module(pc->module);
  if (st == NULL) goto python_error;
  if (sl_storage_alloc(nbytes, &copy) != SL_OK) {
    PyErr_NoMemory();
    goto python_error;
  }
  if (nbytes > 0) memcpy(copy, data, nbytes);
  holder = slpy_holder_new(st, copy, desc);
  copy = NULL; /* the holder's, even on failure */
  if (holder == NULL) goto python_error;
  tensor = PyObject_CallOneArg(pc->wrap, holder);
  if (tensor == NULL) goto python_error;
  res = PyObject_CallMethod(pc->codec, "encode", "O", tensor);
  if (res == NULL) goto python_error;
  if (!PyTuple_Check(res) || (PyTuple_GET_SIZE(res) != 2 && PyTuple_GET_SIZE(res) != 3)) {
    PyErr_Format(PyExc_TypeError, "encode() must return (data, shape) or (data, shape, "
                 "metadata), got %.100s", Py_TYPE(res)->tp_name);
    goto python_error;
  }
  arity = PyTuple_GET_SIZE(res);
  *wire = *desc; /* the original dtype; the shape encode() chose */
  if (shape_from_python(PyTuple_GET_ITEM(res, 1), wire) < 0) goto python_error;
  if (arity == 3) md = PyTuple_GET_ITEM(res, 2);
  if (md != Py_None && !PyDict_Check(md)) {
    PyErr_Format(PyExc_TypeError, "the metadata encode() returns must be a dict, got %.100s",
                 Py_TYPE(md)->tp_name);
    goto python_error;
  }
  if (slpy_meta_from_dict(md, meta) < 0) goto python_error;
  if (sl_meta_add_int(meta, "sl.arity", (int64_t)arity) != SL_OK) {
    PyErr_NoMemory();
    goto python_error;
  }
  if (PyObject_GetBuffer(PyTuple_GET_ITEM(res, 0), &view, PyBUF_SIMPLE) < 0) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "the data encode() returns must be bytes or another "
                 "contiguous buffer, got %.100s", Py_TYPE(PyTuple_GET_ITEM(res, 0))->tp_name);
    goto python_error;
  }
  have_view = 1;
  if (sl_storage_alloc((size_t)view.len, &out) != SL_OK) {
    PyErr_NoMemory();
    goto python_error;
  }
  if (view.len > 0) memcpy(out, view.buf, (size_t)view.len);
  *payload = out;
  *payload_len = (size_t)view.len;
  out = NULL;
  status = SL_OK;
  goto cleanup;
python_error:
  status = pycodec_fail(err, pc, "encode() raised");
  err->code = SL_STATUS_INTERNAL; /* the sender's own codec failed */
  sl_meta_clear(meta);
cleanup:
  if (have_view) PyBuffer_Release(&view);
  sl_storage_free(out);
  Py_XDECREF(res);
  Py_XDECREF(tensor);
  Py_XDECREF(holder);
  PyGILState_Release(g);
  return status;
}

/* Called without the GIL. */
static int pycodec_decode(void *user, const sl_tensor_desc *wire, void *payload,
                          size_t payload_len, const sl_meta *meta, sl_tensor_desc *out_desc,
                          void **out, size_t *out_len, sl_err *err) {
  pycodec *pc = user;
  PyGILState_STATE g;
  int status = -1, exported = 0;
  PyObject *holder = NULL, *view = NULL, *shape = NULL, *md = NULL, *arity = NULL;
  PyObject *res = NULL, *ready = NULL;
  slpy_export ex;
  sl_tensor_desc pd;
  size_t bound = 0;
  void *buf = NULL;
  slpy_state *st;

  if (slpy_is_finalizing()) {
    sl_storage_free(payload);
    return sl_err_set(err, SL_ECODEC, SL_STATUS_UNAVAILABLE,
                      "codec '%s': the interpreter is shutting down", pc->name);
  }
  if (pycodec_bound(user, wire, meta, &bound, err) != SL_OK) {
    sl_storage_free(payload);
    return SL_ECODEC;
  }
  g = PyGILState_Ensure();
  st = slpy_state_of_module(pc->module);
  if (st == NULL) {
    sl_storage_free(payload);
    goto python_error;
  }
  pd.dtype = SL_DTYPE_UINT8;
  pd.ndim = 1;
  pd.shape[0] = (int64_t)payload_len;
  holder = slpy_holder_new(st, payload, &pd); /* takes the payload, even on failure */
  if (holder == NULL) goto python_error;
  view = PyMemoryView_FromObject(holder);
  shape = slpy_shape_tuple(wire);
  md = slpy_meta_to_dict(meta);
  if (view == NULL || shape == NULL || md == NULL) goto python_error;
  arity = PyDict_GetItemString(md, "sl.arity"); /* borrowed */
  if (arity != NULL && PyLong_Check(arity) && PyLong_AsLong(arity) == 2) {
    Py_INCREF(arity);
    if (PyDict_DelItemString(md, "sl.arity") < 0) goto python_error;
    Py_DECREF(arity);
    res = PyObject_CallMethod(pc->codec, "decode", "OO", view, shape);
  } else {
    if (arity != NULL && PyDict_DelItemString(md, "sl.arity") < 0) goto python_error;
    res = PyObject_CallMethod(pc->codec, "decode", "OOO", view, shape, md);
  }
  arity = NULL;
  if (res == NULL) goto python_error;
  ready = PyObject_CallOneArg(pc->prepare, res);
  if (ready == NULL) goto python_error;
  if (slpy_export_tensor(ready, &ex) < 0) goto python_error;
  exported = 1;
  if (ex.nbytes > bound) {
    sl_err_set(err, SL_ECODEC, SL_STATUS_INVALID_ARGUMENT,
               "codec '%s': decode() returned %zu bytes, more than the %zu bytes a payload of "
               "this shape may decode to (8 per element, or the dtype's size when larger)",
               pc->name, ex.nbytes, bound);
    status = SL_ECODEC;
    goto cleanup;
  }
  if (sl_storage_alloc(ex.nbytes, &buf) != SL_OK) {
    PyErr_NoMemory();
    goto python_error;
  }
  if (ex.nbytes > 0) memcpy(buf, ex.data, ex.nbytes);
  *out_desc = ex.desc;
  *out = buf;
  *out_len = ex.nbytes;
  buf = NULL;
  status = SL_OK;
  goto cleanup;
python_error:
  status = pycodec_fail(err, pc, "decode() raised");
cleanup:
  if (exported) slpy_export_release(ex.dlm);
  sl_storage_free(buf);
  Py_XDECREF(ready);
  Py_XDECREF(res);
  Py_XDECREF(md);
  Py_XDECREF(shape);
  if (view != NULL) {
    PyObject *r = PyObject_CallMethod(view, "release", NULL);
    if (r == NULL) PyErr_Clear(); /* a decoder kept a slice of the view: the holder stays */
    Py_XDECREF(r);
    Py_DECREF(view);
  }
  Py_XDECREF(holder);
  PyGILState_Release(g);
  return status;
}

/* Called without the GIL, when the codec's last reference goes. */
static void pycodec_free(void *user) {
  pycodec *pc = user;
  PyGILState_STATE g;
  if (pc == NULL) return;
  if (slpy_is_finalizing()) return; /* the interpreter is going: leave the objects to it */
  g = PyGILState_Ensure();
  Py_XDECREF(pc->codec);
  Py_XDECREF(pc->wrap);
  Py_XDECREF(pc->prepare);
  Py_XDECREF(pc->module);
  PyMem_RawFree(pc);
  PyGILState_Release(g);
}

static const sl_codec_funcs pycodec_funcs = {pycodec_accepts, pycodec_encode, pycodec_bound,
                                             pycodec_decode, pycodec_free};

/* python_codec(codec, name, accepts, wrap, prepare) -> Codec: a Python codec in
 * the core's codec table. `accepts`: the dtype names it takes. */
PyObject *slpy_python_codec(PyObject *module, PyObject *args) {
  slpy_state *st = slpy_state_of_module(module);
  PyObject *codec, *accepts, *wrap, *prepare, *seq = NULL;
  const char *name;
  pycodec *pc = NULL;
  codec_obj *obj = NULL;
  sl_codec *c = NULL;
  sl_err e;

  if (st == NULL || !PyArg_ParseTuple(args, "OsOOO", &codec, &name, &accepts, &wrap, &prepare)) {
    return NULL;
  }
  if (!PyCallable_Check(wrap) || !PyCallable_Check(prepare)) {
    PyErr_SetString(PyExc_TypeError, "wrap and prepare must be callable");
    return NULL;
  }
  if (strlen(name) >= sizeof(pc->name)) {
    PyErr_SetString(PyExc_ValueError, "a codec's name has at most 255 bytes");
    return NULL;
  }
  seq = PySequence_Fast(accepts, "accepts must be a sequence of dtype names");
  if (seq == NULL) return NULL;
  pc = PyMem_RawCalloc(1, sizeof(*pc));
  if (pc == NULL) {
    Py_DECREF(seq);
    return PyErr_NoMemory();
  }
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
    sl_dtype dt;
    const char *d = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
    if (d == NULL) goto fail;
    if (sl_dtype_from_name(d, strlen(d), &dt) == SL_OK && dt > 0 && (unsigned)dt < 32) {
      pc->accepts |= 1u << (unsigned)dt;
    }
  }
  Py_CLEAR(seq);
  strcpy(pc->name, name);
  pc->codec = Py_NewRef(codec);
  pc->wrap = Py_NewRef(wrap);
  pc->prepare = Py_NewRef(prepare);
  pc->module = Py_NewRef(module);
  obj = (codec_obj *)PyType_GenericAlloc(st->codec_type, 0);
  if (obj == NULL) goto fail;
  obj->inner = Py_NewRef(Py_None);
  sl_err_clear(&e);
  /* takes pc: freed by pycodec_free on failure too (with the GIL, held here) */
  if (sl_codec_create_custom(name, &pycodec_funcs, pc, &c, &e) != SL_OK) {
    pc = NULL;
    PyErr_SetString(PyExc_ValueError, e.msg);
    Py_DECREF(obj);
    return NULL;
  }
  obj->codec = c;
  return (PyObject *)obj;
fail:
  Py_XDECREF(seq);
  if (pc != NULL) {
    Py_XDECREF(pc->codec);
    Py_XDECREF(pc->wrap);
    Py_XDECREF(pc->prepare);
    Py_XDECREF(pc->module);
    PyMem_RawFree(pc);
  }
  Py_XDECREF(obj);
  return NULL;
}

/* ---- _core.Codecs: the custom codecs one side knows (an sl_codecs) ---- */

typedef struct codecs_obj {
  PyObject_HEAD
  sl_codecs *codecs;
} codecs_obj;

static int codecs_init(codecs_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"codecs", NULL};
  slpy_state *st = slpy_state_of_type(Py_TYPE(self));
  PyObject *list, *seq;
  sl_codec **cs = NULL;
  sl_codecs *made = NULL;
  Py_ssize_t n;
  sl_err e;
  int status = -1;
  if (st == NULL || !PyArg_ParseTupleAndKeywords(args, kwargs, "O", kwlist, &list)) return -1;
  seq = PySequence_Fast(list, "codecs must be a sequence of _core.Codec");
  if (seq == NULL) return -1;
  n = PySequence_Fast_GET_SIZE(seq);
  cs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*cs));
  if (cs == NULL) {
    PyErr_NoMemory();
    goto cleanup;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    int cerr = 0;
    cs[i] = (sl_codec *)slpy_codec_of(st, PySequence_Fast_GET_ITEM(seq, i), &cerr);
    if (cerr) goto cleanup;
    if (cs[i] == NULL) {
      PyErr_SetString(PyExc_TypeError, "codecs must be _core.Codec objects, not None");
      goto cleanup;
    }
  }
  sl_err_clear(&e);
  if (sl_codecs_create(cs, (size_t)n, &made, &e) != SL_OK) {
    PyErr_SetString(PyExc_ValueError, e.msg);
    goto cleanup;
  }
  sl_codecs_unref(self->codecs);
  self->codecs = made;
  status = 0;
cleanup:
  PyMem_Free(cs);
  Py_DECREF(seq);
  return status;
}

static void codecs_dealloc(codecs_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  sl_codecs_unref(self->codecs); /* the last Python codec's trampoline takes the GIL (held) */
  self->codecs = NULL;
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static PyObject *codecs_get_names(codecs_obj *self, void *closure) {
  (void)closure;
  return PyUnicode_FromString(sl_codecs_names(self->codecs));
}

static PyGetSetDef codecs_getset[] = {
    {"names", (getter)codecs_get_names, NULL,
     "Every codec this set decodes: the built-ins, then its own (one string).", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot codecs_slots[] = {
    {Py_tp_init, codecs_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, codecs_dealloc},
    {Py_tp_getset, codecs_getset},
    {Py_tp_doc, "The custom codecs one side decodes (internal; see CodecRegistry)."},
    {0, NULL}};

PyType_Spec slpy_codecs_spec = {
    .name = "splitlearn_comm._core.Codecs",
    .basicsize = sizeof(codecs_obj),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = codecs_slots,
};

sl_codecs *slpy_codecs_of(slpy_state *st, PyObject *obj, int *error) {
  *error = 0;
  if (obj == NULL || obj == Py_None) return NULL;
  if (!PyObject_TypeCheck(obj, st->codecs_type)) {
    PyErr_Format(PyExc_TypeError, "expected a _core.Codecs, got %.100s", Py_TYPE(obj)->tp_name);
    *error = 1;
    return NULL;
  }
  return ((codecs_obj *)obj)->codecs;
}

/* decode(name, payload, shape, dtype, metadata) -> DLPackTensor: a built-in
 * codec's decoder, GIL released (benchmarks and tests). */
PyObject *slpy_codec_decode(PyObject *module, PyObject *args) {
  slpy_state *st = slpy_state_of_module(module);
  const char *name, *dtype;
  PyObject *payload, *shape, *metadata, *seq = NULL, *result = NULL;
  Py_buffer view;
  sl_tensor_desc desc;
  sl_meta meta = {NULL, 0};
  void *out = NULL;
  sl_err e;
  int rc, have_view = 0;

  if (!PyArg_ParseTuple(args, "sOOsO", &name, &payload, &shape, &dtype, &metadata)) return NULL;
  memset(&desc, 0, sizeof(desc));
  if (dtype_arg(dtype, &desc.dtype) < 0) return NULL;
  seq = PySequence_Fast(shape, "shape must be a sequence of ints");
  if (seq == NULL) return NULL;
  if (PySequence_Fast_GET_SIZE(seq) > SL_MAX_NDIM) {
    PyErr_SetString(PyExc_ValueError, "too many dimensions");
    goto cleanup;
  }
  desc.ndim = (int)PySequence_Fast_GET_SIZE(seq);
  for (int i = 0; i < desc.ndim; i++) {
    desc.shape[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (desc.shape[i] == -1 && PyErr_Occurred()) goto cleanup;
  }
  if (slpy_meta_from_dict(metadata, &meta) < 0) goto cleanup;
  if (PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE) < 0) goto cleanup;
  have_view = 1;
  sl_err_clear(&e);
  Py_BEGIN_ALLOW_THREADS
  rc = sl_codec_decode(name, &desc, view.buf, (size_t)view.len, &meta, &out, &e);
  Py_END_ALLOW_THREADS
  if (rc != SL_OK) {
    PyErr_SetString(PyExc_ValueError, e.msg);
    goto cleanup;
  }
  result = slpy_holder_new(st, out, &desc);
  out = NULL;
cleanup:
  if (have_view) PyBuffer_Release(&view);
  sl_storage_free(out);
  sl_meta_clear(&meta);
  Py_XDECREF(seq);
  return result;
}
