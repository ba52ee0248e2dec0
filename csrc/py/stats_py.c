/* stats_py.c: _core.CallStats, the counters behind GRPCComputeClient.get_statistics().
 *
 * One object per client. Every method runs with the GIL held and never releases
 * it, so each update is atomic with respect to the other Python threads (the
 * calling threads and the asynchronous calls' completion thread): no lock of its
 * own. Client.plain() updates it in C at the end of a call (slpy_stats_ok), which
 * is why it lives here and not in Python: a small call's bookkeeping in Python
 * cost more than the call's own work in the binding.
 *
 * Ownership: the object owns its window of recent latencies (PyMem) and its
 * by_code dict. */
#include "slpy.h"

#include <string.h>

#define STATS_WINDOW 4096 /* the latest calls kept for percentiles */

typedef struct stats_obj {
  PyObject_HEAD
  long long total, ok, failed, retries, bytes_sent, bytes_received;
  double total_ms, compute_ms, network_ms;
  long long by_transport[SL_TRANSPORT_COUNT];
  PyObject *by_code; /* dict: status name -> failed calls */
  double *recent;    /* ring of the latest STATS_WINDOW latencies (ms) */
  size_t n_recent, next_recent;
} stats_obj;

static PyObject *stats_new(PyTypeObject *tp, PyObject *args, PyObject *kwargs) {
  stats_obj *self;
  if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "CallStats() takes no arguments");
    return NULL;
  }
  self = (stats_obj *)tp->tp_alloc(tp, 0);
  if (self == NULL) return NULL;
  self->recent = PyMem_Calloc(STATS_WINDOW, sizeof(double));
  self->by_code = PyDict_New();
  if (self->recent == NULL || self->by_code == NULL) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  return (PyObject *)self;
}

static void stats_dealloc(stats_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyMem_Free(self->recent);
  Py_XDECREF(self->by_code);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static void add_latency(stats_obj *s, double ms) {
  s->recent[s->next_recent] = ms;
  s->next_recent = (s->next_recent + 1) % STATS_WINDOW;
  if (s->n_recent < STATS_WINDOW) s->n_recent++;
}

/* A finished call: counted, its latency kept; ok calls add their times. */
static void add_call(stats_obj *s, int ok, double ms, double server_ms) {
  s->total++;
  add_latency(s, ms);
  if (ok) {
    s->ok++;
    s->total_ms += ms;
    s->compute_ms += server_ms;
    s->network_ms += ms > server_ms ? ms - server_ms : 0.0;
  } else {
    s->failed++;
  }
}

static void add_reply(stats_obj *s, int attempts, int transport, size_t sent, size_t received) {
  if (attempts > 1) s->retries += attempts - 1;
  if (transport < 0 || transport >= SL_TRANSPORT_COUNT) transport = SL_TRANSPORT_UNARY;
  s->by_transport[transport]++;
  s->bytes_sent += (long long)sent;
  s->bytes_received += (long long)received;
}

int slpy_stats_check(slpy_state *st, PyObject *obj) {
  if (Py_TYPE(obj) != st->stats_type) {
    PyErr_Format(PyExc_TypeError, "stats must be a CallStats, not %.100s", Py_TYPE(obj)->tp_name);
    return -1;
  }
  return 0;
}

void slpy_stats_ok(PyObject *stats, double ms, double server_ms, int attempts, int transport,
                   size_t sent, size_t received) {
  stats_obj *s = (stats_obj *)stats;
  add_call(s, 1, ms, server_ms);
  add_reply(s, attempts, transport, sent, received);
}

/* A Reply's attempts, transport and bytes into add_reply. */
static int add_reply_object(stats_obj *s, PyObject *reply) {
  PyObject *attempts = PyObject_GetAttrString(reply, "attempts");
  PyObject *transport = attempts ? PyObject_GetAttrString(reply, "transport") : NULL;
  PyObject *sent = transport ? PyObject_GetAttrString(reply, "bytes_sent") : NULL;
  PyObject *received = sent ? PyObject_GetAttrString(reply, "bytes_received") : NULL;
  int rc = -1, t = SL_TRANSPORT_UNARY;
  long a;
  long long bs, br;
  if (received == NULL) goto cleanup;
  a = PyLong_AsLong(attempts);
  bs = PyLong_AsLongLong(sent);
  br = PyLong_AsLongLong(received);
  if (PyErr_Occurred()) goto cleanup;
  if (!PyUnicode_Check(transport)) {
    PyErr_SetString(PyExc_TypeError, "a reply's transport must be a str");
    goto cleanup;
  }
  for (int i = 0; i < SL_TRANSPORT_COUNT; i++) {
    if (PyUnicode_CompareWithASCIIString(transport, sl_transport_name(i)) == 0) t = i;
  }
  add_reply(s, (int)a, t, (size_t)(bs > 0 ? bs : 0), (size_t)(br > 0 ? br : 0));
  rc = 0;
cleanup:
  Py_XDECREF(attempts);
  Py_XDECREF(transport);
  Py_XDECREF(sent);
  Py_XDECREF(received);
  return rc;
}

/* record(ok, ms, server_ms, reply): a finished call of `ms` milliseconds;
 * server_ms (None: 0) the server's compute time; reply (None or a Reply) adds
 * its retries, bytes and transport. */
static PyObject *stats_record(stats_obj *self, PyObject *const *args, Py_ssize_t nargs) {
  int ok;
  double ms, server_ms = 0.0;
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "record(ok, ms, server_ms, reply)");
    return NULL;
  }
  ok = PyObject_IsTrue(args[0]);
  ms = PyFloat_AsDouble(args[1]);
  if (args[2] != Py_None) server_ms = PyFloat_AsDouble(args[2]);
  if (ok < 0 || PyErr_Occurred()) return NULL;
  add_call(self, ok, ms, server_ms);
  if (args[3] != Py_None && add_reply_object(self, args[3]) < 0) return NULL;
  Py_RETURN_NONE;
}

