/* client_py.c: _core.Client, the Python face of sl_client.
 *
 * Every call releases the GIL for its whole network wait (attempts and retry
 * sleeps included); between 200 ms slices it takes the GIL back briefly to run
 * signal handlers (Ctrl-C cancels the call) when it runs on the main thread.
 * A non-OK status raises _core.CallError(code, details, trailing_metadata,
 * initial_metadata, debug_error_string, attempts).
 */
#include "async_client.h"
#include "client.h"
#include "slpy.h"

typedef struct client_obj {
  PyObject_HEAD
  sl_client *client;
  sl_async *async; /* asynchronous calls; made by the first compute_async */
  slpy_state *st;
  PyObject *target; /* str */
  PyObject *retry_hook; /* strong, or NULL: set once by set_retry_hook() */
} client_obj;

typedef struct interrupt_ctx {
  PyThreadState *ts;
  int on_main;
  client_obj *client; /* borrowed: the caller holds it for the whole call */
} interrupt_ctx;

/* Called without the GIL, in the thread that made the call, between wait
 * slices. Returns 1 (and leaves the exception set for the caller) when a signal
 * handler raised. */
static int check_interrupt(void *user) {
  interrupt_ctx *c = user;
  int r;
  if (!c->on_main) return 0;
  PyEval_RestoreThread(c->ts);
  r = PyErr_CheckSignals();
  c->ts = PyEval_SaveThread();
  return r < 0;
}

/* Called without the GIL, in the thread that made the call, before a retry's
 * delay: runs the retry hook (Python logging) with the GIL; never leaves an
 * exception set (a failing hook is reported as unraisable). */
static void report_retry(void *user, const char *method, int code, const char *details,
                         int attempt, double delay) {
  interrupt_ctx *c = user;
  PyObject *r;
  if (c->client == NULL || c->client->retry_hook == NULL) return;
  PyEval_RestoreThread(c->ts);
  r = PyObject_CallFunction(c->client->retry_hook, "OsisId", c->client->target, method, code,
                            details, attempt, delay);
  if (r == NULL) PyErr_WriteUnraisable(c->client->retry_hook);
  Py_XDECREF(r);
  c->ts = PyEval_SaveThread();
}

static int parse_retry(PyObject *retry, sl_retry_policy *p, const sl_retry_policy **out) {
  *out = NULL;
  if (retry == NULL || retry == Py_None) return 0;
  p->attempt_timeout = 0;
  if (!PyArg_ParseTuple(retry,
                        "idddd|d;retry must be (max_retries, initial, max, multiplier, jitter, "
                        "attempt_timeout)",
                        &p->max_retries, &p->initial_delay, &p->max_delay, &p->multiplier,
                        &p->jitter, &p->attempt_timeout)) {
    return -1;
  }
  *out = p;
  return 0;
}

static int ensure_open(client_obj *self) {
  if (self->client == NULL) {
    PyErr_SetString(PyExc_ValueError, "the client is closed");
    return -1;
  }
  return 0;
}

/* Raise CallError from a finished call's status. */
static void raise_call_error(client_obj *self, const sl_call_status *st) {
  PyObject *trailing = slpy_metadata_tuple(st->trailing, st->n_trailing);
  PyObject *initial = slpy_metadata_tuple(st->initial, st->n_initial);
  PyObject *args = NULL, *details = NULL, *debug = NULL;
  /* the status message and debug string come from the peer: decode leniently, so
   * that the caller always gets the RpcError, never a UnicodeDecodeError */
  const char *d = st->details ? st->details : "", *g = st->debug ? st->debug : "";
  details = PyUnicode_DecodeUTF8(d, (Py_ssize_t)strlen(d), "replace");
  debug = PyUnicode_DecodeUTF8(g, (Py_ssize_t)strlen(g), "replace");
  if (trailing != NULL && initial != NULL && details != NULL && debug != NULL) {
    args = Py_BuildValue("(iOOOOi)", st->code, details, trailing, initial, debug, st->attempts);
  }
  if (args != NULL) PyErr_SetObject(self->st->call_error, args);
  Py_XDECREF(args);
  Py_XDECREF(details);
  Py_XDECREF(debug);
  Py_XDECREF(trailing);
  Py_XDECREF(initial);
}

