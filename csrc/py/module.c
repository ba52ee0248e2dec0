/* module.c: the splitlearn_comm._core extension module: its state, its functions
 * and its initialisation. The conversions between Python objects and core values
 * are in convert_py.c, the tensors of a call in tensors_py.c, the types each in
 * their own file (slpy.h lists them).
 *
 * All state lives in slpy_state (module state, with traverse/clear); the types are
 * heap types made from PyType_Spec. See slpy.h for the GIL contract.
 */
#include "slpy.h" /* first: Python.h must come before any system header */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "methods.h"
#include "retry.h"
#include "runtime.h"
#include "stream.h"
#include "tensor.h"

slpy_state *slpy_state_of_module(PyObject *module) { return PyModule_GetState(module); }

slpy_state *slpy_state_of_type(PyTypeObject *tp) {
  PyObject *m = PyType_GetModule(tp);
  if (m == NULL) return NULL;
  return PyModule_GetState(m);
}

/* The gRPC core's latest log lines, kept by the core (runtime.h). */
static void append_line(void *user, const char *line) {
  PyObject *list = user, *v;
  if (list == NULL || PyErr_Occurred()) return;
  v = PyUnicode_DecodeUTF8(line, (Py_ssize_t)strlen(line), "replace");
  if (v == NULL || PyList_Append(list, v) < 0) PyErr_Clear();
  Py_XDECREF(v);
}

static PyObject *py_grpc_log(PyObject *m, PyObject *unused) {
  PyObject *list = PyList_New(0);
  (void)m;
  (void)unused;
  if (list == NULL) return NULL;
  sl_runtime_log_lines(append_line, list);
  return list;
}

/* ---- module ---- */

static PyObject *py_set_export_fallback(PyObject *m, PyObject *fn) {
  slpy_state *st = slpy_state_of_module(m);
  if (fn != Py_None && !PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "set_export_fallback() takes a callable or None");
    return NULL;
  }
  Py_XSETREF(st->export_slow, fn == Py_None ? NULL : Py_NewRef(fn));
  Py_RETURN_NONE;
}

static PyObject *py_status_name(PyObject *m, PyObject *arg) {
  long code = PyLong_AsLong(arg);
  (void)m;
  if (code == -1 && PyErr_Occurred()) return NULL;
  return PyUnicode_FromString(sl_status_name((int)code));
}

/* retry_delay(policy, retry, u) -> seconds: the built-in strategies' delay
 * (sl_retry_delay), for Python to use outside the C retry loop. */
static PyObject *py_retry_delay(PyObject *m, PyObject *args) {
  sl_retry_policy p;
  int retry;
  double u;
  (void)m;
  memset(&p, 0, sizeof(p));
  if (!PyArg_ParseTuple(args, "(iddddd)id", &p.max_retries, &p.initial_delay, &p.max_delay,
                        &p.multiplier, &p.jitter, &p.attempt_timeout, &retry, &u)) {
    return NULL;
  }
  return PyFloat_FromDouble(sl_retry_delay(&p, retry, u));
}

/* breaker_open_message(wait, failures) -> str: the one wording of a refused call. */
static PyObject *py_breaker_open_message(PyObject *m, PyObject *args) {
  double wait;
  int failures;
  char buf[SL_BREAKER_MESSAGE_MAX];
  (void)m;
  if (!PyArg_ParseTuple(args, "di", &wait, &failures)) return NULL;
  sl_breaker_open_message(wait, failures, buf, sizeof(buf));
  return PyUnicode_FromString(buf);
}

static PyObject *py_release_memory(PyObject *m, PyObject *unused) {
  size_t freed;
  (void)m;
  (void)unused;
  Py_BEGIN_ALLOW_THREADS
  freed = sl_storage_release_idle(0);
  Py_END_ALLOW_THREADS
  return PyLong_FromSize_t(freed);
}

static PyObject *py_malloc_tuned(PyObject *m, PyObject *unused) {
  (void)m;
  (void)unused;
  return PyBool_FromLong(sl_malloc_tune());
}

