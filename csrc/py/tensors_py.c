/* tensors_py.c: the tensors of a call across the binding, as typed objects.
 *
 * C to Python: every received tensor, decoded by the core, becomes a _core.Leaf
 * (name, tensor, shape, dtype); the structure becomes a list of
 * (kind, size, key, value) node tuples in pre-order (kinds as sl_node_kind). A
 * client call returns a _core.Reply, the server's compute callback receives a
 * _core.Call. All three are struct sequences: named fields, read by name.
 *
 * Python to C: a list of _core.OutTensor (name, tensor, codec), or of (name,
 * tensor) pairs as flatten() makes them (no codec: the core's choice), and the
 * nodes become an sl_tensor_set whose arrays and strings live in one
 * slpy_setbuf. Each tensor is exported here (slpy_export_leaf), once per attempt.
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
    {"value", "with compute(convert=...): the object the tensors were sent as (leaves and "
              "nodes are None then); else None"},
    {"values", "with compute(convert=...): the received tensors, converted, in wire order; "
               "else None"},
    /* attributes only (not in the tuple) */
    {"encode_ms", "this side's work before sending: exporting the tensors and packing the "
                  "request (codecs included); 0.0 for an asynchronous call"},
    {"decode_ms", "this side's work after receiving: reading the reply (codecs included) and "
                  "making its objects; 0.0 for an asynchronous call"},
    {"transport", "how the last attempt sent the request's tensors: 'unary', 'stream' or "
                  "'shared_memory'"},
    {NULL, NULL}};

static PyStructSequence_Desc reply_desc = {"splitlearn_comm._core.Reply",
                                           "The result of Client.compute (internal).",
                                           reply_fields, 12};

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
    {"fields", "the training, model and session fields (dict), or None when none is set"},
    {"use_cache", "ComputeRequest.use_cache: None, False or True"},
    {"value", "with the server's convert=: the object the tensors were sent as (leaves and "
              "nodes are None then); else None"},
    {"values", "with the server's convert=: the received tensors, converted, in wire order; "
               "else None"},
    {NULL, NULL}};

static PyStructSequence_Desc call_desc = {"splitlearn_comm._core.Call",
                                          "A call for the compute callback (internal).",
                                          call_fields, 16};

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

/* ---- the received object, rebuilt in one pass (_core.rebuild) ---- */

typedef struct rebuild_ctx {
  PyObject *const *nodes; /* the node tuples (borrowed) */
  Py_ssize_t n_nodes, pos;
  PyObject *values;       /* list of converted tensors */
  Py_ssize_t next;        /* the next value a tensor node takes */
} rebuild_ctx;

/* The node tuple at ctx->pos, checked (borrowed), or NULL with an exception. */
static PyObject *node_at(rebuild_ctx *c) {
  PyObject *nd;
  if (c->pos >= c->n_nodes) {
    PyErr_SetString(PyExc_ValueError, "the structure's nodes end before its containers do");
    return NULL;
  }
  nd = c->nodes[c->pos];
  if (!PyTuple_Check(nd) || PyTuple_GET_SIZE(nd) != 4) {
    PyErr_SetString(PyExc_TypeError, "a structure node is (kind, size, key, value)");
    return NULL;
  }
  return nd;
}