/* Turn a core return code into a Python exception (returns NULL always). */
static PyObject *raise_for(client_obj *self, int rc, const sl_call_status *st, const sl_err *err) {
  if (rc == SL_EINTR) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyboardInterrupt, "call interrupted");
    return NULL;
  }
  if (rc == SL_ESTATUS) {
    raise_call_error(self, st);
    return NULL;
  }
  if (rc == SL_ETOOBIG) {
    PyErr_SetString(PyExc_ValueError, err->msg);
  } else if (rc == SL_ENOMEM) {
    PyErr_SetString(PyExc_MemoryError, err->msg);
  } else if (rc == SL_EINVAL && err->code == SL_STATUS_INVALID_ARGUMENT && st->attempts == 0) {
    PyErr_SetString(PyExc_ValueError, err->msg);
  } else {
    /* a local failure after the call completed (e.g. a malformed response) */
    PyObject *args = Py_BuildValue("(is()()si)", err->code ? err->code : SL_STATUS_INTERNAL,
                                   err->msg, "", st->attempts);
    if (args != NULL) PyErr_SetObject(self->st->call_error, args);
    Py_XDECREF(args);
  }
  return NULL;
}

/* The options every call takes. Pointers into Python objects: valid while the
 * arguments live. */
typedef struct call_args {
  sl_call_opts opts;
  sl_retry_policy policy;
  sl_kv *md;
  interrupt_ctx ictx;
} call_args;

static int call_args_init(client_obj *self, call_args *a, double timeout, PyObject *metadata,
                          int wait_for_ready, PyObject *retry, PyObject *breaker) {
  int berr = 0;
  memset(a, 0, sizeof(*a));
  a->opts.breaker = slpy_breaker_of(self->st, breaker, &berr);
  if (berr) return -1;
  if (slpy_parse_metadata(metadata, &a->md, &a->opts.n_metadata) < 0) return -1;
  if (parse_retry(retry, &a->policy, &a->opts.retry) < 0) {
    PyMem_Free(a->md);
    return -1;
  }
  a->opts.metadata = a->md;
  a->opts.timeout = timeout;
  a->opts.wait_for_ready = wait_for_ready;
  a->opts.interrupt = check_interrupt;
  a->opts.interrupt_user = &a->ictx;
  a->opts.on_retry = report_retry;
  a->opts.on_retry_user = &a->ictx;
  a->ictx.on_main = PyThread_get_thread_ident() == self->st->main_thread;
  a->ictx.client = self;
  return 0;
}

/* compute(tensor, timeout=0, metadata=None, wait_for_ready=False, retry=None,
 *         request_id=None, codec=None, encoded=False)
 * `tensor` is a tensor (encoded in C by `codec`, a _core.Codec, when given) or,
 * with encoded=True, a Python codec's (data, shape, dtype, codec, metadata).
 * Returns (result, compute_time_ms, request_id, attempts, initial_metadata,
 * codec, codec_metadata, shape, dtype): `result` is the decoded tensor when `codec`
 * is None, else the payload of that (Python) codec for the caller to decode. */
