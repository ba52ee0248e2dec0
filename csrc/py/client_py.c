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

/* The core client for one call made without the GIL, with a reference of the
 * call's own (sl_client_release() it before taking the GIL back): close() on
 * another thread meanwhile only drops the object's reference. NULL, with
 * ValueError, when the client is closed. Call it after the last Python code of
 * the call's set-up (close() may run during any of it). */
static sl_client *hold_client(client_obj *self) {
  if (ensure_open(self) < 0) return NULL;
  sl_client_retain(self->client);
  return self->client;
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
  if (rc == SL_ECODEC) {
    /* a codec failed (either side's encode or decode here), or the response came
       in a codec this client does not know */
    PyErr_SetString(self->st->codec_error, err->msg);
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

/* The Reply of a finished call: its leaves take the storage of out's tensors. */
/* The Reply of a call. With `convert` (a callable taking a DLPack capsule; NULL or
 * None: none) its value and values are the received object and tensors made in C,
 * and its leaves and nodes None; without it the other way round. `export_s`: the
 * seconds the binding took to export the request's tensors (< 0: an asynchronous
 * call, whose stages are not timed). */
static PyObject *make_reply(client_obj *self, sl_tensor_msg *out, const sl_compute_extra *extra,
                            const sl_call_status *st, PyObject *convert, double export_s) {
  PyObject *rleaves = NULL, *rnodes = NULL, *initial = NULL, *result = NULL;
  PyObject *value = NULL, *values = NULL;
  double t0 = sl_now();
  if (convert != NULL && convert != Py_None) {
    if (slpy_msg_to_value(out, convert, &value, &values) < 0) goto cleanup;
    rleaves = Py_NewRef(Py_None);
    rnodes = Py_NewRef(Py_None);
  } else {
    if (slpy_msg_to_python(self->st, out, &rleaves, &rnodes) < 0) goto cleanup;
    value = Py_NewRef(Py_None);
    values = Py_NewRef(Py_None);
  }
  initial = slpy_metadata_tuple(st->initial, st->n_initial);
  if (initial == NULL) goto cleanup;
  result = PyStructSequence_New(self->st->reply_type);
  if (result == NULL) goto cleanup;
  {
    PyObject *v[15];
    int asynchronous = export_s < 0; /* its stages are not timed */
    v[0] = PyLong_FromLong(out->form);
    v[1] = Py_NewRef(rleaves);
    v[2] = Py_NewRef(rnodes);
    v[3] = PyLong_FromSize_t(out->n_kv);
    v[4] = extra->has_compute_time_ms ? PyFloat_FromDouble(extra->compute_time_ms)
                                      : Py_NewRef(Py_None);
    v[5] = extra->has_request_id ? PyLong_FromLong(extra->request_id) : Py_NewRef(Py_None);
    v[6] = PyLong_FromLong(st->attempts);
    v[7] = Py_NewRef(initial);
    v[8] = PyLong_FromSize_t(st->bytes_sent);
    v[9] = PyLong_FromSize_t(st->bytes_received);
    v[10] = Py_NewRef(value);
    v[11] = Py_NewRef(values);
    v[12] = PyFloat_FromDouble(asynchronous ? 0.0 : (export_s + extra->encode_s) * 1e3);
    v[13] = PyFloat_FromDouble(asynchronous ? 0.0 : (extra->decode_s + sl_now() - t0) * 1e3);
    v[14] = PyUnicode_InternFromString(sl_transport_name(st->transport));
    for (int i = 0; i < 15; i++) {
      if (v[i] == NULL) {
        for (int j = i; j < 15; j++) Py_XDECREF(v[j]);
        Py_CLEAR(result);
        break;
      }
      PyStructSequence_SetItem(result, i, v[i]);
    }
  }
cleanup:
  Py_XDECREF(initial);
  Py_XDECREF(rleaves);
  Py_XDECREF(rnodes);
  Py_XDECREF(value);
  Py_XDECREF(values);
  return result;
}

/* A change of the shared-memory channel's state, logged at debug level on the
 * "splitlearn_comm.client" logger (once per change). Called with the GIL; never
 * leaves an exception set. */
static void log_shm_note(client_obj *self) {
  char note[SL_ERR_MSG_MAX];
  PyObject *logging, *logger, *r;
  if (self->client == NULL || !sl_client_shm_note(self->client, note, sizeof(note))) return;
  logging = PyImport_ImportModule("logging");
  logger = logging ? PyObject_CallMethod(logging, "getLogger", "s", "splitlearn_comm.client") : NULL;
  r = logger ? PyObject_CallMethod(logger, "debug", "s", note) : NULL;
  Py_XDECREF(r);
  Py_XDECREF(logger);
  Py_XDECREF(logging);
  PyErr_Clear();
}

static PyObject *client_shm_stats(client_obj *self, PyObject *unused) {
  int state = -1;
  size_t segments = 0;
  long long calls = 0;
  (void)unused;
  if (self->client != NULL) sl_client_shm_stats(self->client, &state, &segments, &calls);
  return Py_BuildValue("{s:s,s:n,s:L}", "state",
                       state > 0 ? "on" : state == 0 ? "undecided" : "off", "segments",
                       (Py_ssize_t)segments, "calls", calls);
}

/* The blocking call of compute() and plain(): exports `leaves` (OutTensor
 * sequence, `form`, `nodes`), runs the call without the GIL and fills out, extra
 * and st (for the caller to clear on every path). Consumes ca->md. Returns 0, or
 * -1 with an exception set (CallError for a failed call). *export_s: the seconds
 * the export took. */
static int run_compute(client_obj *self, call_args *ca, int backward, PyObject *leaves, int form,
                       PyObject *nodes, const sl_call_fields *fields, sl_tensor_msg *out,
                       sl_compute_extra *extra, sl_call_status *st, double *export_s) {
  sl_client *c;
  sl_tensor_set in;
  slpy_setbuf *buf = NULL;
  sl_err err;
  int rc;
  *export_s = sl_now();
  if (slpy_set_from_python(self->st, leaves, form, nodes, &in, &buf) < 0) {
    PyMem_Free(ca->md);
    return -1;
  }
  *export_s = sl_now() - *export_s;
  sl_err_clear(&err);
  c = hold_client(self);
  if (c == NULL) {
    sl_tensor_set_release(&in);
    slpy_setbuf_free(buf);
    PyMem_Free(ca->md);
    return -1;
  }
  ca->ictx.ts = PyEval_SaveThread();
  /* consumes the tensors of `in` on every path */
  rc = sl_client_compute(c, &ca->opts, backward, &in, fields, out, extra, st, &err);
  slpy_setbuf_free(buf);
  sl_client_release(c);
  PyEval_RestoreThread(ca->ictx.ts);
  PyMem_Free(ca->md);
  log_shm_note(self);
  if (rc != SL_OK) {
    raise_for(self, rc, st, &err);
    return -1;
  }
  return 0;
}

/* compute(leaves, form=0, nodes=None, timeout=0, metadata=None, wait_for_ready=False,
 *         retry=None, request_id=None, breaker=None, backward=False, forward_id=None,
 *         training_mode=None, model_id=None, learning_rate=None, accumulation_step=None,
 *         use_cache=None, backward_seq=0, session_id=None, session_step=0,
 *         session_close=False, codecs=None) -> Reply
 * `leaves` is a sequence of OutTensor (name, tensor, codec): a tensor (encoded by
 * the core with `codec`, a _core.Codec built in or Python, when given) or, for
 * ComputeServiceStub, an already-encoded (data, shape, dtype, codec, metadata).
 * `codecs` (a _core.Codecs): the Python codecs the reply may use. `form` 0 sends
 * leaves[0] in the single-tensor fields (and
 * leaves[1:] as KV cache pairs), 1 a map by name, 2 a structure (`nodes`). */
static PyObject *client_compute(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"leaves", "form", "nodes", "timeout", "metadata", "wait_for_ready",
                           "retry", "request_id", "breaker", "backward", "forward_id",
                           "training_mode", "model_id", "learning_rate", "accumulation_step",
                           "use_cache", "backward_seq", "session_id", "session_step",
                           "session_close", "codecs", "convert", NULL};
  PyObject *leaves, *nodes = Py_None, *metadata = Py_None, *retry = Py_None;
  PyObject *request_id = Py_None, *breaker = Py_None, *training = Py_None, *lr = Py_None;
  PyObject *acc = Py_None, *use_cache = Py_None, *codecs = Py_None, *convert = Py_None;
  const char *forward_id = NULL, *model_id = NULL, *session_id = NULL;
  int backward = 0, form = 0, backward_seq = 0, session_close = 0;
  long long session_step = 0;
  sl_call_fields fields;
  double timeout = 0, export_s;
  int wait_for_ready = 0, rc;
  call_args ca;
  sl_compute_extra out_extra;
  sl_tensor_msg out;
  sl_call_status st;
  PyObject *result = NULL;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|iOdOpOOOpzOzOOOizLpOO", kwlist, &leaves,
                                   &form, &nodes, &timeout, &metadata, &wait_for_ready, &retry,
                                   &request_id, &breaker, &backward, &forward_id, &training,
                                   &model_id, &lr, &acc, &use_cache, &backward_seq, &session_id,
                                   &session_step, &session_close, &codecs, &convert)) {
    return NULL;
  }
  if (convert != Py_None && !PyCallable_Check(convert)) {
    PyErr_SetString(PyExc_TypeError, "convert must be callable or None");
    return NULL;
  }
  memset(&fields, 0, sizeof(fields));
  memset(&out, 0, sizeof(out));
  memset(&st, 0, sizeof(st));
  fields.forward_id = forward_id;
  fields.model_id = model_id;
  fields.backward_seq = backward_seq > 0 ? (int32_t)backward_seq : 0;
  fields.session_id = session_id;
  fields.session_step = session_step > 0 ? (int64_t)session_step : 0;
  fields.session_close = session_close;
  fields.training_mode = training == Py_None ? -1 : PyObject_IsTrue(training);
  if (use_cache != Py_None) {
    fields.has_use_cache = 1;
    fields.use_cache = PyObject_IsTrue(use_cache);
    if (fields.use_cache < 0) return NULL;
  }
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
  if (request_id != Py_None) {
    long v = PyLong_AsLong(request_id);
    if (v == -1 && PyErr_Occurred()) return NULL;
    fields.has_request_id = 1;
    fields.request_id = (int32_t)v;
  }
  if (call_args_init(self, &ca, timeout, metadata, wait_for_ready, retry, breaker) < 0) return NULL;
  {
    int cerr = 0;
    ca.opts.codecs = slpy_codecs_of(self->st, codecs, &cerr); /* borrowed: `codecs` lives */
    if (cerr) {
      PyMem_Free(ca.md);
      return NULL;
    }
  }
  rc = run_compute(self, &ca, backward, leaves, form, nodes, &fields, &out, &out_extra, &st,
                   &export_s);
  if (rc == 0) result = make_reply(self, &out, &out_extra, &st, convert, export_s);
  sl_tensor_msg_clear(&out);
  sl_call_status_clear(&st);
  return result;
}