static PyObject *py_storage_pool(PyObject *m, PyObject *args) {
  PyObject *limit = Py_None;
  size_t bytes, blocks, max_bytes;
  (void)m;
  if (!PyArg_ParseTuple(args, "|O:storage_pool", &limit)) return NULL;
  if (limit != Py_None) {
    size_t v = PyLong_AsSize_t(limit);
    if (v == (size_t)-1 && PyErr_Occurred()) return NULL;
    sl_storage_pool_set_limit(v);
  }
  sl_storage_pool_stats(&bytes, &blocks, &max_bytes);
  return Py_BuildValue("(nnn)", (Py_ssize_t)bytes, (Py_ssize_t)blocks, (Py_ssize_t)max_bytes);
}

static PyMethodDef module_methods[] = {
    {"release_memory", py_release_memory, METH_NOARGS,
     "release_memory() -> bytes freed from the storage pool (and the allocator trimmed)."},
    {"malloc_tuned", py_malloc_tuned, METH_NOARGS,
     "malloc_tuned() -> whether the C allocator's thresholds are the library's (tensor.h: "
     "sl_malloc_tune; servers and clients set them when created)."},
    {"storage_pool", py_storage_pool, METH_VARARGS,
     "storage_pool(limit=None) -> (bytes, blocks, limit); sets the limit in bytes first when given."},
    {"retry_delay", py_retry_delay, METH_VARARGS,
     "retry_delay(policy, retry, u) -> delay in seconds (the built-in strategies' rule)."},
    {"breaker_open_message", py_breaker_open_message, METH_VARARGS,
     "breaker_open_message(wait, failures) -> the message of a call an open breaker refused."},
    {"status_name", py_status_name, METH_O, "Name of a gRPC status code."},
    {"grpc_log", py_grpc_log, METH_NOARGS, "The gRPC core's latest log lines (list of str)."},
    {"python_codec", slpy_python_codec, METH_VARARGS,
     "python_codec(codec, name, accepts, wrap, prepare) -> Codec: a Python codec in the core's "
     "codec table."},
    {"rebuild", (PyCFunction)(void (*)(void))slpy_rebuild, METH_FASTCALL,
     "rebuild(form, leaves, nodes, convert) -> (obj, values): the received tensors (each "
     "leaf's DLPack capsule given to convert, e.g. torch.from_dlpack) and the object they "
     "were sent as, in one pass."},
    {"flatten", (PyCFunction)(void (*)(void))slpy_flatten, METH_FASTCALL,
     "flatten(obj, tensor_type) -> (items, nodes) as _structure.flatten walks a structure of "
     "dict/tuple/list, tensor_type leaves, None, bool, int, float and str; None for anything "
     "else (the Python walker's case)."},
    {"set_export_fallback", py_set_export_fallback, METH_O,
     "set_export_fallback(fn): how a leaf that is not a plain CPU torch.Tensor is made "
     "exportable (fn(obj) -> a DLPack capsule or producer); None: no fallback."},
    {"decode", slpy_codec_decode, METH_VARARGS,
     "decode(name, payload, shape, dtype, metadata) -> DLPackTensor (built-in codecs)."},
    {NULL, NULL, 0, NULL}};

atomic_int slpy_exiting; /* slpy.h; set once, by note_exiting */

static PyObject *note_exiting(PyObject *self, PyObject *unused) {
  (void)self;
  (void)unused;
  atomic_store(&slpy_exiting, 1);
  Py_RETURN_NONE;
}

static PyMethodDef note_exiting_def = {"_note_exiting", note_exiting, METH_NOARGS,
                                       "atexit: the interpreter is exiting (slpy.h)"};

/* Register note_exiting with atexit (see slpy_is_finalizing). */
static int register_exiting(PyObject *m) {
  PyObject *atexit = PyImport_ImportModule("atexit");
  PyObject *name = PyModule_GetNameObject(m);
  PyObject *fn = name != NULL ? PyCFunction_NewEx(&note_exiting_def, NULL, name) : NULL;
  PyObject *r = NULL;
  if (atexit != NULL && fn != NULL) r = PyObject_CallMethod(atexit, "register", "O", fn);
  Py_XDECREF(r);
  Py_XDECREF(fn);
  Py_XDECREF(name);
  Py_XDECREF(atexit);
  return r != NULL ? 0 : -1;
}