static PyObject *client_compute(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"tensor", "timeout", "metadata", "wait_for_ready", "retry",
                           "request_id", "codec", "encoded", "breaker", "backward",
                           "forward_id", "training_mode", "model_id", "learning_rate",
                           "accumulation_step", "backward_seq", "session_id", "session_step",
                           "session_close", NULL};
  PyObject *tensor, *metadata = Py_None, *retry = Py_None, *request_id = Py_None;
  PyObject *codec = Py_None, *breaker = Py_None, *training = Py_None, *lr = Py_None;
  PyObject *acc = Py_None;
  const char *forward_id = NULL, *model_id = NULL, *session_id = NULL;
  int backward = 0, backward_seq = 0, session_close = 0;
  long long session_step = 0;
  sl_call_fields fields;
  double timeout = 0;
  int wait_for_ready = 0, encoded = 0, rc, cerr = 0;
  call_args ca;
  slpy_export ex;
  sl_tensor_out in;
  sl_compute_extra out_extra;
  sl_tensor_msg out;
  sl_call_status st;
  sl_err err;
  const sl_codec *ccodec;
  PyObject *holder = NULL, *result = NULL, *initial = NULL, *rcodec = NULL, *rmeta = NULL;
  PyObject *shape = NULL;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|dOpOOOpOpzOzOOizLp", kwlist, &tensor, &timeout,
                                   &metadata, &wait_for_ready, &retry, &request_id, &codec,
                                   &encoded, &breaker, &backward, &forward_id, &training,
                                   &model_id, &lr, &acc, &backward_seq, &session_id,
                                   &session_step, &session_close)) {
    return NULL;
  }
  memset(&fields, 0, sizeof(fields));
  fields.forward_id = forward_id;
  fields.model_id = model_id;
  fields.backward_seq = backward_seq > 0 ? (int32_t)backward_seq : 0;
  fields.session_id = session_id;
  fields.session_step = session_step > 0 ? (int64_t)session_step : 0;
  fields.session_close = session_close;
  fields.training_mode = training == Py_None ? -1 : PyObject_IsTrue(training);
  if (lr != Py_None) {
    fields.has_learning_rate = 1;
    fields.learning_rate = (float)PyFloat_AsDouble(lr);
    if (PyErr_Occurred()) return NULL;
  }
  if (acc != Py_None) {
    fields.has_accumulation_step = 1;
    fields.accumulation_step = (int32_t)PyLong_AsLong(acc);
    if (PyErr_Occurred()) return NULL;
  }
  if (ensure_open(self) < 0) return NULL;
  ccodec = slpy_codec_of(self->st, codec, &cerr);
  if (cerr) return NULL;
  if (request_id != Py_None) {
    long v = PyLong_AsLong(request_id);
    if (v == -1 && PyErr_Occurred()) return NULL;
    fields.has_request_id = 1;
    fields.request_id = (int32_t)v;
  }
  if (call_args_init(self, &ca, timeout, metadata, wait_for_ready, retry, breaker) < 0) return NULL;
  memset(&in, 0, sizeof(in));
  if (encoded) {
    if (slpy_encoded_from_tuple(tensor, &in) < 0) {
      PyMem_Free(ca.md);
      return NULL;
    }
  } else {
    if (slpy_export_tensor(tensor, &ex) < 0) {
      PyMem_Free(ca.md);
      return NULL;
    }
    in.desc = ex.desc;
    in.data = ex.data;
    in.nbytes = ex.nbytes;
    in.release = slpy_export_release;
    in.owner = ex.dlm;
    in.codec = ccodec;
  }
  memset(&st, 0, sizeof(st));
  sl_err_clear(&err);
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_compute(self->client, &ca.opts, backward, &in, &fields, &out, &out_extra, &st,
                         &err);
  PyEval_RestoreThread(ca.ictx.ts);
  PyMem_Free(ca.md);
  if (rc != SL_OK) {
    raise_for(self, rc, &st, &err);
    goto cleanup;
  }
  if (out.decoded) {
    holder = slpy_holder_new(self->st, out.data, &out.desc);
    rcodec = Py_NewRef(Py_None);
    rmeta = Py_NewRef(Py_None);
  } else {
    sl_tensor_desc pd;
    pd.dtype = SL_DTYPE_UINT8;
    pd.ndim = 1;
    pd.shape[0] = (int64_t)out.nbytes;
    holder = slpy_holder_new(self->st, out.data, &pd);
    rcodec = PyUnicode_FromString(out.codec);
    rmeta = slpy_meta_to_dict(&out.meta);
  }
  out.data = NULL;
  if (holder == NULL || rcodec == NULL || rmeta == NULL) goto cleanup;
  initial = slpy_metadata_tuple(st.initial, st.n_initial);
  shape = slpy_shape_tuple(&out.desc);
  if (initial == NULL || shape == NULL) goto cleanup;
  result = Py_BuildValue("(ONNiOOOOsnn)", holder,
                         out_extra.has_compute_time_ms
                             ? PyFloat_FromDouble(out_extra.compute_time_ms)
                             : Py_NewRef(Py_None),
                         out_extra.has_request_id ? PyLong_FromLong(out_extra.request_id)
                                                  : Py_NewRef(Py_None),
                         st.attempts, initial, rcodec, rmeta, shape,
                         sl_dtype_name(out.desc.dtype), (Py_ssize_t)st.bytes_sent,
                         (Py_ssize_t)st.bytes_received);
cleanup:
  Py_XDECREF(shape);
  Py_XDECREF(rmeta);
  Py_XDECREF(rcodec);
  Py_XDECREF(initial);
  Py_XDECREF(holder);
  sl_tensor_msg_clear(&out);
  sl_call_status_clear(&st);
  return result;
}