/* plain(tensor, timeout, metadata, wait_for_ready, retry, breaker, codecs, convert,
 *       model_id, request_id, stats) -> object
 * GRPCComputeClient.compute() of one tensor with the client's settings, all
 * positional: compute()'s work without its keyword parsing, its Reply and the
 * Python bookkeeping. The call is counted in `stats` (a CallStats) when it
 * succeeds; a failure raises CallError and is counted by the caller. Returns
 * the received object made with `convert` (as Reply.value), or, when the reply
 * carries KV cache pairs, the whole Reply (for the caller to unpack). */
static PyObject *client_plain(client_obj *self, PyObject *const *args, Py_ssize_t nargs) {
  PyObject *leaves = NULL, *pair = NULL, *empty = NULL, *result = NULL;
  PyObject *convert, *stats, *value = NULL, *values = NULL;
  const char *model_id = NULL;
  double timeout, t0 = sl_now(), export_s;
  int wait_for_ready, rc;
  long request_id;
  sl_call_fields fields;
  call_args ca;
  sl_compute_extra out_extra;
  sl_tensor_msg out;
  sl_call_status st;

  if (nargs != 11) {
    PyErr_SetString(PyExc_TypeError,
                    "plain(tensor, timeout, metadata, wait_for_ready, retry, breaker, codecs, "
                    "convert, model_id, request_id, stats) takes 11 arguments");
    return NULL;
  }
  convert = args[7];
  stats = args[10];
  timeout = PyFloat_AsDouble(args[1]);
  if (timeout == -1.0 && PyErr_Occurred()) return NULL;
  wait_for_ready = PyObject_IsTrue(args[3]);
  if (wait_for_ready < 0) return NULL;
  if (args[8] != Py_None && (model_id = PyUnicode_AsUTF8(args[8])) == NULL) return NULL;
  request_id = PyLong_AsLong(args[9]);
  if (request_id == -1 && PyErr_Occurred()) return NULL;
  if (!PyCallable_Check(convert)) {
    PyErr_SetString(PyExc_TypeError, "convert must be callable");
    return NULL;
  }
  if (slpy_stats_check(self->st, stats) < 0 || ensure_open(self) < 0) return NULL;
  memset(&fields, 0, sizeof(fields));
  memset(&out, 0, sizeof(out));
  memset(&st, 0, sizeof(st));
  fields.training_mode = -1;
  fields.model_id = model_id;
  fields.has_request_id = 1;
  fields.request_id = (int32_t)request_id;
  if (call_args_init(self, &ca, timeout, args[2], wait_for_ready, args[4], args[5]) < 0) {
    return NULL;
  }
  {
    int cerr = 0;
    ca.opts.codecs = slpy_codecs_of(self->st, args[6], &cerr); /* borrowed: args live */
    if (cerr) {
      PyMem_Free(ca.md);
      return NULL;
    }
  }
  empty = PyUnicode_FromStringAndSize("", 0);
  pair = empty ? PyTuple_Pack(2, empty, args[0]) : NULL;
  leaves = pair ? PyTuple_Pack(1, pair) : NULL;
  if (leaves == NULL) {
    PyMem_Free(ca.md);
    goto cleanup;
  }
  rc = run_compute(self, &ca, 0, leaves, SL_FORM_SINGLE, Py_None, &fields, &out, &out_extra, &st,
                   &export_s);
  if (rc < 0) goto cleanup;
  if (out.n_kv > 0) {
    result = make_reply(self, &out, &out_extra, &st, convert, export_s);
  } else if (slpy_msg_to_value(&out, convert, &value, &values) == 0) {
    result = Py_NewRef(value);
  }
  if (result != NULL) {
    slpy_stats_ok(stats, (sl_now() - t0) * 1e3,
                  out_extra.has_compute_time_ms ? out_extra.compute_time_ms : 0.0, st.attempts,
                  st.transport, st.bytes_sent, st.bytes_received);
  }
cleanup:
  Py_XDECREF(value);
  Py_XDECREF(values);
  Py_XDECREF(leaves);
  Py_XDECREF(pair);
  Py_XDECREF(empty);
  sl_tensor_msg_clear(&out);
  sl_call_status_clear(&st);
  return result;
}

