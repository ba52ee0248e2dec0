/* server_py.c: _core.Server, the Python face of sl_server.
 *
 * Server(*, compute, info, host, port, max_workers, version, options=None, codec=None,
 *        codecs=None, auth_tokens=None, tls=None, intercept=None, max_decoded_bytes=0,
 *        max_tensors=0, max_depth=0, convert=None)          (keywords only)
 *   compute(call: _core.Call) -> (leaves, compute_time_ms, trailing, form, nodes):
 *     called on a C worker thread with the GIL. With convert (a callable taking a
 *     DLPack capsule, e.g. torch._C._from_dlpack) `call.value` is the object the
 *     tensors were sent as, rebuilt in C, and `call.values` the converted tensors
 *     (leaves and nodes are None); without it `call.leaves` are _core.Leaf
 *     objects, each tensor a DLPackTensor already decoded by the core (built-in
 *     codecs in C, Python codecs through their trampolines: codec_py.c). The
 *     results are OutTensor objects, as Client.compute takes them; the core
 *     encodes them after the callback returns.
 *     An exception becomes the call's status: INTERNAL with "Type: message", or the
 *     exception's `sl_code` / `sl_details` attributes when it has them.
 *   info() -> (service_name, device, {str: str})
 *   codec: the _core.Codec of responses (None: the request's); codecs: the
 *     _core.Codecs of the Python codecs requests may use.
 */
#include <stdatomic.h>

#include "server.h"
#include "slpy.h"

typedef struct server_obj {
  PyObject_HEAD
  sl_server *server;
  PyObject *compute; /* strong */
  PyObject *info;    /* strong */
  PyObject *codec;   /* strong: the response _core.Codec, or None */
  PyObject *intercept; /* strong: interceptor chain callable, or None */
  PyObject *convert;   /* strong: what wraps a received tensor's capsule, or None */
  slpy_state *st;
  PyTypeObject *holder_type; /* strong */
  /* The last call's method, peer and invocation metadata as Python objects
   * (strong, or NULL), reused while the next call's text is the same, as it is
   * for the calls of one connection: str and tuples of str are immutable, so
   * calls may share them. Read and replaced with the GIL held. */
  PyObject *last_method, *last_peer, *last_metadata;
} server_obj;

/* ---- CallState: a call's liveness, for current_call().is_active() ---- */

typedef struct callstate_obj {
  PyObject_HEAD
  void *state;          /* the core's call state; NULL once the hook returned (or, for a
                           deferred call, once it was completed) */
  sl_pending *pending;  /* the call, while its hook may defer it or it is deferred */
  slpy_state *st;
  int deferred;         /* defer() was called: the result comes with complete()/fail() */
  PyObject *server;     /* strong while deferred: the server outlives its deferred calls */
} callstate_obj;

static PyObject *callstate_is_active(callstate_obj *self, PyObject *unused) {
  (void)unused;
  /* polls the call's own completion queue: one thread at a time (the serving
     thread, or the server's event loop for a deferred call) */
  if (self->state == NULL) Py_RETURN_FALSE;
  return PyBool_FromLong(sl_call_is_active(self->state));
}

static void add_trailing(void *state, PyObject *pairs);
static void error_from_exception(sl_err *err, void *state);

static int callstate_check_deferred(callstate_obj *self) {
  if (!self->deferred || self->pending == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "this call is not deferred, or was already completed");
    return -1;
  }
  return 0;
}

/* defer(): the hook returns without a result; complete() or fail() gives it later
 * (from any thread, e.g. the server's event loop). */
static PyObject *callstate_defer(callstate_obj *self, PyObject *unused) {
  (void)unused;
  if (self->pending == NULL || self->deferred) {
    PyErr_SetString(PyExc_RuntimeError, "this call cannot be deferred");
    return NULL;
  }
  self->deferred = 1;
  Py_RETURN_NONE;
}

/* fail(exception): end a deferred call with the status the exception maps to. */
static PyObject *callstate_fail(callstate_obj *self, PyObject *exc) {
  sl_err err;
  sl_pending *p;
  if (callstate_check_deferred(self) < 0) return NULL;
  if (!PyExceptionInstance_Check(exc)) {
    PyErr_SetString(PyExc_TypeError, "fail() takes an exception");
    return NULL;
  }
  PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
  sl_err_clear(&err);
  error_from_exception(&err, self->state);
  p = self->pending;
  self->pending = NULL;
  self->state = NULL;
  sl_pending_complete(p, SL_EUSER, &err, NULL, NULL, NULL, 0);
  Py_CLEAR(self->server);
  Py_RETURN_NONE;
}

/* complete(leaves, compute_time_ms, trailing, form, nodes): end a deferred call
 * with its result, given as the compute callback would return it. */
static PyObject *callstate_complete(callstate_obj *self, PyObject *args) {
  PyObject *leaves, *trailing = Py_None, *nodes = Py_None;
  double ms = 0;
  int form = 0;
  sl_tensor_set out;
  slpy_setbuf *buf = NULL;
  sl_pending *p;
  if (!PyArg_ParseTuple(args, "Od|OiO", &leaves, &ms, &trailing, &form, &nodes)) return NULL;
  if (callstate_check_deferred(self) < 0) return NULL;
  add_trailing(self->state, trailing);
  memset(&out, 0, sizeof(out));
  if (slpy_set_from_python(self->st, leaves, form, nodes, &out, &buf) < 0) {
    sl_err err;
    sl_err_clear(&err);
    error_from_exception(&err, self->state);
    p = self->pending;
    self->pending = NULL;
    self->state = NULL;
    sl_pending_complete(p, SL_EUSER, &err, NULL, NULL, NULL, 0);
    Py_CLEAR(self->server);
    Py_RETURN_NONE;
  }
  p = self->pending;
  self->pending = NULL;
  self->state = NULL;
  sl_pending_complete(p, SL_OK, NULL, &out, slpy_setbuf_free, buf, (float)ms);
  Py_CLEAR(self->server);
  Py_RETURN_NONE;
}

