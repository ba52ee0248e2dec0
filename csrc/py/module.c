/* module.c: the splitlearn_comm._core extension module: state, helpers, init.
 *
 * All state lives in slpy_state (module state, with traverse/clear); the types are
 * heap types made from PyType_Spec. See slpy.h for the GIL contract.
 */
#include "slpy.h"

slpy_state *slpy_state_of_module(PyObject *module) { return PyModule_GetState(module); }

slpy_state *slpy_state_of_type(PyTypeObject *tp) {
  PyObject *m = PyType_GetModule(tp);
  if (m == NULL) return NULL;
  return PyModule_GetState(m);
}

int slpy_parse_options(PyObject *options, sl_chan_arg **out, size_t *n) {
  PyObject *seq = NULL;
  sl_chan_arg *a = NULL;
  Py_ssize_t len;
  int status = -1;

  *out = NULL;
  *n = 0;
  if (options == NULL || options == Py_None) return 0;
  seq = PySequence_Fast(options, "options must be a sequence of (name, value) pairs");
  if (seq == NULL) return -1;
  len = PySequence_Fast_GET_SIZE(seq);
  a = PyMem_Calloc(len ? (size_t)len : 1, sizeof(*a));
  if (a == NULL) {
    PyErr_NoMemory();
    goto cleanup;
  }
  for (Py_ssize_t i = 0; i < len; i++) {
    PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *key, *value;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
      PyErr_Format(PyExc_TypeError, "option %zd must be a (name, value) tuple, got %.100s", i,
                   Py_TYPE(item)->tp_name);
      goto cleanup;
    }
    key = PyTuple_GET_ITEM(item, 0);
    value = PyTuple_GET_ITEM(item, 1);
    if (!PyUnicode_Check(key)) {
      PyErr_Format(PyExc_TypeError, "option %zd: name must be a str, got %.100s", i,
                   Py_TYPE(key)->tp_name);
      goto cleanup;
    }
    a[i].key = PyUnicode_AsUTF8(key);
    if (a[i].key == NULL) goto cleanup;
    if (PyBool_Check(value) || PyLong_Check(value)) {
      long v = PyLong_AsLong(value);
      if (v == -1 && PyErr_Occurred()) goto cleanup;
      if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "option %s: value %ld does not fit a 32-bit int",
                     a[i].key, v);
        goto cleanup;
      }
      a[i].is_string = 0;
      a[i].ival = (int)v;
    } else if (PyUnicode_Check(value)) {
      a[i].is_string = 1;
      a[i].sval = PyUnicode_AsUTF8(value);
      if (a[i].sval == NULL) goto cleanup;
    } else {
      PyErr_Format(PyExc_TypeError, "option %s: value must be int, bool or str, got %.100s",
                   a[i].key, Py_TYPE(value)->tp_name);
      goto cleanup;
    }
  }
  *out = a;
  *n = (size_t)len;
  a = NULL;
  status = 0;
cleanup:
  PyMem_Free(a);
  Py_XDECREF(seq);
  return status;
}

int slpy_parse_metadata(PyObject *md, sl_kv **out, size_t *n) {
  PyObject *seq = NULL;
  sl_kv *kv = NULL;
  Py_ssize_t len;
  int status = -1;

  *out = NULL;
  *n = 0;
  if (md == NULL || md == Py_None) return 0;
  seq = PySequence_Fast(md, "metadata must be a sequence of (key, value) pairs");
  if (seq == NULL) return -1;
  len = PySequence_Fast_GET_SIZE(seq);
  kv = PyMem_Calloc(len ? (size_t)len : 1, sizeof(*kv));
  if (kv == NULL) {
    PyErr_NoMemory();
    goto cleanup;
  }
  for (Py_ssize_t i = 0; i < len; i++) {
    PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *key, *value;
    Py_ssize_t vlen;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
      PyErr_Format(PyExc_TypeError, "metadata item %zd must be a (key, value) tuple", i);
      goto cleanup;
    }
    key = PyTuple_GET_ITEM(item, 0);
    value = PyTuple_GET_ITEM(item, 1);
    if (!PyUnicode_Check(key)) {
      PyErr_Format(PyExc_TypeError, "metadata key %zd must be a str", i);
      goto cleanup;
    }
    kv[i].key = PyUnicode_AsUTF8(key);
    if (kv[i].key == NULL) goto cleanup;
    if (PyUnicode_Check(value)) {
      kv[i].value = PyUnicode_AsUTF8AndSize(value, &vlen);
    } else if (PyBytes_Check(value)) {
      kv[i].value = PyBytes_AS_STRING(value);
      vlen = PyBytes_GET_SIZE(value);
    } else {
      PyErr_Format(PyExc_TypeError, "metadata value for '%s' must be str or bytes, got %.100s",
                   kv[i].key, Py_TYPE(value)->tp_name);
      goto cleanup;
    }
    if (kv[i].value == NULL) goto cleanup;
    kv[i].value_len = (size_t)vlen;
  }
  *out = kv;
  *n = (size_t)len;
  kv = NULL;
  status = 0;