/* count_error(code_name, attempts): a failed call's status and retries. */
static PyObject *stats_count_error(stats_obj *self, PyObject *const *args, Py_ssize_t nargs) {
  PyObject *n, *sum;
  long long before = 0;
  long attempts;
  int rc;
  if (nargs != 2 || !PyUnicode_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "count_error(code_name: str, attempts: int)");
    return NULL;
  }
  attempts = PyLong_AsLong(args[1]);
  if (attempts == -1 && PyErr_Occurred()) return NULL;
  n = PyDict_GetItemWithError(self->by_code, args[0]); /* borrowed */
  if (n == NULL && PyErr_Occurred()) return NULL;
  if (n != NULL && (before = PyLong_AsLongLong(n)) == -1 && PyErr_Occurred()) return NULL;
  sum = PyLong_FromLongLong(before + 1);
  if (sum == NULL) return NULL;
  rc = PyDict_SetItem(self->by_code, args[0], sum);
  Py_DECREF(sum);
  if (rc < 0) return NULL;
  if (attempts > 1) self->retries += attempts - 1;
  Py_RETURN_NONE;
}

/* snapshot() -> dict of every counter, by_code and by_transport as new dicts and
 * recent as a list (oldest first). */
static PyObject *stats_snapshot(stats_obj *self, PyObject *unused) {
  PyObject *d = NULL, *recent = NULL, *codes = NULL, *transports = NULL;
  size_t start = (self->next_recent + STATS_WINDOW - self->n_recent) % STATS_WINDOW;
  (void)unused;
  recent = PyList_New((Py_ssize_t)self->n_recent);
  codes = PyDict_Copy(self->by_code);
  transports = PyDict_New();
  if (recent == NULL || codes == NULL || transports == NULL) goto cleanup;
  for (size_t i = 0; i < self->n_recent; i++) {
    PyObject *v = PyFloat_FromDouble(self->recent[(start + i) % STATS_WINDOW]);
    if (v == NULL) goto cleanup;
    PyList_SET_ITEM(recent, (Py_ssize_t)i, v);
  }
  for (int t = 0; t < SL_TRANSPORT_COUNT; t++) {
    PyObject *v = PyLong_FromLongLong(self->by_transport[t]);
    int rc = v != NULL ? PyDict_SetItemString(transports, sl_transport_name(t), v) : -1;
    Py_XDECREF(v);
    if (rc < 0) goto cleanup;
  }
  d = Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:d,s:d,s:d,s:O,s:O,s:O}", "total", self->total,
                    "ok", self->ok, "failed", self->failed, "retries", self->retries,
                    "bytes_sent", self->bytes_sent, "bytes_received", self->bytes_received,
                    "total_ms", self->total_ms, "compute_ms", self->compute_ms, "network_ms",
                    self->network_ms, "by_code", codes, "by_transport", transports, "recent",
                    recent);
cleanup:
  Py_XDECREF(recent);
  Py_XDECREF(codes);
  Py_XDECREF(transports);
  return d;
}

static PyMethodDef stats_methods[] = {
    {"record", (PyCFunction)(void (*)(void))stats_record, METH_FASTCALL,
     "record(ok, ms, server_ms, reply): a finished call"},
    {"count_error", (PyCFunction)(void (*)(void))stats_count_error, METH_FASTCALL,
     "count_error(code_name, attempts): a failed call's status and retries"},
    {"snapshot", (PyCFunction)stats_snapshot, METH_NOARGS,
     "snapshot() -> dict of the counters (recent: the latest latencies, oldest first)"},
    {NULL, NULL, 0, NULL}};

static PyType_Slot stats_slots[] = {
    {Py_tp_new, stats_new},
    {Py_tp_dealloc, stats_dealloc},
    {Py_tp_methods, stats_methods},
    {Py_tp_doc, "Counters of a client's calls (internal; see "
                "GRPCComputeClient.get_statistics). Updated with the GIL held."},
    {0, NULL}};

PyType_Spec slpy_stats_spec = {
    .name = "splitlearn_comm._core.CallStats",
    .basicsize = sizeof(stats_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = stats_slots,
};
