/* slpy.h: internal to the splitlearn_comm._core extension; not a public header.
 *
 * GIL contract of this layer: every function here is called with the GIL held
 * unless its comment says "called without the GIL". Those are the hooks the C
 * core calls from its own threads; each takes the GIL itself on its first line
 * with PyGILState_Ensure() and gives it back on its one exit.
 *
 * Failing functions follow the ownership rule of sl_common.h: what a function
 * is given is its own on every path, and a failed call has already freed or
 * released it.
 */
#ifndef SLPY_H
#define SLPY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>

#include "chanargs.h"
#include "codec.h"
#include "message.h"
#include "sl_common.h"
#include "tensor.h"

#if PY_VERSION_HEX < 0x030A0000
#error "splitlearn_comm needs CPython 3.10 or newer (Py_NewRef, PyModule_AddObjectRef)"
#endif

/* Whether the interpreter is exiting; safe to call without the GIL. `slpy_exiting`
 * is set by an atexit callback that module_exec registers when _core is imported:
 * atexit runs its callbacks last registered first, so this one runs after those of
 * the library and the user (registered later, e.g. a server's stop), and before
 * the interpreter begins finalizing. From CPython 3.13 the public
 * Py_IsFinalizing() is asked too (before 3.13 it exists only as private API,
 * which the extension does not use). */
#include <stdatomic.h>
extern atomic_int slpy_exiting;
#if PY_VERSION_HEX >= 0x030D0000
#define slpy_is_finalizing() (atomic_load(&slpy_exiting) || Py_IsFinalizing())
#else
#define slpy_is_finalizing() atomic_load(&slpy_exiting)
#endif

/* Module state: one per module object (heap types, no static type objects). */
typedef struct slpy_state {
  PyTypeObject *holder_type; /* DLPackTensor */
  PyTypeObject *server_type;
  PyTypeObject *client_type;
  PyTypeObject *codec_type;
  PyTypeObject *codecs_type; /* _core.Codecs */
  PyTypeObject *callstate_type;
  PyTypeObject *breaker_type;
  PyTypeObject *stats_type;  /* _core.CallStats */
  PyTypeObject *leaf_type;   /* _core.Leaf: a received tensor (struct sequence) */
  PyTypeObject *out_type;    /* _core.OutTensor: a tensor to send */
  PyTypeObject *reply_type;  /* _core.Reply: what Client.compute returns */
  PyTypeObject *call_type;   /* _core.Call: what the compute callback receives */
  PyObject *call_error;      /* _core.CallError */
  PyObject *codec_error;     /* _core.CodecError (a ValueError): a codec failed */
  unsigned long main_thread;
  /* Exporting a leaf (slpy_export_leaf): the Python path for what is not a plain
   * CPU torch.Tensor (_tensor.export_slow, set by _core.set_export_fallback), and
   * torch.Tensor / torch._C._to_dlpack once torch is imported. */
  PyObject *export_slow;
  PyObject *torch_tensor;
  PyObject *to_dlpack;
  PyObject *str_torch, *str_is_conj, *str_is_neg; /* interned names */
} slpy_state;

slpy_state *slpy_state_of_module(PyObject *module);
slpy_state *slpy_state_of_type(PyTypeObject *tp);

/* ---- DLPack bridge (dlbridge.c) ---- */

/* A tensor exported by a producer through DLPack, ready to send. */
typedef struct slpy_export {
  sl_tensor_desc desc;
  const void *data;
  size_t nbytes;
  void *dlm; /* DLManagedTensor*, owned: give it to slpy_export_release() */
} slpy_export;

/* Export `obj` (anything with __dlpack__: torch.Tensor, numpy.ndarray; or an
 * unused "dltensor" capsule, which is consumed) as a contiguous CPU tensor. Raises TypeError / ValueError naming what is wrong. On
 * success the caller must eventually pass ex->dlm to slpy_export_release. */
int slpy_export_tensor(PyObject *obj, slpy_export *ex);

