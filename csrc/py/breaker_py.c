/* breaker_py.c: _core.Breaker, the C circuit breaker (retry.h) for Python.
 *
 * Breaker(failure_threshold, reset_timeout, half_open_attempts)
 *   .allow() -> (bool, seconds until it may, failures)   .record(code)   .state -> str
 * Passed as breaker= to Client calls, it is consulted and told in C, without the GIL.
 */
#include "retry.h"
#include "slpy.h"

typedef struct breaker_obj {
  PyObject_HEAD
  sl_breaker *b;
} breaker_obj;

sl_breaker *slpy_breaker_of(slpy_state *st, PyObject *obj, int *error) {
  *error = 0;
  if (obj == NULL || obj == Py_None) return NULL;
  if (!PyObject_TypeCheck(obj, st->breaker_type)) {
    PyErr_Format(PyExc_TypeError, "expected a _core.Breaker, got %.100s", Py_TYPE(obj)->tp_name);
    *error = 1;
    return NULL;
  }
  return ((breaker_obj *)obj)->b;
}

static int breaker_init(breaker_obj *self, PyObject *args, PyObject *kwargs) {
  static char *kwlist[] = {"failure_threshold", "reset_timeout", "half_open_attempts", NULL};
  int threshold, half_open;
  double reset;
  if (self->b != NULL) {
    PyErr_SetString(PyExc_RuntimeError, "Breaker.__init__ called twice");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "idi", kwlist, &threshold, &reset, &half_open)) {
    return -1;
  }
  if (sl_breaker_create(threshold, reset, half_open, &self->b) != SL_OK) {
    PyErr_NoMemory();
    return -1;
  }
  return 0;
}

static PyObject *breaker_allow(breaker_obj *self, PyObject *unused) {
  double now = sl_now(), retry_at = now;
  int failures = 0, ok;
  (void)unused;
  ok = sl_breaker_allow(self->b, now, &retry_at, &failures);
  return Py_BuildValue("(Ndi)", PyBool_FromLong(ok), ok ? 0.0 : retry_at - now, failures);
}

static PyObject *breaker_record(breaker_obj *self, PyObject *arg) {
  long code = PyLong_AsLong(arg);
  if (code == -1 && PyErr_Occurred()) return NULL;
  sl_breaker_record(self->b, (int)code, sl_now());
  Py_RETURN_NONE;
}

static PyObject *breaker_get_state(breaker_obj *self, void *closure) {
  static const char *const names[] = {"closed", "open", "half_open"};
  int failures;
  (void)closure;
  return PyUnicode_FromString(names[sl_breaker_state(self->b, &failures)]);
}

static void breaker_dealloc(breaker_obj *self) {
  PyTypeObject *tp = Py_TYPE(self);
  sl_breaker_destroy(self->b);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static PyMethodDef breaker_methods[] = {
    {"allow", (PyCFunction)breaker_allow, METH_NOARGS,
     "allow() -> (allowed, seconds until allowed, failures)"},
    {"record", (PyCFunction)breaker_record, METH_O, "record(grpc status code number)"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef breaker_getset[] = {
    {"state", (getter)breaker_get_state, NULL, "'closed', 'open' or 'half_open'", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyType_Slot breaker_slots[] = {
    {Py_tp_init, breaker_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, breaker_dealloc},
    {Py_tp_methods, breaker_methods},
    {Py_tp_getset, breaker_getset},
    {Py_tp_doc, "A thread-safe circuit breaker in C (internal; see splitlearn_comm.CircuitBreaker)."},
    {0, NULL}};

PyType_Spec slpy_breaker_spec = {
    .name = "splitlearn_comm._core.Breaker",
    .basicsize = sizeof(breaker_obj),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = breaker_slots,
};