static PyObject *client_health(client_obj *self, PyObject *args, PyObject *kwargs) {
  sl_client *c;
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
  c = hold_client(self);
  if (c == NULL) {
    PyMem_Free(ca.md);
    return NULL;
  }
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_health(c, &ca.opts, &h, &st, &err);
  sl_client_release(c);
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
  sl_client *c;
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
  c = hold_client(self);
  if (c == NULL) {
    PyMem_Free(ca.md);
    return NULL;
  }
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_service_info(c, &ca.opts, &r, &st, &err);
  sl_client_release(c);
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
  sl_client *c;
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
  c = hold_client(self);
  if (c == NULL) {
    PyMem_Free(ca.md);
    return NULL;
  }
  ca.ictx.ts = PyEval_SaveThread();
  rc = sl_client_std_health(c, &ca.opts, service, &serving, &st, &err);
  sl_client_release(c);
  PyEval_RestoreThread(ca.ictx.ts);
  PyMem_Free(ca.md);
  if (rc != SL_OK) raise_for(self, rc, &st, &err);
  sl_call_status_clear(&st);
  if (rc != SL_OK) return NULL;
  return PyLong_FromLong(serving);
}

static PyObject *client_connect(client_obj *self, PyObject *arg) {
  sl_client *c;
  double timeout = PyFloat_AsDouble(arg);
  interrupt_ctx ictx;
  int rc;
  if (timeout == -1.0 && PyErr_Occurred()) return NULL;
  if (ensure_open(self) < 0) return NULL;
  ictx.on_main = PyThread_get_thread_ident() == self->st->main_thread;
  ictx.client = self;
  c = hold_client(self);
  if (c == NULL) return NULL;
  ictx.ts = PyEval_SaveThread();
  rc = sl_client_connect(c, timeout, check_interrupt, &ictx);
  sl_client_release(c);
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

/* on_retry of an asynchronous call: called without the GIL on the completion
 * thread, before a retry's delay; `user` is the call's async_ctx (alive until
 * async_done). Runs the retry hook (Python logging) as report_retry does. */
static void report_retry_async(void *user, const char *method, int code, const char *details,
                               int attempt, double delay) {
  async_ctx *x = user;
  PyGILState_STATE g;
  PyObject *r;
  if (x->client->retry_hook == NULL || slpy_is_finalizing()) return;
  g = PyGILState_Ensure();
  r = PyObject_CallFunction(x->client->retry_hook, "OsisId", x->client->target, method, code,
                            details, attempt, delay);
  if (r == NULL) PyErr_WriteUnraisable(x->client->retry_hook);
  Py_XDECREF(r);
  PyGILState_Release(g);
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
    reply = make_reply(x->client, &res->out, &res->extra, &res->st, NULL, -1.0);
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

/* compute_async(callback, leaves, <the arguments of compute() after leaves>) -> handle
 * Starts the call and returns at once; callback(reply, None) or
 * callback(None, exception) runs later on the completion thread, with the GIL.
 * `reply` is the Reply compute() returns. A call refused before any attempt
 * (closed client, bad argument, open circuit breaker) raises here instead. */
static PyObject *client_compute_async(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"callback", "leaves", "form", "nodes", "timeout", "metadata",
                           "wait_for_ready", "retry", "request_id", "breaker", "backward",
                           "forward_id", "training_mode", "model_id", "learning_rate",
                           "accumulation_step", "use_cache", "backward_seq", "session_id",
                           "session_step", "session_close", "codecs", NULL};
  PyObject *callback, *leaves, *nodes = Py_None, *metadata = Py_None, *retry = Py_None;
  PyObject *request_id = Py_None, *breaker = Py_None, *training = Py_None, *lr = Py_None;
  PyObject *acc = Py_None, *use_cache = Py_None, *codecs = Py_None;
  const char *forward_id = NULL, *model_id = NULL, *session_id = NULL;
  int backward = 0, form = 0, backward_seq = 0, session_close = 0;
  long long session_step = 0;
  sl_call_fields fields;
  double timeout = 0;
  int wait_for_ready = 0, rc;
  call_args ca;
  sl_tensor_set in;
  slpy_setbuf *buf = NULL;
  sl_call_status st;
  sl_err err;
  sl_async_call *handle = NULL;
  sl_async *eng;
  async_ctx *x = NULL;
  PyObject *cap;

  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|iOdOpOOOpzOzOOOizLpO", kwlist, &callback,
                                   &leaves, &form, &nodes, &timeout, &metadata, &wait_for_ready,
                                   &retry, &request_id, &breaker, &backward, &forward_id,
                                   &training, &model_id, &lr, &acc, &use_cache, &backward_seq,
                                   &session_id, &session_step, &session_close, &codecs)) {
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
  fields.session_id = session_id;
  fields.session_step = session_step > 0 ? (int64_t)session_step : 0;
  fields.session_close = session_close;
  fields.training_mode = training == Py_None ? -1 : PyObject_IsTrue(training);
  if (use_cache != Py_None) {
    fields.has_use_cache = 1;
    fields.use_cache = PyObject_IsTrue(use_cache);
    if (fields.use_cache < 0) return NULL;
  }
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
  /* Python code runs below (the tensors' __dlpack__) and close() may run meanwhile
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
  {
    int cerr = 0;
    ca.opts.codecs = slpy_codecs_of(self->st, codecs, &cerr); /* the call takes a reference */
    if (cerr) goto fail_args;
  }
  if (slpy_set_from_python(self->st, leaves, form, nodes, &in, &buf) < 0) goto fail_args;
  x->client = (client_obj *)Py_NewRef((PyObject *)self);
  x->callback = Py_NewRef(callback);
  x->breaker = breaker == Py_None ? NULL : Py_NewRef(breaker);
  ca.opts.on_retry = report_retry_async;
  ca.opts.on_retry_user = x;
  memset(&st, 0, sizeof(st));
  sl_err_clear(&err);
  /* packing (and the built-in codecs' encoding) runs without the GIL; close() may
     run meanwhile on another thread: the engine's memory stays until released.
     The tensors of `in` are consumed on every path. */
  Py_BEGIN_ALLOW_THREADS
  rc = sl_async_compute_start(eng, &ca.opts, backward, &in, &fields, async_done, x, &handle, &st,
                              &err);
  slpy_setbuf_free(buf);
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