/* Export one leaf of a call or a result, whatever it is (a torch.Tensor, a NumPy
 * array, any DLPack producer, a capsule): a contiguous CPU torch.Tensor without
 * conjugate or negative bit goes straight through torch's DLPack export in C;
 * anything else through st->export_slow (prepare() in Python: to the CPU,
 * contiguous, resolved, or the error that says why not). Same contract as
 * slpy_export_tensor. */
int slpy_export_leaf(slpy_state *st, PyObject *obj, slpy_export *ex);

/* Release an exported tensor: runs the producer's DLPack deleter.
 * Called without the GIL, from any thread (DLPack deleters may be; NumPy's takes
 * the GIL itself, PyTorch's needs none). */
void slpy_export_release(void *dlm);

/* A new DLPackTensor object that owns `storage` (from sl_storage_alloc) and
 * exposes it through __dlpack__ / __dlpack_device__, and its bytes through the
 * buffer protocol (memoryview(obj): writable, 1-D, unsigned bytes). On failure
 * the storage is freed and NULL returned with an exception set. */
PyObject *slpy_holder_new(slpy_state *st, void *storage, const sl_tensor_desc *desc);
/* The same over bytes someone else owns: release(owner) runs once, from any thread,
 * when the last view lets go (also on failure). */
PyObject *slpy_holder_new_lent(slpy_state *st, void *data, const sl_tensor_desc *desc,
                               void (*release)(void *), void *owner);

extern PyType_Spec slpy_holder_spec;
/* A new legacy "dltensor" capsule over received bytes, without a DLPackTensor:
 * torch.from_dlpack and torch._C._from_dlpack take it without copying; release(owner)
 * runs once, from any thread, when the consumer lets go (also on failure). */
PyObject *slpy_capsule_new(void *data, const sl_tensor_desc *desc, void (*release)(void *),
                           void *owner);
/* A new legacy "dltensor" capsule of `holder` (a DLPackTensor), as its
 * __dlpack__() without arguments: once only, then BufferError. */
PyObject *slpy_holder_capsule(PyObject *holder);
extern PyType_Spec slpy_server_spec;
extern PyType_Spec slpy_client_spec;
extern PyType_Spec slpy_codec_spec;
extern PyType_Spec slpy_codecs_spec;
extern PyType_Spec slpy_callstate_spec;
extern PyType_Spec slpy_breaker_spec;
extern PyType_Spec slpy_stats_spec;

/* ---- call statistics (stats_py.c) ---- */

/* 0 when obj is a _core.CallStats; -1 with TypeError otherwise. */
int slpy_stats_check(slpy_state *st, PyObject *obj);
/* Count a successful call of `ms` milliseconds in a CallStats (checked by the
 * caller): server_ms the server's compute time (0: not known), attempts, the
 * transport (sl_transport) and the message bytes. Needs the GIL. */
void slpy_stats_ok(PyObject *stats, double ms, double server_ms, int attempts, int transport,
                   size_t sent, size_t received);

/* The sl_breaker of a _core.Breaker (borrowed), NULL for None, TypeError otherwise. */
struct sl_breaker *slpy_breaker_of(slpy_state *st, PyObject *obj, int *error);

/* The sl_codec of a _core.Codec object (borrowed; lives as long as the object),
 * NULL (no exception) for None, NULL with TypeError for anything else. */
const sl_codec *slpy_codec_of(slpy_state *st, PyObject *obj, int *error);

/* The sl_codecs of a _core.Codecs (borrowed; lives as long as the object), NULL
 * (no exception) for None, NULL with TypeError for anything else. */
sl_codecs *slpy_codecs_of(slpy_state *st, PyObject *obj, int *error);

/* _core.python_codec(codec, name, accepts, wrap, prepare) */
PyObject *slpy_python_codec(PyObject *module, PyObject *args);

/* _core.decode(name, payload, shape, dtype, metadata) */
PyObject *slpy_codec_decode(PyObject *module, PyObject *args);

/* ---- codec metadata ---- */

/* Convert a dict of str -> float | int | str | bytes | bool (NumPy scalars too)
 * into `out` (which must start empty). TypeError names a bad key or value. */