static PyObject *client_health(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"timeout", "metadata", "wait_for_ready", "retry", "breaker", NULL};
  PyObject *metadata = Py_None, *retry = Py_None, *breaker = Py_None;
  double timeout = 0;
  int wait_for_ready = 0, rc;
  call_args ca;
  sl_health h;
  sl_call_status st;
  sl_err err;
  PyObject *result;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|dOpOO", kwlist, &timeout, &metadata,
                                   &wait_for_ready, &retry, &breaker)) {
    return NULL;
  }
  if (ensure_open(self) < 0) return NULL;
  if (call_args_init(self, &ca, timeout, metadata, wait_for_ready, retry, breaker) < 0) return NULL;
  memset(&st, 0, sizeof(st));
  sl_err_clear(&err);
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_health(self->client, &ca.opts, &h, &st, &err);
  PyEval_RestoreThread(ca.ictx.ts);
  PyMem_Free(ca.md);
  if (rc != SL_OK) {
    raise_for(self, rc, &st, &err);
    sl_call_status_clear(&st);
    return NULL;
  }
  sl_call_status_clear(&st);
  result = Py_BuildValue("{s:s,s:s,s:s,s:d}", "status", h.status, "message", h.message, "version",
                         h.version, "uptime_seconds", (double)h.uptime_seconds);
  sl_health_clear(&h);
  return result;
}

static PyObject *client_service_info(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"timeout", "metadata", "wait_for_ready", "retry", "breaker", NULL};
  PyObject *metadata = Py_None, *retry = Py_None, *custom = NULL, *result = NULL;
  PyObject *breaker = Py_None;
  double timeout = 0;
  int wait_for_ready = 0, rc;
  call_args ca;
  sl_info_result r;
  sl_call_status st;
  sl_err err;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|dOpOO", kwlist, &timeout, &metadata,
                                   &wait_for_ready, &retry, &breaker)) {
    return NULL;
  }
  if (ensure_open(self) < 0) return NULL;
  if (call_args_init(self, &ca, timeout, metadata, wait_for_ready, retry, breaker) < 0) return NULL;
  memset(&st, 0, sizeof(st));
  sl_err_clear(&err);
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_service_info(self->client, &ca.opts, &r, &st, &err);
  PyEval_RestoreThread(ca.ictx.ts);
  PyMem_Free(ca.md);
  if (rc != SL_OK) {
    raise_for(self, rc, &st, &err);
    sl_call_status_clear(&st);
    return NULL;
  }
  sl_call_status_clear(&st);
  custom = PyDict_New();
  if (custom == NULL) goto cleanup;
  for (size_t i = 0; i < r.n_custom; i++) {
    PyObject *v = PyUnicode_FromString(r.custom[i].value);
    if (v == NULL || PyDict_SetItemString(custom, r.custom[i].key, v) < 0) {
      Py_XDECREF(v);
      goto cleanup;
    }
    Py_DECREF(v);
  }
  result = Py_BuildValue("{s:s,s:s,s:s,s:d,s:L,s:O}", "service_name", r.service_name, "version",
                         r.version, "device", r.device, "uptime_seconds",
                         (double)r.uptime_seconds, "total_requests", (long long)r.total_requests,
                         "custom_info", custom);
cleanup:
  Py_XDECREF(custom);
  sl_info_result_clear(&r);
  return result;
}

static PyObject *client_std_health(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"service", "timeout", "metadata", "wait_for_ready", NULL};
  PyObject *metadata = Py_None;
  const char *service = "";
  double timeout = 0;
  int wait_for_ready = 0, rc, serving = 0;
  call_args ca;
  sl_call_status st;
  sl_err err;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|sdOp", kwlist, &service, &timeout, &metadata,
                                   &wait_for_ready)) {
    return NULL;
  }
  if (ensure_open(self) < 0) return NULL;
  if (call_args_init(self, &ca, timeout, metadata, wait_for_ready, Py_None, Py_None) < 0) return NULL;
  memset(&st, 0, sizeof(st));
  sl_err_clear(&err);
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_std_health(self->client, &ca.opts, service, &serving, &st, &err);
  PyEval_RestoreThread(ca.ictx.ts);
  PyMem_Free(ca.md);
  if (rc != SL_OK) raise_for(self, rc, &st, &err);
  sl_call_status_clear(&st);
  if (rc != SL_OK) return NULL;
  return PyLong_FromLong(serving);
}

