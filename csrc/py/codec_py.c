/* codec_py.c: _core.Codec, a built-in C codec configured from Python.
 *
 * Codec(kind, wire_dtype="", per_channel=False, axis=0, algorithm=0, level=0, inner=None)
 *   kind: an sl_codec_kind number (the Python classes in splitlearn_comm.codecs pick it);
 *   inner: None or the inner codec's own argument tuple (kind, wire_dtype, ...)
 *   .name: the wire name
 *   .accepts(dtype_name) -> bool
 *   .encode(tensor) -> (payload DLPackTensor, metadata dict)     (GIL released)
 * decode(name, payload, shape, dtype, metadata) -> DLPackTensor    (GIL released)
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