/* set_streaming(threshold, chunk=0): stream requests of `threshold` bytes and more
 * (-1: never); `chunk` bytes of the message per Chunk (0: the default). */
static PyObject *client_set_streaming(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"threshold", "chunk", NULL};
  long long threshold = 0, chunk = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "L|L", kwlist, &threshold, &chunk)) return NULL;
  if (threshold < -1 || chunk < 0 || chunk > (1LL << 30)) {
    PyErr_SetString(PyExc_ValueError,
                    "threshold must be >= 0 (or -1: never stream) and chunk in [0, 2**30] (0: by size)");
    return NULL;
  }
  if (self->client == NULL) {
    PyErr_SetString(PyExc_ValueError, "the client is closed");
    return NULL;
  }
  sl_client_set_streaming(self->client, threshold < 0 ? SIZE_MAX : (size_t)threshold,
                          (size_t)chunk);
  Py_RETURN_NONE;
}

/* streaming() -> (threshold or -1, chunk, compute_unary_only, backward_unary_only) */
static PyObject *client_streaming(client_obj *self, PyObject *unused) {
  size_t threshold = 0, chunk = 0;
  int no0 = 0, no1 = 0;
  (void)unused;
  if (self->client == NULL) {
    PyErr_SetString(PyExc_ValueError, "the client is closed");
    return NULL;
  }
  sl_client_streaming(self->client, &threshold, &chunk, &no0, &no1);
  return Py_BuildValue("(LnOO)", threshold == SIZE_MAX ? -1LL : (long long)threshold,
                       (Py_ssize_t)chunk, no0 ? Py_True : Py_False, no1 ? Py_True : Py_False);
}