int slpy_meta_from_dict(PyObject *dict, sl_meta *out);

/* A new dict with the same Python types the sender used. */
PyObject *slpy_meta_to_dict(const sl_meta *m);

/* An already-encoded tensor handed over by Python: (data, shape, dtype, codec, meta).
 * Owns a buffer view of `data` (released with the GIL taken) and the metadata. */
typedef struct slpy_encoded {
  Py_buffer view;
  sl_meta meta;
  char codec[128];
  int has_view;
} slpy_encoded;

/* Fill an sl_tensor_out from a 5-tuple (data, shape, dtype, codec, meta). On
 * success out->owner is a new slpy_encoded released by slpy_encoded_release. */
int slpy_encoded_from_tuple(PyObject *t, sl_tensor_out *out);

/* Release function of slpy_encoded: called without the GIL, from any thread. */
void slpy_encoded_release(void *owner);

/* Shape tuple of a descriptor. */
PyObject *slpy_shape_tuple(const sl_tensor_desc *d);

/* ---- tensors across the binding (tensors_py.c) ---- */

/* Make the struct sequence types (Leaf, OutTensor, Reply, Call) and add them to
 * the module. */
int slpy_tensor_types_init(slpy_state *st, PyObject *module);

/* The received tensors of `m` as a new list of Leaf (their data is taken: each
 * item's data is NULL afterwards) and the structure as a new list of node tuples
 * (None unless the structure form). On failure both are NULL, an exception is
 * set, and what was taken is freed. */
int slpy_msg_to_python(slpy_state *st, sl_tensor_msg *m, PyObject **leaves, PyObject **nodes);

/* _core.rebuild(form, leaves, nodes, convert) -> (obj, values): module function. */
PyObject *slpy_rebuild(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* _core.flatten(obj, tensor_type) -> (items, nodes), or None for what only
 * _structure.flatten's Python walker handles: module function. */
PyObject *slpy_flatten(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* The received tensors of `m`, each given to `convert` as a DLPack capsule
 * (their data is taken), as a new list *values, and the object they were sent
 * as (the structure rebuilt from m's nodes, a dict by name, or the single
 * tensor) as *value: what _core.rebuild makes of Leaf objects, without them.
 * On failure both are NULL and an exception is set. */
int slpy_msg_to_value(sl_tensor_msg *m, PyObject *convert, PyObject **value, PyObject **values);

/* Arrays and strings of an outgoing sl_tensor_set. */
typedef struct slpy_setbuf slpy_setbuf;

/* Fill `set` from a sequence of OutTensor and (structure form) the node tuples.
 * On success each item's release is owed to the core (sl_client_compute or the
 * server consumes them) and *buf must be freed with slpy_setbuf_free() once the
 * set was packed. On failure nothing is owed: what was exported is released,
 * and an exception is set. */
int slpy_set_from_python(slpy_state *st, PyObject *leaves, int form, PyObject *nodes,
                         sl_tensor_set *set, slpy_setbuf **buf);

/* Free a setbuf; called without the GIL too (plain memory). */
void slpy_setbuf_free(void *buf);

/* ---- shared helpers (module.c) ---- */

/* Convert `options` (None or a sequence of (str, int|bool|str)) into channel
 * arguments. *out is PyMem-allocated (free with PyMem_Free); the strings point
 * into `options`' objects, so `options` must outlive their use. */
int slpy_parse_options(PyObject *options, sl_chan_arg **out, size_t *n);

/* Convert metadata (None or a sequence of (str, str|bytes) pairs) into sl_kv
 * pointing into the objects. PyMem-allocated array; free with PyMem_Free. */
int slpy_parse_metadata(PyObject *md, sl_kv **out, size_t *n);

/* A tuple of (key, value) pairs; values of "-bin" keys as bytes, others as str. */
PyObject *slpy_metadata_tuple(const sl_kv *kv, size_t n);

/* The exception's text as "TypeName: message" in buf. Clears nothing. */
void slpy_format_exception(PyObject *exc, char *buf, size_t buflen);

#endif /* SLPY_H */