/* The value of the node at ctx->pos and its subtree (new reference). */
static PyObject *build_node(rebuild_ctx *c) {
  PyObject *nd = node_at(c), *out = NULL, *value;
  long kind;
  Py_ssize_t size;
  if (nd == NULL) return NULL;
  c->pos++;
  kind = PyLong_AsLong(PyTuple_GET_ITEM(nd, 0));
  if (kind == -1 && PyErr_Occurred()) return NULL;
  size = PyLong_AsSsize_t(PyTuple_GET_ITEM(nd, 1));
  if (size == -1 && PyErr_Occurred()) return NULL;
  value = PyTuple_GET_ITEM(nd, 3);
  switch (kind) {
    case SL_NODE_TENSOR:
      if (c->next >= PyList_GET_SIZE(c->values)) {
        PyErr_SetString(PyExc_ValueError,
                        "the structure names more tensors than the message carries");
        return NULL;
      }
      return Py_NewRef(PyList_GET_ITEM(c->values, c->next++));
    case SL_NODE_TUPLE:
    case SL_NODE_LIST:
    case SL_NODE_DICT:
      if (size < 0 || size > c->n_nodes - c->pos) {
        PyErr_SetString(PyExc_ValueError,
                        "a container of the structure has more children than nodes follow it");
        return NULL;
      }
      out = kind == SL_NODE_TUPLE ? PyTuple_New(size)
            : kind == SL_NODE_LIST ? PyList_New(size)
                                   : PyDict_New();
      if (out == NULL) return NULL;
      if (Py_EnterRecursiveCall(" while rebuilding a received structure")) {
        Py_DECREF(out);
        return NULL;
      }
      for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *key = NULL, *child;
        if (kind == SL_NODE_DICT) {
          PyObject *next = node_at(c); /* its key, read before the child moves pos on */
          if (next == NULL) goto fail;
          key = PyTuple_GET_ITEM(next, 2);
        }
        child = build_node(c);
        if (child == NULL) goto fail;
        if (kind == SL_NODE_TUPLE) {
          PyTuple_SET_ITEM(out, i, child);
        } else if (kind == SL_NODE_LIST) {
          PyList_SET_ITEM(out, i, child);
        } else {
          int rc = PyDict_SetItem(out, key, child);
          Py_DECREF(child);
          if (rc < 0) goto fail;
        }
      }
      Py_LeaveRecursiveCall();
      return out;
    fail:
      Py_LeaveRecursiveCall();
      Py_DECREF(out);
      return NULL;
    case SL_NODE_BOOL: {
      int truth = PyObject_IsTrue(value);
      return truth < 0 ? NULL : PyBool_FromLong(truth);
    }
    default: return Py_NewRef(value); /* NONE (None), INT, FLOAT, STRING */
  }
}

PyObject *slpy_rebuild(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  slpy_state *st = slpy_state_of_module(module);
  PyObject *seq = NULL, *nseq = NULL, *values = NULL, *obj = NULL, *ret = NULL;
  PyObject *convert;
  Py_ssize_t n;
  long form;

  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "rebuild(form, leaves, nodes, convert) takes 4 arguments");
    return NULL;
  }
  form = PyLong_AsLong(args[0]);
  if (form == -1 && PyErr_Occurred()) return NULL;
  convert = args[3];
  seq = PySequence_Fast(args[1], "leaves must be a sequence of Leaf");
  if (seq == NULL) return NULL;
  n = PySequence_Fast_GET_SIZE(seq);
  values = PyList_New(n);
  if (values == NULL) goto cleanup;
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject *leaf = PySequence_Fast_GET_ITEM(seq, i), *t, *v;
    if (!PyTuple_Check(leaf) || PyTuple_GET_SIZE(leaf) < 2) {
      PyErr_SetString(PyExc_TypeError, "leaves must be Leaf (name, tensor, shape, dtype)");
      goto cleanup;
    }
    t = PyTuple_GET_ITEM(leaf, 1);
    if (convert == Py_None) {
      v = Py_NewRef(t);
    } else if (Py_IS_TYPE(t, st->holder_type)) {
      PyObject *capsule = slpy_holder_capsule(t);
      if (capsule == NULL) goto cleanup;
      v = PyObject_CallOneArg(convert, capsule);
      Py_DECREF(capsule);
    } else {
      v = PyObject_CallOneArg(convert, t);
    }
    if (v == NULL) goto cleanup;
    PyList_SET_ITEM(values, i, v);
  }
  if (form == SL_FORM_SINGLE) {
    if (n < 1) {
      PyErr_SetString(PyExc_ValueError, "a single-tensor message without its tensor");
      goto cleanup;
    }
    obj = Py_NewRef(PyList_GET_ITEM(values, 0));
  } else if (form == SL_FORM_MAP) {
    obj = PyDict_New();
    if (obj == NULL) goto cleanup;
    for (Py_ssize_t i = 0; i < n; i++) {
      if (PyDict_SetItem(obj, PyTuple_GET_ITEM(PySequence_Fast_GET_ITEM(seq, i), 0),
                         PyList_GET_ITEM(values, i)) < 0) {
        goto cleanup;
      }
    }
  } else if (form == SL_FORM_STRUCTURE) {
    rebuild_ctx c;
    nseq = PySequence_Fast(args[2], "nodes must be a sequence of (kind, size, key, value)");
    if (nseq == NULL) goto cleanup;
    c.nodes = PySequence_Fast_ITEMS(nseq);
    c.n_nodes = PySequence_Fast_GET_SIZE(nseq);
    c.pos = 0;
    c.values = values;
    c.next = 0;
    obj = build_node(&c);
    if (obj == NULL) goto cleanup;
  } else {
    PyErr_Format(PyExc_ValueError, "unknown form %ld", form);
    goto cleanup;
  }
  ret = PyTuple_Pack(2, obj, values);