static void callstate_dealloc(callstate_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  if (self->deferred && self->pending != NULL) {
    /* dropped without a result: the client must not wait forever */
    sl_err err;
    sl_err_set(&err, SL_EUSER, SL_STATUS_INTERNAL,
               "the asynchronous compute ended without a result");
    sl_pending_complete(self->pending, SL_EUSER, &err, NULL, NULL, NULL, 0);
  }
  Py_CLEAR(self->server);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static PyMethodDef callstate_methods[] = {
    {"is_active", (PyCFunction)callstate_is_active, METH_NOARGS,
     "False once the call was cancelled or its deadline passed."},
    {"defer", (PyCFunction)callstate_defer, METH_NOARGS,
     "Answer this call later with complete() or fail() (asynchronous compute)."},
    {"complete", (PyCFunction)callstate_complete, METH_VARARGS,
     "complete(leaves, compute_time_ms, trailing=None, form=0, nodes=None): answer a "
     "deferred call with what the compute callback would have returned."},
    {"fail", (PyCFunction)callstate_fail, METH_O,
     "fail(exception): end a deferred call with the exception's status."},
    {NULL, NULL, 0, NULL}};

static PyType_Slot callstate_slots[] = {
    {Py_tp_dealloc, callstate_dealloc},
    {Py_tp_methods, callstate_methods},
    {Py_tp_doc, "The liveness of the call being served (internal)."},
    {0, NULL}};

PyType_Spec slpy_callstate_spec = {
    .name = "splitlearn_comm._core.CallState",
    .basicsize = sizeof(callstate_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = callstate_slots,
};

static PyObject *callstate_new(slpy_state *st, void *state) {
  callstate_obj *o = PyObject_New(callstate_obj, st->callstate_type);
  if (o != NULL) {
    o->state = state;
    o->pending = NULL;
    o->st = st;
    o->deferred = 0;
    o->server = NULL;
  }
  return (PyObject *)o;
}

/* The hook returned: a call it did not defer can no longer be touched. Returns 1
 * when the call was deferred (the object stays live until completed). */
static int callstate_end(PyObject *o) {
  callstate_obj *c = (callstate_obj *)o;
  if (c == NULL) return 0;
  if (c->deferred) return 1;
  c->state = NULL;
  c->pending = NULL;
  return 0;
}

/* ---- the text of a call, reused from the last call (server_obj.last_*) ---- */

/* Whether `o` (str or bytes) holds exactly the n bytes at s (str: as UTF-8). */
static int same_text(PyObject *o, const char *s, size_t n) {
  const char *u;
  Py_ssize_t len;
  if (PyBytes_Check(o)) {
    u = PyBytes_AS_STRING(o);
    len = PyBytes_GET_SIZE(o);
  } else {
    u = PyUnicode_AsUTF8AndSize(o, &len);
    if (u == NULL) {
      PyErr_Clear();
      return 0;
    }
  }
  return (size_t)len == n && memcmp(u, s, n) == 0;
}

/* A str of `s` (new reference): *slot again when it holds the same text, else a
 * new one, which replaces it. NULL with an exception when s is not UTF-8. */
static PyObject *cached_str(PyObject **slot, const char *s) {
  size_t n = strlen(s);
  PyObject *o;
  if (*slot != NULL && same_text(*slot, s, n)) return Py_NewRef(*slot);
  o = PyUnicode_FromStringAndSize(s, (Py_ssize_t)n);
  if (o != NULL) Py_XSETREF(*slot, Py_NewRef(o));
  return o;
}

/* slpy_metadata_tuple(kv, n) (new reference), or *slot again when it was made
 * from the same keys and values (the same bytes give the same str or bytes). */
static PyObject *cached_metadata(PyObject **slot, const sl_kv *kv, size_t n) {
  PyObject *t = *slot;
  if (t != NULL && PyTuple_GET_SIZE(t) == (Py_ssize_t)n) {
    size_t i;
    for (i = 0; i < n; i++) {
      PyObject *pair = PyTuple_GET_ITEM(t, (Py_ssize_t)i);
      if (!same_text(PyTuple_GET_ITEM(pair, 0), kv[i].key, strlen(kv[i].key)) ||
          !same_text(PyTuple_GET_ITEM(pair, 1), kv[i].value, kv[i].value_len)) {
        break;
      }
    }
    if (i == n) return Py_NewRef(t);
  }
  t = slpy_metadata_tuple(kv, n);
  if (t != NULL) Py_XSETREF(*slot, Py_NewRef(t));
  return t;
}

/* Whether a call's fields are all unset (no training, model, session or
 * optimizer field): its Call then carries fields=None rather than a dict. */
static int fields_unset(const sl_call_fields *f) {
  return f->forward_id == NULL && (f->model_id == NULL || f->model_id[0] == '\0') &&
         f->training_mode < 0 && !f->has_learning_rate && !f->has_accumulation_step &&
         f->backward_seq <= 1 && f->session_id == NULL;
}

/* ---- hooks: called without the GIL, on the core's worker threads ---- */

/* Keep a Python thread state for the worker's whole life, so each call only
 * swaps the GIL instead of creating and destroying a thread state. */
static void hook_worker_start(void *user) {
  (void)user;
  if (slpy_is_finalizing()) return;
  PyGILState_Ensure();
  PyEval_SaveThread();
}

static void hook_worker_stop(void *user) {
  PyThreadState *ts;
  (void)user;
  if (slpy_is_finalizing()) return; /* leak the thread state rather than touch a dying runtime */
  ts = PyGILState_GetThisThreadState();
  if (ts == NULL) return;
  PyEval_RestoreThread(ts);
  PyGILState_Release(PyGILState_UNLOCKED);
}

/* Send `pairs` (a sequence of (str, str | bytes)) as the call's trailing metadata.
 * Bad items are skipped (the Python layer validates keys); clears any error. */
static void add_trailing(void *state, PyObject *pairs) {
  PyObject *seq;
  if (state == NULL || pairs == NULL || pairs == Py_None) return;
  seq = PySequence_Fast(pairs, "trailing metadata must be a sequence");
  if (seq == NULL) {
    PyErr_Clear();
    return;
  }
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
    PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
    const char *key, *value = NULL;
    Py_ssize_t len = 0;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) continue;
    key = PyUnicode_Check(PyTuple_GET_ITEM(item, 0)) ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0))
                                                     : NULL;
    if (PyUnicode_Check(PyTuple_GET_ITEM(item, 1))) {
      value = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(item, 1), &len);
    } else if (PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
      value = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 1));
      len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 1));
    }
    if (key != NULL && value != NULL) sl_call_add_trailing(state, key, value, (size_t)len);
  }
  Py_DECREF(seq);
  PyErr_Clear();
}