static PyObject *client_connect(client_obj *self, PyObject *arg) {
  double timeout = PyFloat_AsDouble(arg);
  interrupt_ctx ictx;
  int rc;
  if (timeout == -1.0 && PyErr_Occurred()) return NULL;
  if (ensure_open(self) < 0) return NULL;
  ictx.on_main = PyThread_get_thread_ident() == self->st->main_thread;
  ictx.client = self;
  ictx.ts = PyEval_SaveThread();
  rc = sl_client_connect(self->client, timeout, check_interrupt, &ictx);
  PyEval_RestoreThread(ictx.ts);
  if (rc == SL_EINTR) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyboardInterrupt, "interrupted");
    return NULL;
  }
  return PyBool_FromLong(rc == SL_OK);
}

static PyObject *client_close(client_obj *self, PyObject *unused) {
  sl_client *c = self->client;
  sl_async *a = self->async;
  (void)unused;
  self->client = NULL;
  self->async = NULL;
  if (a != NULL) {
    /* the calls in flight end with CANCELLED; their callbacks take the GIL */
    Py_BEGIN_ALLOW_THREADS
    sl_async_destroy(a);
    Py_END_ALLOW_THREADS
  }
  if (c != NULL) {
    Py_BEGIN_ALLOW_THREADS
    sl_client_destroy(c);
    Py_END_ALLOW_THREADS
  }
  Py_RETURN_NONE;
}

/* set_retry_hook(fn): fn(target, method, code, details, attempt, delay) runs before
 * each retry's delay. Set once, before any call (calls read it without a lock). */
static PyObject *client_set_retry_hook(client_obj *self, PyObject *fn) {
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "the retry hook must be callable");
    return NULL;
  }
  if (self->retry_hook != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "the retry hook is set once");
    return NULL;
  }
  self->retry_hook = Py_NewRef(fn);
  Py_RETURN_NONE;
}

/* ---- asynchronous calls ---------------------------------------------------- */

#define ASYNC_CAPSULE "splitlearn_comm._core.AsyncCall"

/* What a call in flight holds: strong references, released by async_done. */
typedef struct async_ctx {
  client_obj *client;
  PyObject *callback;
  PyObject *breaker;
} async_ctx;

/* The tuple compute() returns, from a finished call (takes out->data). */
static PyObject *reply_tuple(client_obj *self, sl_tensor_msg *out, const sl_compute_extra *extra,
                             const sl_call_status *st) {
  PyObject *holder = NULL, *rcodec = NULL, *rmeta = NULL, *initial = NULL, *shape = NULL;
  PyObject *result = NULL;
  if (out->decoded) {
    holder = slpy_holder_new(self->st, out->data, &out->desc);
    rcodec = Py_NewRef(Py_None);
    rmeta = Py_NewRef(Py_None);
  } else {
    sl_tensor_desc pd;
    pd.dtype = SL_DTYPE_UINT8;
    pd.ndim = 1;
    pd.shape[0] = (int64_t)out->nbytes;
    holder = slpy_holder_new(self->st, out->data, &pd);
    rcodec = PyUnicode_FromString(out->codec);
    rmeta = slpy_meta_to_dict(&out->meta);
  }
  out->data = NULL;
  if (holder == NULL || rcodec == NULL || rmeta == NULL) goto cleanup;
  initial = slpy_metadata_tuple(st->initial, st->n_initial);
  shape = slpy_shape_tuple(&out->desc);
  if (initial == NULL || shape == NULL) goto cleanup;
  result = Py_BuildValue("(ONNiOOOOsnn)", holder,
                         extra->has_compute_time_ms ? PyFloat_FromDouble(extra->compute_time_ms)
                                                    : Py_NewRef(Py_None),
                         extra->has_request_id ? PyLong_FromLong(extra->request_id)
                                               : Py_NewRef(Py_None),
                         st->attempts, initial, rcodec, rmeta, shape,
                         sl_dtype_name(out->desc.dtype), (Py_ssize_t)st->bytes_sent,
                         (Py_ssize_t)st->bytes_received);
cleanup:
  Py_XDECREF(shape);
  Py_XDECREF(initial);
  Py_XDECREF(rmeta);
  Py_XDECREF(rcodec);
  Py_XDECREF(holder);
  return result;
}

