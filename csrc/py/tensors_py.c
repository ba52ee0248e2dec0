/* tensors_py.c: the tensors of a call across the binding, as typed objects.
 *
 * C to Python: every received tensor, decoded by the core, becomes a _core.Leaf
 * (name, tensor, shape, dtype); the structure becomes a list of
 * (kind, size, key, value) node tuples in pre-order (kinds as sl_node_kind). A
 * client call returns a _core.Reply, the server's compute callback receives a
 * _core.Call. All three are struct sequences: named fields, read by name.
 *
 * Python to C: a list of _core.OutTensor (name, tensor, codec) and the nodes
 * become an sl_tensor_set whose arrays and strings live in one slpy_setbuf.
 *
 * Ownership rule (as everywhere in csrc/): a function that fails leaves what it
 * was given with the caller and raises; what it had taken itself is released.
 */
#include "slpy.h"

static PyStructSequence_Field leaf_fields[] = {
    {"name", "the tensor's name: its path in the structure (\"\" for a single tensor)"},
    {"tensor", "a DLPackTensor: the tensor, decoded by the core whatever its codec"},
    {"shape", "the tensor's shape (tuple)"},
    {"dtype", "the tensor's dtype name"},
    {NULL, NULL}};

static PyStructSequence_Desc leaf_desc = {"splitlearn_comm._core.Leaf",
                                          "A received tensor (internal).", leaf_fields, 4};

static PyStructSequence_Field out_fields[] = {
    {"name", "the tensor's name (str)"},
    {"tensor", "anything with __dlpack__, or an already-encoded message tensor (data, shape, "
               "dtype, codec, metadata) as ComputeServiceStub sends it"},
    {"codec", "a _core.Codec the core encodes it with (built in or Python), or None (the "
              "peer's choice, or raw)"},
    {NULL, NULL}};

static PyStructSequence_Desc out_desc = {"splitlearn_comm._core.OutTensor",
                                         "A tensor to send (internal).", out_fields, 3};

static PyStructSequence_Field reply_fields[] = {
    {"form", "0 single tensor, 1 map by name, 2 structure"},
    {"leaves", "list of Leaf"},
    {"nodes", "the structure: list of (kind, size, key, value), or None"},
    {"n_kv", "single form: KV cache entries after the tensor (leaves[1 + 2i], [2 + 2i])"},
    {"compute_time_ms", "the server's compute time, or None"},
    {"request_id", "the response's request_id, or None"},
    {"attempts", "attempts made"},
    {"initial_metadata", "the response's initial metadata"},
    {"bytes_sent", "message bytes sent, all attempts"},
    {"bytes_received", "message bytes received"},
    {NULL, NULL}};

static PyStructSequence_Desc reply_desc = {"splitlearn_comm._core.Reply",
                                           "The result of Client.compute (internal).",
                                           reply_fields, 10};

static PyStructSequence_Field call_fields[] = {
    {"form", "0 single tensor, 1 map by name, 2 structure"},
    {"leaves", "list of Leaf"},
    {"nodes", "the structure: list of (kind, size, key, value), or None"},
    {"n_kv", "single form: KV cache entries after the tensor"},
    {"backward", "True for ComputeBackward"},
    {"method", "the full method path"},
    {"peer", "the client's address"},
    {"metadata", "invocation metadata"},
    {"request_metadata", "the request message's metadata map (dict)"},
    {"deadline", "sl_now()-clock deadline, or None"},
    {"request_id", "the request's request_id, or None"},
    {"state", "the CallState (liveness)"},
    {"fields", "the training fields (dict)"},
    {"use_cache", "ComputeRequest.use_cache: None, False or True"},
    {NULL, NULL}};

static PyStructSequence_Desc call_desc = {"splitlearn_comm._core.Call",
                                          "A call for the compute callback (internal).",
                                          call_fields, 14};

int slpy_tensor_types_init(slpy_state *st, PyObject *module) {
  st->leaf_type = PyStructSequence_NewType(&leaf_desc);
  st->out_type = PyStructSequence_NewType(&out_desc);
  st->reply_type = PyStructSequence_NewType(&reply_desc);
  st->call_type = PyStructSequence_NewType(&call_desc);
  if (st->leaf_type == NULL || st->out_type == NULL || st->reply_type == NULL ||
      st->call_type == NULL) {
    return -1;
  }
  if (PyModule_AddObjectRef(module, "Leaf", (PyObject *)st->leaf_type) < 0) return -1;
  if (PyModule_AddObjectRef(module, "OutTensor", (PyObject *)st->out_type) < 0) return -1;
  if (PyModule_AddObjectRef(module, "Reply", (PyObject *)st->reply_type) < 0) return -1;
  if (PyModule_AddObjectRef(module, "Call", (PyObject *)st->call_type) < 0) return -1;
  return 0;
}

/* ---- C to Python ---- */

/* A Leaf for `it` (decoded by the core), taking its data (it->data is NULL
 * afterwards, even on failure). */