/* Fill `err` from the pending Python exception and clear it; its `sl_trailing`
 * (if any) becomes the call's trailing metadata. */
static void error_from_exception(sl_err *err, void *state) {
  PyObject *type = NULL, *exc = NULL, *tb = NULL;
  PyObject *code = NULL, *details = NULL;
  char msg[SL_ERR_MSG_MAX];
  int grpc_code = SL_STATUS_INTERNAL;

  PyErr_Fetch(&type, &exc, &tb);
  PyErr_NormalizeException(&type, &exc, &tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  if (exc == NULL) {
    sl_err_set(err, SL_EUSER, grpc_code, "unknown error");
    return;
  }
  {
    PyObject *trailing = PyObject_GetAttrString(exc, "sl_trailing");
    if (trailing != NULL) add_trailing(state, trailing);
    Py_XDECREF(trailing);
    PyErr_Clear();
  }
  code = PyObject_GetAttrString(exc, "sl_code");
  if (code != NULL && PyLong_Check(code)) {
    long c = PyLong_AsLong(code);
    if (c > 0 && c <= 16) grpc_code = (int)c;
  }
  PyErr_Clear();
  details = PyObject_GetAttrString(exc, "sl_details");
  if (details != NULL && PyUnicode_Check(details) && PyUnicode_AsUTF8(details) != NULL) {
    snprintf(msg, sizeof(msg), "%s", PyUnicode_AsUTF8(details));
  } else {
    PyErr_Clear();
    slpy_format_exception(exc, msg, sizeof(msg));
  }
  sl_err_set(err, SL_EUSER, grpc_code, "%s", msg);
  Py_XDECREF(code);
  Py_XDECREF(details);
  Py_XDECREF(exc);
  PyErr_Clear();
}

/* The training fields of a call as a dict (None for unset ones). */
static PyObject *fields_dict(const sl_call_fields *f) {
  PyObject *fid = f->forward_id ? PyUnicode_FromString(f->forward_id) : Py_NewRef(Py_None);
  PyObject *mid = f->model_id && f->model_id[0] ? PyUnicode_FromString(f->model_id)
                                                : Py_NewRef(Py_None);
  PyObject *tm = f->training_mode < 0 ? Py_NewRef(Py_None) : PyBool_FromLong(f->training_mode);
  PyObject *lr = f->has_learning_rate ? PyFloat_FromDouble(f->learning_rate) : Py_NewRef(Py_None);
  PyObject *acc =
      f->has_accumulation_step ? PyLong_FromLong(f->accumulation_step) : Py_NewRef(Py_None);
  PyObject *d = NULL;
  if (fid && mid && tm && lr && acc) {
    d = Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:i}", "forward_id", fid, "model_id", mid,
                      "training_mode", tm, "learning_rate", lr, "accumulation_step", acc,
                      "backward_seq", f->backward_seq > 0 ? (int)f->backward_seq : 1);
  }
  Py_XDECREF(fid);
  Py_XDECREF(mid);
  Py_XDECREF(tm);
  Py_XDECREF(lr);
  Py_XDECREF(acc);
  if (d != NULL && f->session_id != NULL) { /* session keys only in a session's calls */
    PyObject *sid = PyUnicode_FromString(f->session_id);
    PyObject *step = PyLong_FromLongLong((long long)f->session_step);
    if (sid == NULL || step == NULL || PyDict_SetItemString(d, "session_id", sid) < 0 ||
        PyDict_SetItemString(d, "session_step", step) < 0 ||
        PyDict_SetItemString(d, "session_close", f->session_close ? Py_True : Py_False) < 0) {
      Py_CLEAR(d);
    }
    Py_XDECREF(sid);
    Py_XDECREF(step);
  }
  return d;
}

/* Called without the GIL. The Python callback gets one _core.Call and returns
 * (leaves, compute_time_ms, trailing, form, nodes): leaves a sequence of
 * OutTensor, form and nodes as in Client.compute. */