cleanup:
  Py_XDECREF(obj);
  Py_XDECREF(values);
  Py_XDECREF(nseq);
  Py_XDECREF(seq);
  return ret;
}

/* ---- the received object straight from the message (the server's convert=) ---- */

typedef struct cbuild {
  const sl_node *nodes;
  size_t n_nodes, pos;
  PyObject *values;
  Py_ssize_t next;
} cbuild;

static PyObject *cnode_build(cbuild *b) {
  const sl_node *nd;
  PyObject *out;
  if (b->pos >= b->n_nodes) {
    PyErr_SetString(PyExc_ValueError, "the structure's nodes end before its containers do");
    return NULL;
  }
  nd = &b->nodes[b->pos++];
  switch (nd->kind) {
    case SL_NODE_TENSOR:
      if (b->next >= PyList_GET_SIZE(b->values)) {
        PyErr_SetString(PyExc_ValueError,
                        "the structure names more tensors than the message carries");
        return NULL;
      }
      return Py_NewRef(PyList_GET_ITEM(b->values, b->next++));
    case SL_NODE_TUPLE:
    case SL_NODE_LIST:
    case SL_NODE_DICT: {
      Py_ssize_t size = (Py_ssize_t)nd->size;
      if ((size_t)nd->size > b->n_nodes - b->pos) {
        PyErr_SetString(PyExc_ValueError,
                        "a container of the structure has more children than nodes follow it");
        return NULL;
      }
      out = nd->kind == SL_NODE_TUPLE ? PyTuple_New(size)
            : nd->kind == SL_NODE_LIST ? PyList_New(size)
                                       : PyDict_New();
      if (out == NULL) return NULL;
      if (Py_EnterRecursiveCall(" while rebuilding a received structure")) {
        Py_DECREF(out);
        return NULL;
      }
      for (Py_ssize_t i = 0; i < size; i++) {
        const char *key = b->nodes[b->pos].key; /* (pos < n_nodes: checked above) */
        PyObject *child = cnode_build(b);
        if (child == NULL) goto fail;
        if (nd->kind == SL_NODE_TUPLE) {
          PyTuple_SET_ITEM(out, i, child);
        } else if (nd->kind == SL_NODE_LIST) {
          PyList_SET_ITEM(out, i, child);
        } else {
          PyObject *k = PyUnicode_FromString(key ? key : "");
          int rc = k == NULL ? -1 : PyDict_SetItem(out, k, child);
          Py_XDECREF(k);
          Py_DECREF(child);
          if (rc < 0) goto fail;
        }
      }
      Py_LeaveRecursiveCall();
      return out;
    fail:
      Py_LeaveRecursiveCall();
      Py_DECREF(out);
      return NULL;
    }
    case SL_NODE_INT: return PyLong_FromLongLong(nd->i);
    case SL_NODE_BOOL: return PyBool_FromLong(nd->i != 0);
    case SL_NODE_FLOAT: return PyFloat_FromDouble(nd->d);
    case SL_NODE_STRING: return PyUnicode_FromString(nd->s ? nd->s : "");
    default: return Py_NewRef(Py_None);
  }
}

int slpy_msg_to_value(sl_tensor_msg *m, PyObject *convert, PyObject **value, PyObject **values) {
  *value = NULL;
  *values = PyList_New((Py_ssize_t)m->n_items);
  if (*values == NULL) return -1;
  for (size_t i = 0; i < m->n_items; i++) {
    sl_tensor_item *it = &m->items[i];
    PyObject *capsule, *v;
    void *data, *owner;
    void (*release)(void *);
    sl_tensor_item_take(it, &data, &release, &owner);
    /* the capsule owns it now (let go of even on failure) */
    capsule = slpy_capsule_new(data, &it->desc, release, owner);
    if (capsule == NULL) goto fail;
    v = PyObject_CallOneArg(convert, capsule);
    Py_DECREF(capsule);
    if (v == NULL) goto fail;
    PyList_SET_ITEM(*values, (Py_ssize_t)i, v);
  }
  if (m->form == SL_FORM_STRUCTURE) {
    cbuild b = {m->nodes, m->n_nodes, 0, *values, 0};
    *value = cnode_build(&b);
  } else if (m->form == SL_FORM_MAP) {
    *value = PyDict_New();
    for (size_t i = 0; *value != NULL && i < m->n_items; i++) {
      PyObject *k = PyUnicode_FromString(m->items[i].name ? m->items[i].name : "");
      if (k == NULL || PyDict_SetItem(*value, k, PyList_GET_ITEM(*values, (Py_ssize_t)i)) < 0) {
        Py_CLEAR(*value);
      }
      Py_XDECREF(k);
    }
  } else if (m->n_items > 0) {
    *value = Py_NewRef(PyList_GET_ITEM(*values, 0));
  } else {
    PyErr_SetString(PyExc_ValueError, "a single-tensor message without its tensor");
  }
  if (*value != NULL) return 0;
fail:
  Py_CLEAR(*values);
  return -1;
}