static PyObject *leaf_new(slpy_state *st, sl_tensor_item *it) {
  PyObject *leaf = NULL, *holder, *name = NULL, *shape = NULL, *dtype = NULL;
  void *data, *owner;
  void (*release)(void *);
  sl_tensor_item_take(it, &data, &release, &owner);
  /* the holder owns it now (let go of even on failure) */
  holder = slpy_holder_new_lent(st, data, &it->desc, release, owner);
  if (holder == NULL) return NULL;
  name = PyUnicode_FromString(it->name ? it->name : "");
  shape = slpy_shape_tuple(&it->desc);
  dtype = PyUnicode_FromString(sl_dtype_name(it->desc.dtype));
  leaf = PyStructSequence_New(st->leaf_type);
  if (name == NULL || shape == NULL || dtype == NULL || leaf == NULL) {
    Py_XDECREF(leaf);
    Py_XDECREF(name);
    Py_XDECREF(holder);
    Py_XDECREF(shape);
    Py_XDECREF(dtype);
    return NULL;
  }
  PyStructSequence_SetItem(leaf, 0, name);
  PyStructSequence_SetItem(leaf, 1, holder);
  PyStructSequence_SetItem(leaf, 2, shape);
  PyStructSequence_SetItem(leaf, 3, dtype);
  return leaf; /* the items were stolen */
}

static PyObject *node_tuple(const sl_node *nd) {
  PyObject *value;
  switch (nd->kind) {
    case SL_NODE_INT: value = PyLong_FromLongLong(nd->i); break;
    case SL_NODE_BOOL: value = PyBool_FromLong(nd->i != 0); break;
    case SL_NODE_FLOAT: value = PyFloat_FromDouble(nd->d); break;
    case SL_NODE_STRING: value = PyUnicode_FromString(nd->s ? nd->s : ""); break;
    default: value = Py_NewRef(Py_None); break;
  }
  if (value == NULL) return NULL;
  return Py_BuildValue("(iIsN)", nd->kind, (unsigned)nd->size, nd->key ? nd->key : "", value);
}

int slpy_msg_to_python(slpy_state *st, sl_tensor_msg *m, PyObject **leaves, PyObject **nodes) {
  *leaves = PyList_New((Py_ssize_t)m->n_items);
  *nodes = NULL;
  if (*leaves == NULL) return -1;
  for (size_t i = 0; i < m->n_items; i++) {
    PyObject *leaf = leaf_new(st, &m->items[i]);
    if (leaf == NULL) goto fail;
    PyList_SET_ITEM(*leaves, (Py_ssize_t)i, leaf);
  }
  if (m->form == SL_FORM_STRUCTURE) {
    *nodes = PyList_New((Py_ssize_t)m->n_nodes);
    if (*nodes == NULL) goto fail;
    for (size_t i = 0; i < m->n_nodes; i++) {
      PyObject *t = node_tuple(&m->nodes[i]);
      if (t == NULL) goto fail;
      PyList_SET_ITEM(*nodes, (Py_ssize_t)i, t);
    }
  } else {
    *nodes = Py_NewRef(Py_None);
  }
  return 0;
fail:
  Py_CLEAR(*leaves);
  Py_CLEAR(*nodes);
  return -1;
}

/* ---- Python to C ---- */

struct slpy_setbuf {
  sl_tensor_out *items;
  sl_node *nodes;
  char **strings; /* every name, key and string value, malloc'd */
  size_t n_strings, cap_strings;
};

/* No GIL needed: plain memory. */
void slpy_setbuf_free(void *p) {
  slpy_setbuf *b = p;
  if (b == NULL) return;
  for (size_t i = 0; i < b->n_strings; i++) free(b->strings[i]);
  free(b->strings);
  free(b->items);
  free(b->nodes);
  free(b);
}

static const char *keep_str(slpy_setbuf *b, PyObject *o, const char *what) {
  const char *s;
  Py_ssize_t n;
  char *copy;
  if (!PyUnicode_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s must be a str, got %.100s", what, Py_TYPE(o)->tp_name);
    return NULL;
  }
  s = PyUnicode_AsUTF8AndSize(o, &n);
  if (s == NULL) return NULL;
  if ((size_t)n != strlen(s)) {
    PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", what);
    return NULL;
  }
  if (b->n_strings == b->cap_strings) {
    size_t cap = b->cap_strings ? 2 * b->cap_strings : 16;
    char **bigger = realloc(b->strings, cap * sizeof(*bigger));
    if (bigger == NULL) {
      PyErr_NoMemory();
      return NULL;
    }
    b->strings = bigger;
    b->cap_strings = cap;
  }
  copy = sl_strndup(s, (size_t)n);
  if (copy == NULL) {
    PyErr_NoMemory();
    return NULL;
  }
  b->strings[b->n_strings++] = copy;
  return copy;
}