static int hook_compute(void *user, const sl_call_info *call, sl_compute_args *args, sl_err *err) {
  server_obj *self = user;
  PyGILState_STATE g;
  PyObject *leaves = NULL, *nodes = NULL, *md = NULL, *reqmd = NULL, *deadline = NULL;
  PyObject *rid = NULL, *ret = NULL, *cstate = NULL, *fields = NULL, *pycall = NULL;
  PyObject *value = NULL, *values = NULL;
  slpy_setbuf *buf = NULL;
  double ms = 0;
  int status = SL_EUSER, form = 0;

  if (slpy_is_finalizing()) {
    return sl_err_set(err, SL_ESTATE, SL_STATUS_UNAVAILABLE, "the server is shutting down");
  }
  {
    double before = sl_now();
    g = PyGILState_Ensure();
    args->queue_seconds = sl_now() - before;
  }
  /* the leaves (or the converted tensors) take the tensors' storage (freed with
   * them, even on failure) */
  if (self->convert != NULL && self->convert != Py_None) {
    if (slpy_msg_to_value(args->tensor, self->convert, &value, &values) < 0) goto pyerror;
    leaves = Py_NewRef(Py_None);
    nodes = Py_NewRef(Py_None);
  } else {
    if (slpy_msg_to_python(self->st, args->tensor, &leaves, &nodes) < 0) goto pyerror;
    value = Py_NewRef(Py_None);
    values = Py_NewRef(Py_None);
  }
  md = cached_metadata(&self->last_metadata, call->metadata, call->n_metadata);
  reqmd = PyDict_New();
  if (md == NULL || reqmd == NULL) goto pyerror;
  for (size_t i = 0; i < args->n_req_metadata; i++) {
    PyObject *v = PyUnicode_FromString(args->req_metadata[i].value);
    if (v == NULL || PyDict_SetItemString(reqmd, args->req_metadata[i].key, v) < 0) {
      Py_XDECREF(v);
      goto pyerror;
    }
    Py_DECREF(v);
  }
  deadline = call->deadline > 0 ? PyFloat_FromDouble(call->deadline) : Py_NewRef(Py_None);
  rid = args->has_request_id ? PyLong_FromLong(args->request_id) : Py_NewRef(Py_None);
  cstate = callstate_new(self->st, call->state);
  fields = fields_unset(&args->fields) ? Py_NewRef(Py_None) : fields_dict(&args->fields);
  pycall = PyStructSequence_New(self->st->call_type);
  if (deadline == NULL || rid == NULL || cstate == NULL || fields == NULL || pycall == NULL) {
    goto pyerror;
  }
  {
    PyObject *v[16];
    v[0] = PyLong_FromLong(args->tensor->form);
    v[1] = Py_NewRef(leaves);
    v[2] = Py_NewRef(nodes);
    v[3] = PyLong_FromSize_t(args->tensor->n_kv);
    v[4] = PyBool_FromLong(args->backward);
    v[5] = cached_str(&self->last_method, call->method);
    v[6] = cached_str(&self->last_peer, call->peer);
    v[7] = Py_NewRef(md);
    v[8] = Py_NewRef(reqmd);
    v[9] = Py_NewRef(deadline);
    v[10] = Py_NewRef(rid);
    v[11] = Py_NewRef(cstate);
    v[12] = Py_NewRef(fields);
    v[13] = args->fields.has_use_cache ? PyBool_FromLong(args->fields.use_cache)
                                       : Py_NewRef(Py_None);
    v[14] = Py_NewRef(value);
    v[15] = Py_NewRef(values);
    for (int i = 0; i < 16; i++) {
      if (v[i] == NULL) {
        for (int j = i; j < 16; j++) Py_XDECREF(v[j]);
        goto pyerror;
      }
      PyStructSequence_SetItem(pycall, i, v[i]);
    }
  }
  ((callstate_obj *)cstate)->pending = args->pending;
  ret = PyObject_CallOneArg(self->compute, pycall);
  if (((callstate_obj *)cstate)->deferred) {
    /* an asynchronous compute: its result comes with CallState.complete/fail */
    if (((callstate_obj *)cstate)->pending != NULL) {
      ((callstate_obj *)cstate)->server = Py_NewRef((PyObject *)self);
    }
    if (ret == NULL) PyErr_WriteUnraisable(self->compute);
    status = SL_EAGAIN;
    goto cleanup;
  }
  if (ret == NULL) goto pyerror;
  if (!PyTuple_Check(ret) || PyTuple_GET_SIZE(ret) != 5) {
    PyErr_SetString(PyExc_TypeError,
                    "internal: the compute callback must return (leaves, ms, trailing, form, nodes)");
    goto pyerror;
  }
  add_trailing(call->state, PyTuple_GET_ITEM(ret, 2));
  ms = PyFloat_AsDouble(PyTuple_GET_ITEM(ret, 1));
  if (ms == -1.0 && PyErr_Occurred()) goto pyerror;
  form = (int)PyLong_AsLong(PyTuple_GET_ITEM(ret, 3));
  if (form == -1 && PyErr_Occurred()) goto pyerror;
  if (slpy_set_from_python(self->st, PyTuple_GET_ITEM(ret, 0), form, PyTuple_GET_ITEM(ret, 4),
                           &args->out, &buf) < 0) {
    goto pyerror;
  }
  args->out_free = slpy_setbuf_free;
  args->out_owner = buf;
  args->compute_time_ms = (float)ms;
  status = SL_OK;
  goto cleanup;
pyerror:
  error_from_exception(err, call->state);
cleanup:
  callstate_end(cstate);
  Py_XDECREF(pycall);
  Py_XDECREF(cstate);
  Py_XDECREF(fields);
  Py_XDECREF(ret);
  Py_XDECREF(rid);
  Py_XDECREF(deadline);
  Py_XDECREF(reqmd);
  Py_XDECREF(md);
  Py_XDECREF(nodes);
  Py_XDECREF(leaves);
  Py_XDECREF(values);
  Py_XDECREF(value);
  PyGILState_Release(g);
  return status;
}

static char *dup_utf8(PyObject *o) {
  const char *s;
  Py_ssize_t n;
  PyObject *str = PyObject_Str(o);
  char *out;
  if (str == NULL) return NULL;
  s = PyUnicode_AsUTF8AndSize(str, &n);
  out = s ? sl_strndup(s, (size_t)n) : NULL;
  if (s != NULL && out == NULL) PyErr_NoMemory();
  Py_DECREF(str);
  return out;
}

/* Called without the GIL. */
static int hook_info(void *user, sl_service_info *out, sl_err *err) {
  server_obj *self = user;
  PyGILState_STATE g;
  PyObject *ret = NULL, *items = NULL;
  int status = SL_EUSER;

  if (slpy_is_finalizing()) {
    return sl_err_set(err, SL_ESTATE, SL_STATUS_UNAVAILABLE, "the server is shutting down");
  }
  g = PyGILState_Ensure();
  ret = PyObject_CallNoArgs(self->info);
  if (ret == NULL) goto pyerror;
  if (!PyTuple_Check(ret) || PyTuple_GET_SIZE(ret) != 3 || !PyDict_Check(PyTuple_GET_ITEM(ret, 2))) {
    PyErr_SetString(PyExc_TypeError, "internal: info callback must return (name, device, dict)");
    goto pyerror;
  }
  out->service_name = dup_utf8(PyTuple_GET_ITEM(ret, 0));
  out->device = dup_utf8(PyTuple_GET_ITEM(ret, 1));
  if (out->service_name == NULL || out->device == NULL) goto pyerror;
  items = PyDict_Items(PyTuple_GET_ITEM(ret, 2));
  if (items == NULL) goto pyerror;
  out->custom = calloc((size_t)PyList_GET_SIZE(items) + 1, sizeof(*out->custom));
  if (out->custom == NULL) {
    PyErr_NoMemory();
    goto pyerror;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
    PyObject *kv = PyList_GET_ITEM(items, i);
    out->custom[i].key = dup_utf8(PyTuple_GET_ITEM(kv, 0));
    out->custom[i].value = out->custom[i].key ? dup_utf8(PyTuple_GET_ITEM(kv, 1)) : NULL;
    out->n_custom = (size_t)i + 1;
    if (out->custom[i].value == NULL) goto pyerror;
    out->custom[i].value_len = strlen(out->custom[i].value);
  }
  status = SL_OK;
  goto cleanup;
pyerror:
  error_from_exception(err, NULL);
  {
    char inner[SL_ERR_MSG_MAX];
    memcpy(inner, err->msg, sizeof(inner));
    sl_err_set(err, SL_EUSER, err->code, "get_info() failed: %.400s", inner);
  }
cleanup:
  Py_XDECREF(items);
  Py_XDECREF(ret);
  PyGILState_Release(g);
  return status;
}