/* ---- a structure flattened in one pass (_core.flatten) ---- */

/* The walk of _structure.flatten for the common shapes: exact dict (str keys),
 * tuple and list, exact torch.Tensor leaves, None, bool, int (64 bits), float,
 * str. Anything else (NumPy arrays, subclasses, mappings, an error of any kind)
 * stops it with SLPY_FLAT_OTHER, and the caller hands the object to the Python
 * walker, which knows every case and says what is wrong. */
enum { SLPY_FLAT_OK = 0, SLPY_FLAT_OTHER = 1, SLPY_FLAT_ERROR = -1 };

typedef struct flat_ctx {
  PyObject *tensor_type; /* torch.Tensor (borrowed) */
  PyObject *items;       /* list of (name, tensor) */
  PyObject *nodes;       /* list of (kind, size, key, value) */
  PyObject *names;       /* set of names taken, kept once a dict key makes names ambiguous */
  int ambiguous;         /* a dict key that is empty or has a '.': names can collide */
  char *path;            /* the current path, UTF-8, NUL-terminated */
  size_t len, cap;
} flat_ctx;

/* Append ".part" (or "part" at the root) to the path; 0, or -1 with MemoryError. */
static int path_push(flat_ctx *c, const char *part, size_t n) {
  size_t need = c->len + (c->len ? 1 : 0) + n + 1;
  if (need > c->cap) {
    size_t cap = c->cap ? c->cap : 64;
    char *bigger;
    while (cap < need) cap *= 2;
    bigger = PyMem_Realloc(c->path, cap);
    if (bigger == NULL) {
      PyErr_NoMemory();
      return -1;
    }
    c->path = bigger;
    c->cap = cap;
  }
  if (c->len) c->path[c->len++] = '.';
  if (n) memcpy(c->path + c->len, part, n);
  c->len += n;
  c->path[c->len] = '\0';
  return 0;
}

/* The decimal digits of i >= 0 into buf (no NUL); their count. */
static size_t index_text(Py_ssize_t i, char buf[24]) {
  char tmp[24];
  size_t n = 0, k = 0;
  size_t v = (size_t)i;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v > 0);
  while (n > 0) buf[k++] = tmp[--n];
  return k;
}

/* Names can collide from now on: the set of names taken starts with every name
 * given so far. 0, or -1 with an exception. */
static int ambiguous_from_here(flat_ctx *c) {
  Py_ssize_t n = PyList_GET_SIZE(c->items);
  c->ambiguous = 1;
  c->names = PySet_New(NULL);
  if (c->names == NULL) return -1;
  for (Py_ssize_t i = 0; i < n; i++) {
    if (PySet_Add(c->names, PyTuple_GET_ITEM(PyList_GET_ITEM(c->items, i), 0)) < 0) return -1;
  }
  return 0;
}

static int add_node(flat_ctx *c, int kind, Py_ssize_t size, PyObject *key, PyObject *value) {
  PyObject *t = PyTuple_New(4), *k, *sz;
  int rc;
  if (t == NULL) return -1;
  k = PyLong_FromLong(kind);
  sz = PyLong_FromSsize_t(size);
  if (k == NULL || sz == NULL) {
    Py_XDECREF(k);
    Py_XDECREF(sz);
    Py_DECREF(t);
    return -1;
  }
  PyTuple_SET_ITEM(t, 0, k);
  PyTuple_SET_ITEM(t, 1, sz);
  PyTuple_SET_ITEM(t, 2, Py_NewRef(key ? key : Py_None));
  PyTuple_SET_ITEM(t, 3, Py_NewRef(value ? value : Py_None));
  rc = PyList_Append(c->nodes, t);
  Py_DECREF(t);
  return rc;
}