/* The pending exception as an object (with its traceback), cleared. */
static PyObject *take_exception(void) {
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  if (v != NULL && tb != NULL) PyException_SetTraceback(v, tb);
  Py_XDECREF(t);
  Py_XDECREF(tb);
  return v;
}

/* Called without the GIL, on the completion thread, once per started call:
 * callback(reply, None) on success, callback(None, exception) on failure. */
static void async_done(void *user, sl_async_result *res) {
  async_ctx *x = user;
  PyGILState_STATE g;
  PyObject *reply = NULL, *exc = NULL, *r;

  if (slpy_is_finalizing()) { /* leak rather than touch a dying runtime */
    sl_tensor_msg_clear(&res->out);
    sl_call_status_clear(&res->st);
    return;
  }
  g = PyGILState_Ensure();
  if (res->rc == SL_OK) {
    reply = reply_tuple(x->client, &res->out, &res->extra, &res->st);
  } else {
    raise_for(x->client, res->rc, &res->st, &res->err);
  }
  if (reply == NULL) exc = take_exception();
  r = PyObject_CallFunctionObjArgs(x->callback, reply ? reply : Py_None, exc ? exc : Py_None,
                                   NULL);
  if (r == NULL) PyErr_WriteUnraisable(x->callback);
  Py_XDECREF(r);
  Py_XDECREF(reply);
  Py_XDECREF(exc);
  sl_tensor_msg_clear(&res->out);
  sl_call_status_clear(&res->st);
  Py_DECREF(x->callback);
  Py_XDECREF(x->breaker);
  Py_DECREF((PyObject *)x->client);
  PyMem_RawFree(x);
  PyGILState_Release(g);
}

/* Called without the GIL: the completion thread keeps one Python thread state for
 * its whole life (each callback then only takes the GIL). */
static void async_thread_start(void *user) {
  (void)user;
  if (slpy_is_finalizing()) return;
  PyGILState_Ensure();
  PyEval_SaveThread();
}

static void async_thread_stop(void *user) {
  PyThreadState *ts;
  (void)user;
  if (slpy_is_finalizing()) return; /* leak the thread state rather than touch a dying runtime */
  ts = PyGILState_GetThisThreadState();
  if (ts == NULL) return;
  PyEval_RestoreThread(ts);
  PyGILState_Release(PyGILState_UNLOCKED);
}

static void async_capsule_free(PyObject *cap) {
  sl_async_call_unref(PyCapsule_GetPointer(cap, ASYNC_CAPSULE));
}

/* compute_async(callback, tensor, <the keywords of compute()>) -> handle
 * Starts the call and returns at once; callback(reply, None) or
 * callback(None, exception) runs later on the completion thread, with the GIL.
 * `reply` is what compute() returns. A call refused before any attempt (closed
 * client, bad argument, open circuit breaker) raises here instead. */