/* busy_poll: the window of busy polling in seconds (client.h; 0: off) */
static PyObject *client_get_busy_poll(client_obj *self, void *closure) {
  (void)closure;
  return PyFloat_FromDouble(self->client != NULL ? sl_client_busy_poll(self->client) : 0.0);
}

static int client_set_busy_poll(client_obj *self, PyObject *value, void *closure) {
  double seconds;
  (void)closure;
  if (value == NULL) {
    PyErr_SetString(PyExc_AttributeError, "busy_poll cannot be deleted");
    return -1;
  }
  seconds = PyFloat_AsDouble(value);
  if (seconds == -1.0 && PyErr_Occurred()) return -1;
  if (!(seconds >= 0 && seconds <= 1.0)) {
    PyErr_SetString(PyExc_ValueError, "busy_poll must be seconds in [0, 1] (0: off)");
    return -1;
  }
  if (self->client == NULL) {
    PyErr_SetString(PyExc_ValueError, "the client is closed");
    return -1;
  }
  sl_client_set_busy_poll(self->client, seconds);
  return 0;
}

static PyGetSetDef client_getset[] = {
    {"busy_poll", (getter)client_get_busy_poll, (setter)client_set_busy_poll,
     "seconds a blocking unary call polls for its reply before it sleeps (0: off; 0 also "
     "where the process may run on one CPU only)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyObject *client_async_in_flight(client_obj *self, PyObject *unused) {
  (void)unused;
  return PyLong_FromSize_t(self->async != NULL ? sl_async_in_flight(self->async) : 0);
}

static int client_init(client_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"target", "options", "tls", "shm", NULL};
  PyObject *target, *options = Py_None, *tls = Py_None;
  int shm = 1;
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
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|OOp", kwlist, &target, &options, &tls,
                                   &shm)) {
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
  sl_client_set_shm(self->client, shm);
  return 0;
}