cleanup:
  PyMem_Free(kv);
  Py_XDECREF(seq);
  return status;
}

PyObject *slpy_metadata_tuple(const sl_kv *kv, size_t n) {
  PyObject *t = PyTuple_New((Py_ssize_t)n);
  if (t == NULL) return NULL;
  for (size_t i = 0; i < n; i++) {
    size_t klen = strlen(kv[i].key);
    int binary = klen >= 4 && strcmp(kv[i].key + klen - 4, "-bin") == 0;
    PyObject *pair =
        binary ? Py_BuildValue("(sy#)", kv[i].key, kv[i].value, (Py_ssize_t)kv[i].value_len)
               : Py_BuildValue("(ss#)", kv[i].key, kv[i].value, (Py_ssize_t)kv[i].value_len);
    if (pair == NULL) {
      /* a non-UTF-8 value of a text key: hand it over as bytes */
      PyErr_Clear();
      pair = Py_BuildValue("(sy#)", kv[i].key, kv[i].value, (Py_ssize_t)kv[i].value_len);
    }
    if (pair == NULL) {
      Py_DECREF(t);
      return NULL;
    }
    PyTuple_SET_ITEM(t, (Py_ssize_t)i, pair);
  }
  return t;
}

void slpy_format_exception(PyObject *exc, char *buf, size_t buflen) {
  PyObject *s = PyObject_Str(exc);
  const char *msg = s ? PyUnicode_AsUTF8(s) : NULL;
  if (msg == NULL) {
    PyErr_Clear();
    msg = "<unprintable>";
  }
  if (msg[0] != '\0') {
    snprintf(buf, buflen, "%s: %s", _PyType_Name(Py_TYPE(exc)), msg);
  } else {
    snprintf(buf, buflen, "%s", _PyType_Name(Py_TYPE(exc)));
  }
  Py_XDECREF(s);
}

/* ---- module ---- */

static PyObject *py_status_name(PyObject *m, PyObject *arg) {
  long code = PyLong_AsLong(arg);
  (void)m;
  if (code == -1 && PyErr_Occurred()) return NULL;
  return PyUnicode_FromString(sl_status_name((int)code));
}

static PyMethodDef module_methods[] = {
    {"status_name", py_status_name, METH_O, "Name of a gRPC status code."},
    {NULL, NULL, 0, NULL}};

static int module_exec(PyObject *m) {
  slpy_state *st = slpy_state_of_module(m);
  st->main_thread = PyThread_get_thread_ident();
  st->holder_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_holder_spec, NULL);
  if (st->holder_type == NULL) return -1;
  st->server_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_server_spec, NULL);
  if (st->server_type == NULL) return -1;
  st->client_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_client_spec, NULL);
  if (st->client_type == NULL) return -1;
  st->call_error = PyErr_NewExceptionWithDoc(
      "splitlearn_comm._core.CallError",
      "A call ended with a non-OK gRPC status. args: (code, details, trailing_metadata, "
      "initial_metadata, debug_error_string, attempts).",
      NULL, NULL);
  if (st->call_error == NULL) return -1;
  if (PyModule_AddObjectRef(m, "DLPackTensor", (PyObject *)st->holder_type) < 0) return -1;
  if (PyModule_AddObjectRef(m, "Server", (PyObject *)st->server_type) < 0) return -1;
  if (PyModule_AddObjectRef(m, "Client", (PyObject *)st->client_type) < 0) return -1;
  if (PyModule_AddObjectRef(m, "CallError", st->call_error) < 0) return -1;
  if (PyModule_AddIntConstant(m, "MAX_MESSAGE_BYTES", (long)SL_MAX_MESSAGE_BYTES) < 0) return -1;
  if (PyModule_AddIntConstant(m, "MAX_NDIM", SL_MAX_NDIM) < 0) return -1;
  return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
  slpy_state *st = slpy_state_of_module(m);
  Py_VISIT(st->holder_type);
  Py_VISIT(st->server_type);
  Py_VISIT(st->client_type);
  Py_VISIT(st->call_error);
  return 0;
}

static int module_clear(PyObject *m) {
  slpy_state *st = slpy_state_of_module(m);
  Py_CLEAR(st->holder_type);
  Py_CLEAR(st->server_type);
  Py_CLEAR(st->client_type);
  Py_CLEAR(st->call_error);
  return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "splitlearn_comm._core",
    .m_doc = "The C core of splitlearn-comm: server, client and DLPack bridge on the gRPC C core.",
    .m_size = sizeof(slpy_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&module_def); }