/* Called without the GIL: run the interceptors for one call. */
static int hook_intercept(void *user, const sl_call_info *call, sl_err *err) {
  server_obj *self = user;
  PyGILState_STATE g;
  PyObject *md = NULL, *deadline = NULL, *ret = NULL, *cstate = NULL;
  PyObject *method = NULL, *peer = NULL;
  int status = SL_EUSER;

  if (slpy_is_finalizing()) {
    return sl_err_set(err, SL_ESTATE, SL_STATUS_UNAVAILABLE, "the server is shutting down");
  }
  g = PyGILState_Ensure();
  md = cached_metadata(&self->last_metadata, call->metadata, call->n_metadata);
  method = cached_str(&self->last_method, call->method);
  peer = cached_str(&self->last_peer, call->peer);
  deadline = call->deadline > 0 ? PyFloat_FromDouble(call->deadline) : Py_NewRef(Py_None);
  cstate = callstate_new(self->st, call->state);
  if (md == NULL || method == NULL || peer == NULL || deadline == NULL || cstate == NULL) {
    goto pyerror;
  }
  ret = PyObject_CallFunctionObjArgs(self->intercept, method, peer, md, deadline, cstate, NULL);
  if (ret == NULL) goto pyerror;
  status = SL_OK;
  goto cleanup;
pyerror:
  error_from_exception(err, call->state);
cleanup:
  callstate_end(cstate);
  Py_XDECREF(cstate);
  Py_XDECREF(ret);
  Py_XDECREF(deadline);
  Py_XDECREF(md);
  Py_XDECREF(peer);
  Py_XDECREF(method);
  PyGILState_Release(g);
  return status;
}

/* Parse auth tokens (None or a sequence of str) into borrowed UTF-8 pointers. */
static int parse_tokens(PyObject *tokens, PyObject **seq, const char ***out, size_t *n) {
  *seq = NULL;
  *out = NULL;
  *n = 0;
  if (tokens == Py_None) return 0;
  *seq = PySequence_Fast(tokens, "auth_tokens must be a sequence of str");
  if (*seq == NULL) return -1;
  *out = PyMem_Calloc((size_t)PySequence_Fast_GET_SIZE(*seq) + 1, sizeof(char *));
  if (*out == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(*seq); i++) {
    PyObject *t = PySequence_Fast_GET_ITEM(*seq, i);
    if (!PyUnicode_Check(t) || PyUnicode_GET_LENGTH(t) == 0) {
      PyErr_SetString(PyExc_TypeError, "auth_tokens must be non-empty str");
      return -1;
    }
    (*out)[i] = PyUnicode_AsUTF8(t);
    if ((*out)[i] == NULL) return -1;
  }
  *n = (size_t)PySequence_Fast_GET_SIZE(*seq);
  return 0;
}

/* ---- the type ---- */

/* Server(*, compute, info, host, port, max_workers, version, options=None, codec=None,
 *        codecs=None, auth_tokens=None, tls=None, intercept=None, max_decoded_bytes=0,
 *        max_tensors=0, max_depth=0, convert=None): keywords only. convert: a callable
 *        given each received tensor's DLPack capsule (torch._C._from_dlpack); with it
 *        the Call carries value and values instead of leaves and nodes. */
static int server_init(server_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"compute", "info", "host", "port", "max_workers", "version", "options",
                           "codec", "codecs", "auth_tokens", "tls", "intercept",
                           "max_decoded_bytes", "max_tensors", "max_depth", "convert", NULL};
  PyObject *compute = NULL, *info = NULL, *options = Py_None, *codec = Py_None;
  PyObject *convert = Py_None;
  PyObject *codecs = Py_None;
  PyObject *tokens = Py_None, *tls = Py_None, *intercept = Py_None, *token_seq = NULL;
  const char **token_ptrs = NULL;
  size_t n_tokens = 0;
  sl_tls_server tls_cfg;
  Py_ssize_t max_decoded = 0, max_tensors = 0;
  int max_depth = 0;
  const sl_codec *ccodec;
  sl_codecs *ccodecs;
  int cerr = 0;
  const char *host = NULL, *version = "";
  int port = -1, max_workers = 0;
  sl_chan_arg *chargs = NULL;
  size_t nchargs = 0;
  sl_server_config cfg;
  sl_server_hooks hooks = {hook_worker_start, hook_worker_stop, hook_compute, hook_info, NULL};
  sl_err err;
  int rc;

  if (self->server != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Server.__init__ called twice");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOsiisOOOOOOnniO", kwlist, &compute, &info,
                                   &host, &port, &max_workers, &version, &options, &codec,
                                   &codecs, &tokens, &tls, &intercept, &max_decoded,
                                   &max_tensors, &max_depth, &convert)) {
    return -1;
  }
  if (compute == NULL || info == NULL || host == NULL || port < 0 || max_workers <= 0) {
    PyErr_SetString(PyExc_TypeError, "Server() needs compute, info, host, port and max_workers "
                                     "(keywords)");
    return -1;
  }
  memset(&tls_cfg, 0, sizeof(tls_cfg));
  if (tls != Py_None &&
      !PyArg_ParseTuple(tls, "sszp;tls must be (cert_chain, private_key, root_certs, require)",
                        &tls_cfg.cert_chain, &tls_cfg.private_key, &tls_cfg.root_certs,
                        &tls_cfg.require_client_auth)) {
    return -1;
  }
  if (intercept != Py_None && !PyCallable_Check(intercept)) {
    PyErr_SetString(PyExc_TypeError, "intercept must be callable or None");
    return -1;
  }
  if (convert != Py_None && !PyCallable_Check(convert)) {
    PyErr_SetString(PyExc_TypeError, "convert must be callable or None");
    return -1;
  }
  if (parse_tokens(tokens, &token_seq, &token_ptrs, &n_tokens) < 0) {
    PyMem_Free(token_ptrs);
    Py_XDECREF(token_seq);
    return -1;
  }
  if (!PyCallable_Check(compute) || !PyCallable_Check(info)) {
    PyErr_SetString(PyExc_TypeError, "compute and info must be callable");
    goto early_fail;
  }
  self->st = slpy_state_of_type(Py_TYPE(self));
  if (self->st == NULL) goto early_fail;
  ccodec = slpy_codec_of(self->st, codec, &cerr);
  if (cerr) goto early_fail;
  ccodecs = slpy_codecs_of(self->st, codecs, &cerr);
  if (cerr) goto early_fail;
  if (slpy_parse_options(options, &chargs, &nchargs) < 0) goto early_fail;
  self->holder_type = (PyTypeObject *)Py_NewRef(self->st->holder_type);
  self->compute = Py_NewRef(compute);
  self->info = Py_NewRef(info);
  self->codec = Py_NewRef(codec);
  self->intercept = Py_NewRef(intercept);
  self->convert = Py_NewRef(convert);
  if (intercept != Py_None) hooks.intercept = hook_intercept;
  memset(&cfg, 0, sizeof(cfg));
  cfg.auth_tokens = token_ptrs;
  cfg.n_auth_tokens = n_tokens;
  cfg.tls = tls != Py_None ? &tls_cfg : NULL;
  cfg.max_decoded_bytes = max_decoded > 0 ? (size_t)max_decoded : 0;
  cfg.max_tensors = max_tensors > 0 ? (size_t)max_tensors : 0;
  cfg.max_depth = max_depth > 0 ? max_depth : 0;
  cfg.codec = (sl_codec *)ccodec; /* the server takes its own references */
  cfg.codecs = ccodecs;
  cfg.host = host;
  cfg.port = port;
  cfg.max_workers = max_workers;
  cfg.version = version;
  cfg.args = chargs;
  cfg.nargs = nchargs;
  sl_err_clear(&err);
  rc = sl_server_create(&cfg, &hooks, self, &self->server, &err);
  PyMem_Free(chargs);
  PyMem_Free(token_ptrs);
  Py_XDECREF(token_seq);
  if (rc != SL_OK) {
    PyErr_SetString(rc == SL_EINVAL ? PyExc_ValueError : PyExc_RuntimeError, err.msg);
    return -1;
  }
  return 0;