static int client_traverse(client_obj *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(self->target);
  return 0;
}

static int client_clear(client_obj *self) {
  Py_CLEAR(self->target);
  return 0;
}

static void client_dealloc(client_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  client_close(self, NULL);
  Py_CLEAR(self->target);
  Py_CLEAR(self->retry_hook);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static PyMethodDef client_methods[] = {
    {"compute", (PyCFunction)(void (*)(void))client_compute, METH_VARARGS | METH_KEYWORDS,
     "compute(leaves, form=0, nodes=None, timeout=0, metadata=None, ...) -> Reply"},
    {"plain", (PyCFunction)(void (*)(void))client_plain, METH_FASTCALL,
     "plain(tensor, timeout, metadata, wait_for_ready, retry, breaker, codecs, convert, "
     "model_id, request_id, stats) -> object (or a Reply when it carries KV pairs)"},
    {"health", (PyCFunction)(void (*)(void))client_health, METH_VARARGS | METH_KEYWORDS,
     "HealthCheck -> dict"},
    {"service_info", (PyCFunction)(void (*)(void))client_service_info,
     METH_VARARGS | METH_KEYWORDS, "GetServiceInfo -> dict"},
    {"std_health", (PyCFunction)(void (*)(void))client_std_health, METH_VARARGS | METH_KEYWORDS,
     "grpc.health.v1.Health/Check -> ServingStatus number"},
    {"connect", (PyCFunction)client_connect, METH_O, "connect(timeout) -> bool (channel ready)"},
    {"compute_async", (PyCFunction)(void (*)(void))client_compute_async,
     METH_VARARGS | METH_KEYWORDS,
     "compute_async(callback, leaves, form=0, nodes=None, ...) -> handle; callback(reply, exc) "
     "runs on the "
     "completion thread"},
    {"cancel_async", (PyCFunction)client_cancel_async, METH_O,
     "cancel_async(handle): cancel a call started by compute_async"},
    {"async_in_flight", (PyCFunction)client_async_in_flight, METH_NOARGS,
     "asynchronous calls started and not yet done"},
    {"close", (PyCFunction)client_close, METH_NOARGS,
     "Close the channel; asynchronous calls in flight end with CANCELLED."},
    {"shm_stats", (PyCFunction)client_shm_stats, METH_NOARGS,
     "shm_stats() -> {'state': 'on'|'off'|'undecided', 'segments': n, 'calls': n}: the "
     "same-host shared-memory channel"},
    {"set_streaming", (PyCFunction)(void (*)(void))client_set_streaming,
     METH_VARARGS | METH_KEYWORDS,
     "set_streaming(threshold, chunk=0): stream requests of threshold bytes and more (-1: "
     "never)"},
    {"streaming", (PyCFunction)client_streaming, METH_NOARGS,
     "streaming() -> (threshold, chunk, compute_unary_only, backward_unary_only)"},
    {"set_retry_hook", (PyCFunction)client_set_retry_hook, METH_O,
     "set_retry_hook(fn): fn(target, method, code, details, attempt, delay) before each retry"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot client_slots[] = {
    {Py_tp_init, client_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, client_dealloc},
    {Py_tp_traverse, client_traverse},
    {Py_tp_clear, client_clear},
    {Py_tp_methods, client_methods},
    {Py_tp_getset, client_getset},
    {Py_tp_doc, "The C client (internal; use splitlearn_comm.GRPCComputeClient)."},
    {0, NULL}};

PyType_Spec slpy_client_spec = {
    .name = "splitlearn_comm._core.Client",
    .basicsize = sizeof(client_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = client_slots,
};