static PyObject *client_compute_async(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"callback", "tensor", "timeout", "metadata", "wait_for_ready", "retry",
                           "request_id", "codec", "encoded", "breaker", "backward",
                           "forward_id", "training_mode", "model_id", "learning_rate",
                           "accumulation_step", "backward_seq", NULL};
  PyObject *callback, *tensor, *metadata = Py_None, *retry = Py_None, *request_id = Py_None;
  PyObject *codec = Py_None, *breaker = Py_None, *training = Py_None, *lr = Py_None;
  PyObject *acc = Py_None;
  const char *forward_id = NULL, *model_id = NULL;
  int backward = 0, backward_seq = 0;
  sl_call_fields fields;
  double timeout = 0;
  int wait_for_ready = 0, encoded = 0, rc, cerr = 0;
  call_args ca;
  slpy_export ex;
  sl_tensor_out in;
  sl_call_status st;
  sl_err err;
  const sl_codec *ccodec;
  sl_async_call *handle = NULL;
  sl_async *eng;
  async_ctx *x = NULL;
  PyObject *cap;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|dOpOOOpOpzOzOOi", kwlist, &callback, &tensor,
                                   &timeout, &metadata, &wait_for_ready, &retry, &request_id,
                                   &codec, &encoded, &breaker, &backward, &forward_id, &training,
                                   &model_id, &lr, &acc, &backward_seq)) {
    return NULL;
  }
  if (!PyCallable_Check(callback)) {
    PyErr_SetString(PyExc_TypeError, "callback must be callable");
    return NULL;
  }
  memset(&fields, 0, sizeof(fields));
  fields.forward_id = forward_id;
  fields.model_id = model_id;
  fields.backward_seq = backward_seq > 0 ? (int32_t)backward_seq : 0;
  fields.training_mode = training == Py_None ? -1 : PyObject_IsTrue(training);
  if (lr != Py_None) {
    fields.has_learning_rate = 1;
    fields.learning_rate = (float)PyFloat_AsDouble(lr);
    if (PyErr_Occurred()) return NULL;
  }
  if (acc != Py_None) {
    fields.has_accumulation_step = 1;
    fields.accumulation_step = (int32_t)PyLong_AsLong(acc);
    if (PyErr_Occurred()) return NULL;
  }
  if (ensure_open(self) < 0) return NULL;
  ccodec = slpy_codec_of(self->st, codec, &cerr);
  if (cerr) return NULL;
  if (request_id != Py_None) {
    long v = PyLong_AsLong(request_id);
    if (v == -1 && PyErr_Occurred()) return NULL;
    fields.has_request_id = 1;
    fields.request_id = (int32_t)v;
  }
  if (self->async == NULL) {
    sl_err_clear(&err);
    if (sl_async_create(self->client, async_thread_start, async_thread_stop, NULL,
                        &self->async, &err) != SL_OK) {
      PyErr_SetString(PyExc_RuntimeError, err.msg);
      return NULL;
    }
  }
  /* Python code runs below (the tensor's __dlpack__) and close() may run meanwhile
     on another thread: hold the engine's memory until this call has started */
  eng = self->async;
  sl_async_retain(eng);
  x = PyMem_RawCalloc(1, sizeof(*x));
  if (x == NULL) {
    sl_async_release(eng);
    return PyErr_NoMemory();
  }
  if (call_args_init(self, &ca, timeout, metadata, wait_for_ready, retry, breaker) < 0) {
    sl_async_release(eng);
    PyMem_RawFree(x);
    return NULL;
  }
  memset(&in, 0, sizeof(in));
  if (encoded) {
    if (slpy_encoded_from_tuple(tensor, &in) < 0) goto fail_args;
  } else {
    if (slpy_export_tensor(tensor, &ex) < 0) goto fail_args;
    in.desc = ex.desc;
    in.data = ex.data;
    in.nbytes = ex.nbytes;
    in.release = slpy_export_release;
    in.owner = ex.dlm;
    in.codec = ccodec;
  }
  x->client = (client_obj *)Py_NewRef((PyObject *)self);
  x->callback = Py_NewRef(callback);
  x->breaker = breaker == Py_None ? NULL : Py_NewRef(breaker);
  memset(&st, 0, sizeof(st));
  sl_err_clear(&err);
  /* packing (and a built-in codec's encoding) runs without the GIL; close() may
     run meanwhile on another thread: the engine's memory stays until released */
  Py_BEGIN_ALLOW_THREADS
  rc = sl_async_compute_start(eng, &ca.opts, backward, &in, &fields, async_done, x, &handle, &st,
                              &err);
  Py_END_ALLOW_THREADS
  sl_async_release(eng);
  PyMem_Free(ca.md);
  if (rc != SL_OK) {
    if (rc == SL_ESTATE) {
      PyErr_SetString(PyExc_ValueError, err.msg);
    } else {
      raise_for(self, rc, &st, &err);
    }
    sl_call_status_clear(&st);
    Py_DECREF(x->callback);
    Py_XDECREF(x->breaker);
    Py_DECREF((PyObject *)x->client);
    PyMem_RawFree(x);
    return NULL;
  }
  cap = PyCapsule_New(handle, ASYNC_CAPSULE, async_capsule_free);
  if (cap == NULL) {
    sl_async_call_cancel(handle);
    sl_async_call_unref(handle);
  }
  return cap;
fail_args:
  sl_async_release(eng);
  PyMem_Free(ca.md);
  PyMem_RawFree(x);
  return NULL;
}

/* cancel_async(handle): cancel a call started by compute_async (no effect once
 * its callback has run). */