static int flat_walk(flat_ctx *c, PyObject *o, PyObject *key) {
  PyTypeObject *tp = Py_TYPE(o);
  if ((PyObject *)tp == c->tensor_type) {
    PyObject *name, *item;
    int taken, rc;
    name = c->len ? PyUnicode_DecodeUTF8(c->path, (Py_ssize_t)c->len, NULL)
                  : PyUnicode_FromString("0");
    if (name == NULL) return SLPY_FLAT_ERROR;
    if (c->ambiguous) { /* names are unique by construction unless a key was ambiguous */
      taken = PySet_Contains(c->names, name);
      if (taken != 0) { /* a duplicate name: the Python walker raises the error */
        Py_DECREF(name);
        return taken < 0 ? SLPY_FLAT_ERROR : SLPY_FLAT_OTHER;
      }
      if (PySet_Add(c->names, name) < 0) {
        Py_DECREF(name);
        return SLPY_FLAT_ERROR;
      }
    }
    item = PyTuple_Pack(2, name, o);
    Py_DECREF(name);
    if (item == NULL) return SLPY_FLAT_ERROR;
    rc = PyList_Append(c->items, item);
    Py_DECREF(item);
    if (rc < 0) return SLPY_FLAT_ERROR;
    return add_node(c, SL_NODE_TENSOR, 0, key, NULL) < 0 ? SLPY_FLAT_ERROR : SLPY_FLAT_OK;
  }
  if (tp == &PyTuple_Type || tp == &PyList_Type || tp == &PyDict_Type) {
    Py_ssize_t n = tp == &PyDict_Type ? PyDict_GET_SIZE(o) : Py_SIZE(o);
    size_t len = c->len;
    int rc = SLPY_FLAT_OK;
    if (add_node(c, tp == &PyTuple_Type ? SL_NODE_TUPLE : tp == &PyList_Type ? SL_NODE_LIST
                                                                              : SL_NODE_DICT,
                 n, key, NULL) < 0) {
      return SLPY_FLAT_ERROR;
    }
    if (Py_EnterRecursiveCall(" while flattening a structure")) return SLPY_FLAT_ERROR;
    if (tp == &PyDict_Type) {
      Py_ssize_t pos = 0;
      PyObject *k, *v;
      while (rc == SLPY_FLAT_OK && PyDict_Next(o, &pos, &k, &v)) {
        const char *s;
        Py_ssize_t kn;
        if (!PyUnicode_CheckExact(k)) {
          rc = SLPY_FLAT_OTHER;
          break;
        }
        s = PyUnicode_AsUTF8AndSize(k, &kn);
        if (s == NULL || path_push(c, s, (size_t)kn) < 0) {
          rc = SLPY_FLAT_ERROR;
          break;
        }
        if (!c->ambiguous && (kn == 0 || memchr(s, '.', (size_t)kn) != NULL)) {
          /* from here on names are checked: "a.b" and {"a": {"b": ...}} meet, and so
           * do "" at the root and "0"; the names taken so far go in the set */
          if (ambiguous_from_here(c) < 0) {
            rc = SLPY_FLAT_ERROR;
            break;
          }
        }
        Py_INCREF(v); /* the dict could change under a walker that ran Python code */
        Py_INCREF(k);
        rc = flat_walk(c, v, k);
        Py_DECREF(k);
        Py_DECREF(v);
        c->len = len;
        c->path[len] = '\0';
      }
    } else {
      /* (the size read again: a finalizer run by an allocation could change a list) */
      for (Py_ssize_t i = 0; rc == SLPY_FLAT_OK && i < Py_SIZE(o); i++) {
        char num[24];
        size_t nn = index_text(i, num);
        PyObject *child = tp == &PyTuple_Type ? PyTuple_GET_ITEM(o, i) : PyList_GET_ITEM(o, i);
        if (path_push(c, num, nn) < 0) {
          rc = SLPY_FLAT_ERROR;
          break;
        }
        Py_INCREF(child);
        rc = flat_walk(c, child, NULL);
        Py_DECREF(child);
        c->len = len;
        if (c->path != NULL) c->path[len] = '\0';
      }
    }
    Py_LeaveRecursiveCall();
    return rc;
  }
  if (o == Py_None) return add_node(c, SL_NODE_NONE, 0, key, NULL) < 0 ? SLPY_FLAT_ERROR : 0;
  if (tp == &PyBool_Type) {
    PyObject *v = PyLong_FromLong(o == Py_True);
    int rc = v == NULL ? -1 : add_node(c, SL_NODE_BOOL, 0, key, v);
    Py_XDECREF(v);
    return rc < 0 ? SLPY_FLAT_ERROR : SLPY_FLAT_OK;
  }
  if (tp == &PyLong_Type) {
    int overflow = 0;
    (void)PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return SLPY_FLAT_OTHER; /* the Python walker names the int */
    if (PyErr_Occurred()) return SLPY_FLAT_ERROR;
    return add_node(c, SL_NODE_INT, 0, key, o) < 0 ? SLPY_FLAT_ERROR : SLPY_FLAT_OK;
  }
  if (tp == &PyFloat_Type) {
    return add_node(c, SL_NODE_FLOAT, 0, key, o) < 0 ? SLPY_FLAT_ERROR : SLPY_FLAT_OK;
  }
  if (tp == &PyUnicode_Type) {
    return add_node(c, SL_NODE_STRING, 0, key, o) < 0 ? SLPY_FLAT_ERROR : SLPY_FLAT_OK;
  }
  return SLPY_FLAT_OTHER;
}