early_fail:
  PyMem_Free(token_ptrs);
  Py_XDECREF(token_seq);
  return -1;
}

static PyObject *server_start(server_obj *self, PyObject *unused) {
  sl_err err;
  int rc;
  (void)unused;
  if (self->server == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "server not initialised");
    return NULL;
  }
  sl_err_clear(&err);
  Py_BEGIN_ALLOW_THREADS
  rc = sl_server_start(self->server, &err);
  Py_END_ALLOW_THREADS
  if (rc != SL_OK) {
    PyErr_SetString(rc == SL_EINVAL ? PyExc_OSError : PyExc_RuntimeError, err.msg);
    return NULL;
  }
  return PyLong_FromLong(sl_server_port(self->server));
}

static PyObject *server_stop(server_obj *self, PyObject *arg) {
  double grace = PyFloat_AsDouble(arg);
  if (grace == -1.0 && PyErr_Occurred()) return NULL;
  if (self->server == NULL) Py_RETURN_NONE;
  Py_BEGIN_ALLOW_THREADS
  sl_server_stop(self->server, grace);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

/* wait(timeout or None) -> bool: True once stopped. Sliced, so Ctrl-C works. */
static PyObject *server_wait(server_obj *self, PyObject *arg) {
  double timeout = -1, end = 0;
  int rc = SL_ETIMEDOUT;
  if (arg != Py_None) {
    timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    end = sl_now() + timeout;
  }
  if (self->server == NULL) Py_RETURN_TRUE;
  for (;;) {
    double slice = 0.2;
    if (timeout >= 0) {
      double left = end - sl_now();
      if (left < slice) slice = left > 0 ? left : 0;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = sl_server_wait(self->server, slice);
    Py_END_ALLOW_THREADS
    if (rc == SL_OK) Py_RETURN_TRUE;
    if (PyErr_CheckSignals() < 0) return NULL;
    if (timeout >= 0 && sl_now() >= end) Py_RETURN_FALSE;
  }
}

static PyObject *server_get_port(server_obj *self, void *closure) {
  (void)closure;
  return PyLong_FromLong(self->server ? sl_server_port(self->server) : 0);
}

static PyObject *server_get_serving(server_obj *self, void *closure) {
  (void)closure;
  return PyBool_FromLong(self->server ? sl_server_is_serving(self->server) : 0);
}

/* set_health(serving: bool): what grpc.health.v1 reports while running. */
static PyObject *server_set_health(server_obj *self, PyObject *arg) {
  int serving = PyObject_IsTrue(arg);
  if (serving < 0) return NULL;
  if (self->server == NULL || sl_server_set_health(self->server, serving) != SL_OK) {
    PyErr_SetString(PyExc_RuntimeError, "the server is not running");
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *server_get_health(server_obj *self, void *closure) {
  (void)closure;
  return PyBool_FromLong(self->server ? sl_server_health(self->server) : 0);
}

static PyObject *server_get_health_watchers(server_obj *self, void *closure) {
  (void)closure;
  return PyLong_FromLong(self->server ? sl_server_health_watchers(self->server) : 0);
}

static PyObject *server_get_in_flight(server_obj *self, void *closure) {
  (void)closure;
  return PyLong_FromLong(self->server ? sl_server_in_flight(self->server) : 0);
}

static PyObject *server_shm_segments(server_obj *self, PyObject *unused) {
  long n = -1;
  (void)unused;
  if (self->server != NULL) {
    Py_BEGIN_ALLOW_THREADS
    n = sl_server_shm_segments(self->server);
    Py_END_ALLOW_THREADS
  }
  return PyLong_FromLong(n);
}

static PyObject *server_get_total(server_obj *self, void *closure) {
  (void)closure;
  return PyLong_FromLongLong(self->server ? sl_server_total_requests(self->server) : 0);
}

/* Stop and free the C server: its workers call the objects cleared next. */
static void server_release_core(server_obj *self) {
  if (self->server != NULL) {
    sl_server *s = self->server;
    self->server = NULL;
    /* workers may be waiting for the GIL inside a hook: release it while they end */
    Py_BEGIN_ALLOW_THREADS
    sl_server_destroy(s);
    Py_END_ALLOW_THREADS
  }
}

static int server_traverse(server_obj *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(self->compute);
  Py_VISIT(self->info);
  Py_VISIT(self->codec);
  Py_VISIT(self->intercept);
  Py_VISIT(self->convert);
  Py_VISIT(self->holder_type);
  Py_VISIT(self->last_method);
  Py_VISIT(self->last_peer);
  Py_VISIT(self->last_metadata);
  return 0;
}

/* Break cycles (the compute callable may refer back to the server's owner). The
 * C server goes first: no worker may call what is cleared here. */
static int server_clear(server_obj *self) {
  server_release_core(self);
  Py_CLEAR(self->compute);
  Py_CLEAR(self->info);
  Py_CLEAR(self->codec);
  Py_CLEAR(self->intercept);
  Py_CLEAR(self->convert);
  Py_CLEAR(self->holder_type);
  Py_CLEAR(self->last_method);
  Py_CLEAR(self->last_peer);
  Py_CLEAR(self->last_metadata);
  return 0;
}

static void server_dealloc(server_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  server_clear(self);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

/* ---- metrics and the access log ---- */

static PyObject *hist_dict(const sl_hist_snapshot *h) {
  PyObject *buckets = PyList_New(SL_HIST_BUCKETS + 1), *d;
  uint64_t cum = 0;
  if (buckets == NULL) return NULL;
  for (int b = 0; b <= SL_HIST_BUCKETS; b++) {
    PyObject *pair;
    cum += h->counts[b];
    pair = Py_BuildValue("(dK)", b < SL_HIST_BUCKETS ? sl_hist_bounds[b] : Py_HUGE_VAL,
                         (unsigned long long)cum);
    if (pair == NULL) {
      Py_DECREF(buckets);
      return NULL;
    }
    PyList_SET_ITEM(buckets, b, pair);
  }
  d = Py_BuildValue("{s:N,s:K,s:d}", "buckets", buckets, "count", (unsigned long long)h->count,
                    "sum", h->sum);
  return d;
}

/* {stage name: hist_dict} of one set of stage histograms. */
static PyObject *stages_dict(const sl_hist_snapshot *stages) {
  PyObject *d = PyDict_New();
  for (int st = 0; d != NULL && st < SL_STAGE_COUNT; st++) {
    PyObject *h = hist_dict(&stages[st]);
    if (h == NULL || PyDict_SetItemString(d, sl_stage_name(st), h) < 0) Py_CLEAR(d);
    Py_XDECREF(h);
  }
  return d;
}

/* metrics() -> dict: counters and histograms kept in C (no GIL on the call path). */
static PyObject *server_metrics(server_obj *self, PyObject *unused) {
  sl_metrics_snapshot m;
  PyObject *requests = NULL, *latency = NULL, *by_method = NULL, *transport = NULL;
  PyObject *result = NULL;
  (void)unused;
  if (self->server == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "server not initialised");
    return NULL;
  }
  sl_server_metrics(self->server, &m);
  requests = PyDict_New();
  latency = stages_dict(m.latency);
  by_method = PyDict_New();
  transport = PyDict_New();
  if (requests == NULL || latency == NULL || by_method == NULL || transport == NULL) goto cleanup;
  for (int k = 0; k < 2; k++) {
    PyObject *d = stages_dict(m.latency_by_method[k]);
    int rc = d ? PyDict_SetItemString(by_method,
                                      sl_metric_method_name(k ? SL_METHOD_BACKWARD
                                                              : SL_METHOD_COMPUTE),
                                      d)
               : -1;
    Py_XDECREF(d);
    if (rc < 0) goto cleanup;
  }
  for (int t = 0; t < SL_TRANSPORT_COUNT; t++) {
    PyObject *v = PyLong_FromUnsignedLongLong(m.transport[t]);
    int rc = v ? PyDict_SetItemString(transport, sl_transport_name(t), v) : -1;
    Py_XDECREF(v);
    if (rc < 0) goto cleanup;
  }
  for (int i = 0; i < SL_METHOD_COUNT; i++) {
    for (int c = 0; c < 17; c++) {
      PyObject *key, *v;
      int rc;
      if (m.requests[i][c] == 0) continue;
      key = Py_BuildValue("(ss)", sl_metric_method_name(i), sl_status_name(c));
      v = PyLong_FromUnsignedLongLong(m.requests[i][c]);
      rc = key && v ? PyDict_SetItem(requests, key, v) : -1;
      Py_XDECREF(key);
      Py_XDECREF(v);
      if (rc < 0) goto cleanup;
    }
  }
  result = Py_BuildValue("{s:O,s:O,s:L,s:O,s:O,s:K,s:K,s:K}", "requests", requests,
                         "requests_by_transport", transport, "in_flight",
                         (long long)m.in_flight, "latency_seconds", latency,
                         "latency_seconds_by_method", by_method, "request_bytes",
                         (unsigned long long)m.request_bytes, "response_bytes",
                         (unsigned long long)m.response_bytes, "access_log_dropped",
                         (unsigned long long)m.access_log_dropped);
cleanup:
  Py_XDECREF(requests);
  Py_XDECREF(latency);
  Py_XDECREF(by_method);
  Py_XDECREF(transport);
  return result;
}

static PyObject *server_access_log_enable(server_obj *self, PyObject *arg) {
  Py_ssize_t cap = PyLong_AsSsize_t(arg);
  if (cap == -1 && PyErr_Occurred()) return NULL;
  if (self->server == NULL || cap <= 0) {
    PyErr_SetString(PyExc_ValueError, "capacity must be positive");
    return NULL;
  }
  if (sl_server_access_log_enable(self->server, (size_t)cap) != SL_OK) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject *shape_list(int ndim, const int64_t *shape) {
  PyObject *l = PyList_New(0);
  if (l == NULL) return NULL;
  for (int i = 0; i < ndim && i < SL_RECORD_NDIM; i++) {
    PyObject *v = PyLong_FromLongLong(shape[i]);
    if (v == NULL || PyList_Append(l, v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(l);
      return NULL;
    }
    Py_DECREF(v);
  }
  return l;
}

static PyObject *record_dict(const sl_call_record *r) {
  PyObject *d = NULL, *durations = PyDict_New();
  PyObject *in_shape = NULL, *out_shape = NULL, *rid = NULL;
  if (durations == NULL) return NULL;
  for (int st = 0; st < SL_STAGE_COUNT; st++) {
    PyObject *v;
    if (!r->tensor_call && st != SL_STAGE_TOTAL) continue;
    v = PyFloat_FromDouble(r->stage[st] * 1e3);
    if (v == NULL || PyDict_SetItemString(durations, sl_stage_name(st), v) < 0) {
      Py_XDECREF(v);
      goto cleanup;
    }
    Py_DECREF(v);
  }
  in_shape = r->in_dtype ? shape_list(r->in_ndim, r->in_shape) : Py_NewRef(Py_None);
  out_shape = r->out_dtype ? shape_list(r->out_ndim, r->out_shape) : Py_NewRef(Py_None);
  rid = r->has_request_id ? PyLong_FromLong(r->request_id) : Py_NewRef(Py_None);
  if (in_shape == NULL || out_shape == NULL || rid == NULL) goto cleanup;
  d = Py_BuildValue("{s:d,s:s,s:s,s:s,s:O,s:z,s:O,s:z,s:O,s:z,s:z,s:K,s:K,s:O,s:z}", "time",
                    r->wall_time, "method", r->method_name, "peer", r->peer, "status",
                    sl_status_name(r->code), "request_id", rid, "forward_id", r->forward_id[0] ? r->forward_id : NULL,
                    "input_shape", in_shape, "input_dtype",
                    r->in_dtype ? sl_dtype_name(r->in_dtype) : NULL, "output_shape", out_shape,
                    "output_dtype", r->out_dtype ? sl_dtype_name(r->out_dtype) : NULL, "codec",
                    r->codec[0] ? r->codec : NULL, "bytes_in", (unsigned long long)r->bytes_in,
                    "bytes_out", (unsigned long long)r->bytes_out, "durations_ms", durations,
                    "transport",
                    r->method == SL_METHOD_COMPUTE || r->method == SL_METHOD_BACKWARD
                        ? sl_transport_name(r->transport)
                        : NULL);
cleanup:
  Py_XDECREF(in_shape);
  Py_XDECREF(out_shape);
  Py_XDECREF(rid);
  Py_DECREF(durations);
  return d;
}

/* take_access_log(max, timeout) -> list of dicts; waits without the GIL. */
static PyObject *server_take_access_log(server_obj *self, PyObject *args) {
  Py_ssize_t max;
  double timeout;
  sl_call_record *recs;
  size_t n;
  PyObject *list;
  if (!PyArg_ParseTuple(args, "nd", &max, &timeout)) return NULL;
  if (self->server == NULL || max <= 0) return PyList_New(0);
  recs = PyMem_RawMalloc((size_t)max * sizeof(*recs));
  if (recs == NULL) return PyErr_NoMemory();
  Py_BEGIN_ALLOW_THREADS
  n = sl_server_access_log_take(self->server, recs, (size_t)max, timeout);
  Py_END_ALLOW_THREADS
  list = PyList_New((Py_ssize_t)n);
  for (size_t i = 0; list != NULL && i < n; i++) {
    PyObject *d = record_dict(&recs[i]);
    if (d == NULL) {
      Py_CLEAR(list);
      break;
    }
    PyList_SET_ITEM(list, (Py_ssize_t)i, d);
  }
  PyMem_RawFree(recs);
  return list;
}

static PyMethodDef server_methods[] = {
    {"metrics", (PyCFunction)server_metrics, METH_NOARGS, "Counters and histograms (dict)."},
    {"access_log_enable", (PyCFunction)server_access_log_enable, METH_O,
     "access_log_enable(capacity): keep per-call records for take_access_log()."},
    {"take_access_log", (PyCFunction)server_take_access_log, METH_VARARGS,
     "take_access_log(max, timeout) -> [record dict, ...]"},
    {"start", (PyCFunction)server_start, METH_NOARGS, "Bind and start serving; returns the port."},
    {"stop", (PyCFunction)server_stop, METH_O, "stop(grace): refuse new calls, drain, cancel."},
    {"wait", (PyCFunction)server_wait, METH_O, "wait(timeout or None) -> True once stopped."},
    {"set_health", (PyCFunction)server_set_health, METH_O,
     "set_health(serving): SERVING or NOT_SERVING in grpc.health.v1 while running."},
    {"shm_segments", (PyCFunction)server_shm_segments, METH_NOARGS,
     "shm_segments() -> clients' shared-memory segments mapped now, after unmapping those of "
     "clients that closed or died; -1 when shared memory is disabled"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef server_getset[] = {
    {"port", (getter)server_get_port, NULL, "The bound port.", NULL},
    {"serving", (getter)server_get_serving, NULL, "True while serving.", NULL},
    {"total_requests", (getter)server_get_total, NULL, "Compute calls served.", NULL},
    {"in_flight", (getter)server_get_in_flight, NULL, "Compute calls being served.", NULL},
    {"health", (getter)server_get_health, NULL, "True when grpc.health.v1 says SERVING.", NULL},
    {"health_watchers", (getter)server_get_health_watchers, NULL,
     "grpc.health.v1.Health/Watch streams open.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot server_slots[] = {
    {Py_tp_init, server_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, server_dealloc},
    {Py_tp_traverse, server_traverse},
    {Py_tp_clear, server_clear},
    {Py_tp_methods, server_methods},
    {Py_tp_getset, server_getset},
    {Py_tp_doc, "Server(*, compute, info, host, port, max_workers, version='', options=None, "
                "codec=None, codecs=None, auth_tokens=None, tls=None, intercept=None, "
                "max_decoded_bytes=0, max_tensors=0, max_depth=0, convert=None)\n--\n\n"
                "The C server (internal; use splitlearn_comm.GRPCComputeServer)."},
    {0, NULL}};

PyType_Spec slpy_server_spec = {
    .name = "splitlearn_comm._core.Server",
    .basicsize = sizeof(server_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = server_slots,
};