static int module_exec(PyObject *m) {
  slpy_state *st = slpy_state_of_module(m);
  if (register_exiting(m) < 0) return -1;
  /* One gRPC reference for the life of the process: servers and clients take and
   * drop their own, and dropping the last one would run gRPC's whole shutdown
   * (joining its executor threads, seconds under load) inside whatever Python
   * call happened to free the object. The process exit ends gRPC instead. */
  sl_runtime_init(getenv("GRPC_VERBOSITY") != NULL || getenv("GRPC_TRACE") != NULL);
  st->main_thread = PyThread_get_thread_ident();
  st->str_torch = PyUnicode_InternFromString("torch");
  st->str_is_conj = PyUnicode_InternFromString("is_conj");
  st->str_is_neg = PyUnicode_InternFromString("is_neg");
  if (st->str_torch == NULL || st->str_is_conj == NULL || st->str_is_neg == NULL) return -1;
  st->holder_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_holder_spec, NULL);
  if (st->holder_type == NULL) return -1;
  st->server_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_server_spec, NULL);
  if (st->server_type == NULL) return -1;
  st->client_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_client_spec, NULL);
  if (st->client_type == NULL) return -1;
  st->callstate_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_callstate_spec, NULL);
  if (st->callstate_type == NULL) return -1;
  st->breaker_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_breaker_spec, NULL);
  if (st->breaker_type == NULL) return -1;
  if (PyModule_AddObjectRef(m, "Breaker", (PyObject *)st->breaker_type) < 0) return -1;
  st->stats_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_stats_spec, NULL);
  if (st->stats_type == NULL) return -1;
  if (PyModule_AddObjectRef(m, "CallStats", (PyObject *)st->stats_type) < 0) return -1;
  st->codec_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_codec_spec, NULL);
  if (st->codec_type == NULL) return -1;
  if (PyModule_AddObjectRef(m, "Codec", (PyObject *)st->codec_type) < 0) return -1;
  st->codecs_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &slpy_codecs_spec, NULL);
  if (st->codecs_type == NULL) return -1;
  if (PyModule_AddObjectRef(m, "Codecs", (PyObject *)st->codecs_type) < 0) return -1;
  st->codec_error = PyErr_NewExceptionWithDoc(
      "splitlearn_comm._core.CodecError",
      "A codec failed, or a tensor arrived in a codec this side does not know.",
      PyExc_ValueError, NULL);
  if (st->codec_error == NULL) return -1;
  if (PyModule_AddObjectRef(m, "CodecError", st->codec_error) < 0) return -1;
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
  if (slpy_tensor_types_init(st, m) < 0) return -1;
  if (PyModule_AddIntConstant(m, "DEFAULT_MAX_TENSORS", SL_DEFAULT_MAX_TENSORS) < 0) return -1;
  {
    /* how a request's tensors travel (sl_transport), in its order */
    PyObject *names = PyTuple_New(SL_TRANSPORT_COUNT);
    int rc;
    for (int t = 0; names != NULL && t < SL_TRANSPORT_COUNT; t++) {
      PyObject *name = PyUnicode_InternFromString(sl_transport_name(t));
      if (name == NULL) Py_CLEAR(names);
      else PyTuple_SET_ITEM(names, t, name);
    }
    if (names == NULL) return -1;
    rc = PyModule_AddObjectRef(m, "TRANSPORTS", names);
    Py_DECREF(names);
    if (rc < 0) return -1;
  }
  /* the policies that live in the core, for the Python layer to use, not copy */
  if (PyModule_AddStringConstant(m, "METHOD_COMPUTE", SL_METHOD_PATH_COMPUTE) < 0 ||
      PyModule_AddStringConstant(m, "METHOD_BACKWARD", SL_METHOD_PATH_BACKWARD) < 0 ||
      PyModule_AddStringConstant(m, "METHOD_HEALTH", SL_METHOD_PATH_HEALTH) < 0 ||
      PyModule_AddStringConstant(m, "METHOD_INFO", SL_METHOD_PATH_INFO) < 0 ||
      PyModule_AddStringConstant(m, "METHOD_COMPUTE_STREAM", SL_METHOD_PATH_COMPUTE_STREAM) < 0 ||
      PyModule_AddStringConstant(m, "METHOD_BACKWARD_STREAM", SL_METHOD_PATH_BACKWARD_STREAM) < 0 ||
      PyModule_AddStringConstant(m, "BUILTIN_CODECS", sl_codec_builtin_names()) < 0 ||
      PyModule_AddStringConstant(m, "DTYPES", sl_dtype_names()) < 0) {
    return -1;
  }
  {
    PyObject *codes = PyList_New(0);
    int rc = codes != NULL ? 0 : -1;
    for (int c = 1; rc == 0 && c <= 16; c++) {
      if (sl_retry_code_is_retryable(c)) {
        PyObject *v = PyLong_FromLong(c);
        rc = v != NULL ? PyList_Append(codes, v) : -1;
        Py_XDECREF(v);
      }
    }
    if (rc == 0) rc = PyModule_AddObjectRef(m, "RETRYABLE_CODES", codes);
    Py_XDECREF(codes);
    if (rc < 0) return -1;
  }
  if (PyModule_AddIntConstant(m, "DEFAULT_MAX_DEPTH", SL_DEFAULT_MAX_DEPTH) < 0) return -1;
  if (PyModule_AddIntConstant(m, "MAX_MESSAGE_BYTES", (long)SL_MAX_MESSAGE_BYTES) < 0) return -1;
  if (PyModule_AddIntConstant(m, "STREAM_THRESHOLD", (long)SL_STREAM_THRESHOLD_DEFAULT) < 0 ||
      PyModule_AddIntConstant(m, "STREAM_CHUNK", (long)SL_STREAM_CHUNK_DEFAULT) < 0) {
    return -1;
  }
  if (PyModule_AddIntConstant(m, "MAX_NDIM", SL_MAX_NDIM) < 0) return -1;
  {
    PyObject *v = PyFloat_FromDouble(SL_BUSY_POLL_DEFAULT);
    int rc = v != NULL ? PyModule_AddObjectRef(m, "BUSY_POLL", v) : -1;
    Py_XDECREF(v);
    if (rc < 0) return -1;
  }
  return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
  slpy_state *st = slpy_state_of_module(m);
  Py_VISIT(st->holder_type);
  Py_VISIT(st->server_type);
  Py_VISIT(st->client_type);
  Py_VISIT(st->codec_type);
  Py_VISIT(st->callstate_type);
  Py_VISIT(st->breaker_type);
  Py_VISIT(st->stats_type);
  Py_VISIT(st->leaf_type);
  Py_VISIT(st->out_type);
  Py_VISIT(st->reply_type);
  Py_VISIT(st->call_type);
  Py_VISIT(st->call_error);
  Py_VISIT(st->codec_error);
  Py_VISIT(st->codecs_type);
  Py_VISIT(st->export_slow);
  Py_VISIT(st->torch_tensor);
  Py_VISIT(st->to_dlpack);
  return 0;
}

static int module_clear(PyObject *m) {
  slpy_state *st = slpy_state_of_module(m);
  Py_CLEAR(st->holder_type);
  Py_CLEAR(st->server_type);
  Py_CLEAR(st->client_type);
  Py_CLEAR(st->codec_type);
  Py_CLEAR(st->callstate_type);
  Py_CLEAR(st->breaker_type);
  Py_CLEAR(st->stats_type);
  Py_CLEAR(st->leaf_type);
  Py_CLEAR(st->out_type);
  Py_CLEAR(st->reply_type);
  Py_CLEAR(st->call_type);
  Py_CLEAR(st->call_error);
  Py_CLEAR(st->codec_error);
  Py_CLEAR(st->codecs_type);
  Py_CLEAR(st->export_slow);
  Py_CLEAR(st->torch_tensor);
  Py_CLEAR(st->to_dlpack);
  Py_CLEAR(st->str_torch);
  Py_CLEAR(st->str_is_conj);
  Py_CLEAR(st->str_is_neg);
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