PyObject *slpy_flatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
  flat_ctx c;
  PyObject *ret = NULL;
  int rc;
  (void)module;
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "flatten(obj, tensor_type) takes 2 arguments");
    return NULL;
  }
  memset(&c, 0, sizeof(c));
  c.tensor_type = args[1];
  c.items = PyList_New(0);
  c.nodes = PyList_New(0);
  if (c.items == NULL || c.nodes == NULL) goto cleanup;
  rc = flat_walk(&c, args[0], NULL);
  if (rc == SLPY_FLAT_OK) {
    ret = PyTuple_Pack(2, c.items, c.nodes);
  } else if (rc == SLPY_FLAT_OTHER) {
    ret = Py_NewRef(Py_None);
  }
cleanup:
  PyMem_Free(c.path);
  Py_XDECREF(c.items);
  Py_XDECREF(c.nodes);
  Py_XDECREF(c.names);
  return ret;
}

/* ---- Python to C ---- */

struct slpy_setbuf {
  sl_tensor_out *items;
  sl_node *nodes;
  sl_arena strings; /* every name, key and string value, NUL-terminated: an arena
                       rather than one malloc each (a call with many tensors has as
                       many names) */
};

/* No GIL needed: plain memory. */
void slpy_setbuf_free(void *p) {
  slpy_setbuf *b = p;
  if (b == NULL) return;
  sl_arena_clear(&b->strings);
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
  copy = sl_arena_alloc(&b->strings, (size_t)n + 1);
  if (copy == NULL) {
    PyErr_NoMemory();
    return NULL;
  }
  if (n > 0) memcpy(copy, s, (size_t)n);
  copy[n] = '\0';
  return copy;
}

/* Fill `out` from one tensor (any leaf slpy_export_leaf takes, or an encoded 5-tuple). */
static int out_from_object(slpy_state *st, PyObject *obj, PyObject *codec, sl_tensor_out *out) {
  int cerr = 0;
  const sl_codec *c;
  memset(out, 0, sizeof(*out));
  if (PyTuple_Check(obj)) return slpy_encoded_from_tuple(obj, out);
  c = slpy_codec_of(st, codec, &cerr);
  if (cerr) return -1;
  {
    slpy_export ex;
    if (slpy_export_leaf(st, obj, &ex) < 0) return -1;
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
    if (!PyTuple_Check(t) || (PyTuple_GET_SIZE(t) != 3 && PyTuple_GET_SIZE(t) != 2)) {
      PyErr_SetString(PyExc_TypeError,
                      "leaves must be OutTensor (name, tensor, codec) or (name, tensor)");
      goto cleanup;
    }
    if (form != SL_FORM_SINGLE &&
        (b->items[i].name = keep_str(b, PyTuple_GET_ITEM(t, 0), "a tensor name")) == NULL) {
      goto cleanup;
    }
    {
      const char *name = b->items[i].name;
      PyObject *codec = PyTuple_GET_SIZE(t) == 3 ? PyTuple_GET_ITEM(t, 2) : Py_None;
      if (out_from_object(st, PyTuple_GET_ITEM(t, 1), codec, &b->items[i]) < 0) {
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