static PyObject *client_cancel_async(client_obj *self, PyObject *cap) {
  sl_async_call *k = PyCapsule_GetPointer(cap, ASYNC_CAPSULE);
  (void)self;
  if (k == NULL) return NULL;
  sl_async_call_cancel(k);
  Py_RETURN_NONE;
}

static PyObject *client_async_in_flight(client_obj *self, PyObject *unused) {
  (void)unused;
  return PyLong_FromSize_t(self->async != NULL ? sl_async_in_flight(self->async) : 0);
}

static int client_init(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"target", "options", "tls", NULL};
  PyObject *target, *options = Py_None, *tls = Py_None;
  sl_tls_client tls_cfg = {NULL, NULL, NULL};
  sl_chan_arg *chargs = NULL;
  size_t nchargs = 0;
  sl_err err;
  int rc;
  const char *t;

  if (self->client != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Client.__init__ called twice");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|OO", kwlist, &target, &options, &tls)) {
    return -1;
  }
  if (tls != Py_None &&
      !PyArg_ParseTuple(tls, "zzz;tls must be (root_certs, cert_chain, private_key)",
                        &tls_cfg.root_certs, &tls_cfg.cert_chain, &tls_cfg.private_key)) {
    return -1;
  }
  t = PyUnicode_AsUTF8(target);
  if (t == NULL) return -1;
  if (slpy_parse_options(options, &chargs, &nchargs) < 0) return -1;
  self->st = slpy_state_of_type(Py_TYPE(self));
  if (self->st == NULL) {
    PyMem_Free(chargs);
    return -1;
  }
  Py_XSETREF(self->target, Py_NewRef(target));
  sl_err_clear(&err);
  rc = sl_client_create(t, chargs, nchargs, tls != Py_None ? &tls_cfg : NULL, &self->client, &err);
  PyMem_Free(chargs);
  if (rc != SL_OK) {
    PyErr_SetString(PyExc_ValueError, err.msg);
    return -1;
  }
  return 0;
}

static void client_dealloc(client_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  client_close(self, NULL);
  Py_CLEAR(self->target);
  Py_CLEAR(self->retry_hook);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static PyMethodDef client_methods[] = {
    {"compute", (PyCFunction)(void (*)(void))client_compute, METH_VARARGS | METH_KEYWORDS,
     "compute(tensor, timeout=0, metadata=None, wait_for_ready=False, retry=None, "
     "request_id=None, codec=None, encoded=False) -> (result, compute_time_ms, request_id, "
     "attempts, initial_metadata, codec, codec_metadata, shape, dtype)"},
    {"health", (PyCFunction)(void (*)(void))client_health, METH_VARARGS | METH_KEYWORDS,
     "HealthCheck -> dict"},
    {"service_info", (PyCFunction)(void (*)(void))client_service_info,
     METH_VARARGS | METH_KEYWORDS, "GetServiceInfo -> dict"},
    {"std_health", (PyCFunction)(void (*)(void))client_std_health, METH_VARARGS | METH_KEYWORDS,
     "grpc.health.v1.Health/Check -> ServingStatus number"},
    {"connect", (PyCFunction)client_connect, METH_O, "connect(timeout) -> bool (channel ready)"},
    {"compute_async", (PyCFunction)(void (*)(void))client_compute_async,
     METH_VARARGS | METH_KEYWORDS,
     "compute_async(callback, tensor, ...) -> handle; callback(reply, exc) runs on the "
     "completion thread"},
    {"cancel_async", (PyCFunction)client_cancel_async, METH_O,
     "cancel_async(handle): cancel a call started by compute_async"},
    {"async_in_flight", (PyCFunction)client_async_in_flight, METH_NOARGS,
     "asynchronous calls started and not yet done"},
    {"close", (PyCFunction)client_close, METH_NOARGS,
     "Close the channel; asynchronous calls in flight end with CANCELLED."},
    {"set_retry_hook", (PyCFunction)client_set_retry_hook, METH_O,
     "set_retry_hook(fn): fn(target, method, code, details, attempt, delay) before each retry"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot client_slots[] = {
    {Py_tp_init, client_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, client_dealloc},
    {Py_tp_methods, client_methods},
    {Py_tp_doc, "The C client (internal; use splitlearn_comm.GRPCComputeClient)."},
    {0, NULL}};

PyType_Spec slpy_client_spec = {
    .name = "splitlearn_comm._core.Client",
    .basicsize = sizeof(client_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = client_slots,
};