/* Fill `out` from one tensor (a __dlpack__ producer, or an encoded 5-tuple). */
static int out_from_object(slpy_state *st, PyObject *obj, PyObject *codec, sl_tensor_out *out) {
  int cerr = 0;
  const sl_codec *c;
  memset(out, 0, sizeof(*out));
  if (PyTuple_Check(obj)) return slpy_encoded_from_tuple(obj, out);
  c = slpy_codec_of(st, codec, &cerr);
  if (cerr) return -1;
  {
    slpy_export ex;
    if (slpy_export_tensor(obj, &ex) < 0) return -1;
    out->desc = ex.desc;
    out->data = ex.data;
    out->nbytes = ex.nbytes;
    out->release = slpy_export_release;
    out->owner = ex.dlm;
    out->codec = c;
  }
  return 0;
}

int slpy_set_from_python(slpy_state *st, PyObject *leaves, int form, PyObject *nodes,
                         sl_tensor_set *set, slpy_setbuf **buf) {
  PyObject *seq = NULL, *nseq = NULL;
  slpy_setbuf *b = NULL;
  Py_ssize_t n, nn = 0, done = 0;
  int status = -1;

  memset(set, 0, sizeof(*set));
  *buf = NULL;
  if (form < SL_FORM_SINGLE || form > SL_FORM_STRUCTURE) {
    PyErr_Format(PyExc_ValueError, "unknown form %d", form);
    return -1;
  }
  seq = PySequence_Fast(leaves, "leaves must be a sequence of OutTensor");
  if (seq == NULL) return -1;
  n = PySequence_Fast_GET_SIZE(seq);
  if (form == SL_FORM_STRUCTURE) {
    nseq = PySequence_Fast(nodes, "nodes must be a sequence of (kind, size, key, value)");
    if (nseq == NULL) goto cleanup;
    nn = PySequence_Fast_GET_SIZE(nseq);
  }
  if (form == SL_FORM_SINGLE && (n < 1 || n % 2 == 0)) {
    PyErr_SetString(PyExc_ValueError, "a single-tensor call carries one tensor and KV pairs");
    goto cleanup;
  }
  b = calloc(1, sizeof(*b));
  if (b == NULL) goto oom;
  b->items = calloc(n ? (size_t)n : 1, sizeof(*b->items));
  b->nodes = calloc(nn ? (size_t)nn : 1, sizeof(*b->nodes));
  if (b->items == NULL || b->nodes == NULL) goto oom;
  for (Py_ssize_t i = 0; i < nn; i++) {
    PyObject *t = PySequence_Fast_GET_ITEM(nseq, i), *key, *value;
    sl_node *nd = &b->nodes[i];
    unsigned int size;
    if (!PyArg_ParseTuple(t, "iIOO;a structure node is (kind, size, key, value)", &nd->kind,
                          &size, &key, &value)) {
      goto cleanup;
    }
    nd->size = size;
    if (key != Py_None && (nd->key = keep_str(b, key, "a dict key")) == NULL) goto cleanup;
    switch (nd->kind) {
      case SL_NODE_INT:
      case SL_NODE_BOOL:
        nd->i = PyLong_AsLongLong(value);
        if (nd->i == -1 && PyErr_Occurred()) goto cleanup;
        break;
      case SL_NODE_FLOAT:
        nd->d = PyFloat_AsDouble(value);
        if (nd->d == -1.0 && PyErr_Occurred()) goto cleanup;
        break;
      case SL_NODE_STRING:
        if ((nd->s = keep_str(b, value, "a string leaf")) == NULL) goto cleanup;
        break;
      default: break;
    }
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
      PyErr_SetString(PyExc_TypeError, "leaves must be OutTensor (name, tensor, codec)");
      goto cleanup;
    }
    if (form != SL_FORM_SINGLE &&
        (b->items[i].name = keep_str(b, PyTuple_GET_ITEM(t, 0), "a tensor name")) == NULL) {
      goto cleanup;
    }
    {
      const char *name = b->items[i].name;
      if (out_from_object(st, PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 2), &b->items[i]) < 0) {
        goto cleanup;
      }
      b->items[i].name = name;
    }
    done = i + 1;
  }
  set->items = b->items;
  set->n = (size_t)n;
  set->form = form;
  set->nodes = form == SL_FORM_STRUCTURE ? b->nodes : NULL;
  set->n_nodes = (size_t)nn;
  set->n_kv = form == SL_FORM_SINGLE ? (size_t)(n - 1) / 2 : 0;
  *buf = b;
  b = NULL;
  status = 0;
  goto cleanup;
oom:
  PyErr_NoMemory();
cleanup:
  if (b != NULL) {
    /* release what was exported so far (runs deleters; the GIL is held, which
     * they tolerate) */
    for (Py_ssize_t i = 0; i < done; i++) {
      if (b->items[i].release != NULL) b->items[i].release(b->items[i].owner);
    }
    slpy_setbuf_free(b);
  }
  Py_XDECREF(seq);
  Py_XDECREF(nseq);
  return status;
}
