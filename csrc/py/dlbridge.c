/* dlbridge.c: tensors across the Python/C boundary through DLPack.
 *
 * Export (sending): the producer's __dlpack__() capsule is consumed (renamed
 * "used_dltensor", as the protocol asks) and its DLManagedTensor kept until the
 * gRPC core is done with the bytes; then its deleter runs, without the GIL.
 * Import (receiving): storage allocated by the core becomes a DLPackTensor object
 * whose __dlpack__() hands out a legacy "dltensor" capsule, which torch.from_dlpack
 * and numpy.from_dlpack both take without copying.
 */
#include <dlpack/dlpack.h>

#include "slpy.h"

/* ---- export ---- */

static const char *device_name(int type) {
  switch (type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLROCM: return "rocm";
    case kDLMetal: return "mps";
    default: return "an accelerator";
  }
}

/* A DLPack tensor that can be sent as it is: in CPU memory and C-contiguous
 * (size-1 dimensions may have any stride). */
static int dl_plain(const DLTensor *t) {
  int64_t expect = 1;
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) return 0;
  if (t->strides == NULL || t->ndim < 0 || t->ndim > SL_MAX_NDIM) return 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] == 0) return 1; /* no bytes: any strides */
    if (t->shape[i] != 1 && t->strides[i] != expect) return 0;
    expect *= t->shape[i];
  }
  return 1;
}

/* Fill `ex` from an unused "dltensor" capsule and consume it (renamed, so its
 * destructor leaves the tensor to us). The capsule reference stays the caller's. */
static int export_capsule(PyObject *capsule, slpy_export *ex) {
  DLManagedTensor *dlm = PyCapsule_GetPointer(capsule, "dltensor");
  DLTensor *t;
  size_t nbytes = 0;

  if (dlm == NULL) return -1;
  t = &dlm->dl_tensor;
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) {
    PyErr_Format(PyExc_ValueError, "tensor is on %s; only CPU memory can be sent directly",
                 device_name(t->device.device_type));
    return -1;
  }
  if (sl_dtype_from_dlpack(t->dtype.code, t->dtype.bits, t->dtype.lanes, &ex->desc.dtype) !=
      SL_OK) {
    PyErr_Format(PyExc_TypeError,
                 "unsupported tensor dtype (DLPack code %d, %d bits, %d lanes); supported: %s",
                 (int)t->dtype.code, (int)t->dtype.bits, (int)t->dtype.lanes, sl_dtype_names());
    return -1;
  }
  if (t->ndim < 0 || t->ndim > SL_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "tensor has %d dimensions; at most %d are supported",
                 t->ndim, SL_MAX_NDIM);
    return -1;
  }
  ex->desc.ndim = t->ndim;
  for (int i = 0; i < t->ndim; i++) ex->desc.shape[i] = t->shape[i];
  if (sl_desc_nbytes(&ex->desc, &nbytes) != SL_OK) {
    PyErr_SetString(PyExc_ValueError, "tensor shape is invalid or too large");
    return -1;
  }
  if (nbytes > 0 && !dl_plain(t)) {
    PyErr_SetString(PyExc_ValueError, "tensor is not contiguous; call .contiguous() first");
    return -1;
  }
  ex->data = (const char *)t->data + t->byte_offset;
  ex->nbytes = nbytes;
  /* consume the capsule: from here on we own dlm and must call its deleter */
  if (PyCapsule_SetName(capsule, "used_dltensor") < 0) return -1;
  ex->dlm = dlm;
  return 0;
}

int slpy_export_tensor(PyObject *obj, slpy_export *ex) {
  int status = -1;
  PyObject *capsule;

  memset(ex, 0, sizeof(*ex));
  if (PyCapsule_CheckExact(obj) && PyCapsule_IsValid(obj, "dltensor")) {
    /* a capsule made by the caller (torch.utils.dlpack.to_dlpack: far cheaper per
     * tensor than Tensor.__dlpack__), consumed here like one __dlpack__ gives */
    capsule = Py_NewRef(obj);
  } else {
    capsule = PyObject_CallMethod(obj, "__dlpack__", NULL);
  }
  if (capsule == NULL) {
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
      PyErr_Format(PyExc_TypeError,
                   "expected a tensor (torch.Tensor, numpy.ndarray or any object with "
                   "__dlpack__), got %.200s",
                   Py_TYPE(obj)->tp_name);
    }
    return -1;
  }
  status = export_capsule(capsule, ex);
  Py_DECREF(capsule);
  return status;
}

/* Whether st->torch_tensor and st->to_dlpack are known: looked up once torch is
 * imported (a NumPy-only process never imports it; until then every leaf takes
 * the Python path). 1 yes, 0 not (yet), -1 error. */
static int torch_known(slpy_state *st) {
  PyObject *torch, *c_mod = NULL, *tensor = NULL, *to_dlpack = NULL;
  if (st->torch_tensor != NULL) return 1;
  torch = PyImport_GetModule(st->str_torch);
  if (torch == NULL) return PyErr_Occurred() ? -1 : 0;
  tensor = PyObject_GetAttrString(torch, "Tensor");
  if (tensor != NULL) c_mod = PyObject_GetAttrString(torch, "_C");
  if (c_mod != NULL) to_dlpack = PyObject_GetAttrString(c_mod, "_to_dlpack");
  Py_DECREF(torch);
  Py_XDECREF(c_mod);
  if (tensor == NULL || to_dlpack == NULL || !PyType_Check(tensor)) {
    /* a torch without these (or still being imported): the Python path serves */
    PyErr_Clear();
    Py_XDECREF(tensor);
    Py_XDECREF(to_dlpack);
    return 0;
  }
  st->torch_tensor = tensor;
  st->to_dlpack = to_dlpack;
  return 1;
}

/* obj.<name>() as a truth value: 1, 0, or -1 with an exception. */
static int call_flag(PyObject *obj, PyObject *name) {
  PyObject *r = PyObject_CallMethodNoArgs(obj, name);
  int v;
  if (r == NULL) return -1;
  v = PyObject_IsTrue(r);
  Py_DECREF(r);
  return v;
}

/* The fast path of a torch.Tensor leaf: its DLPack capsule when the tensor can be
 * sent as it is (CPU, C-contiguous, no conjugate or negative bit: those bits are
 * not in DLPack, the bytes would be sent unresolved). 1: exported into ex; 0: not
 * plain (nothing exported, no exception); -1: error. */
static int export_plain_torch(slpy_state *st, PyObject *obj, slpy_export *ex) {
  PyObject *capsule;
  DLManagedTensor *dlm;
  int flag, rc;

  capsule = PyObject_CallOneArg(st->to_dlpack, obj);
  if (capsule == NULL) {
    /* sparse and nested tensors have no DLPack form: prepare() says what to do */
    if (!PyErr_ExceptionMatches(PyExc_RuntimeError)) return -1;
    PyErr_Clear();
    return 0;
  }
  dlm = PyCapsule_GetPointer(capsule, "dltensor");
  if (dlm == NULL || !dl_plain(&dlm->dl_tensor)) {
    Py_DECREF(capsule); /* unused: its destructor frees the DLPack tensor */
    if (dlm == NULL) PyErr_Clear();
    return 0;
  }
  /* only a complex tensor has a conjugate bit; a negative bit can sit on any view
   * (x.conj().imag is a real one) */
  flag = dlm->dl_tensor.dtype.code == kDLComplex ? call_flag(obj, st->str_is_conj) : 0;
  if (flag == 0) flag = call_flag(obj, st->str_is_neg);
  if (flag != 0) {
    Py_DECREF(capsule);
    return flag < 0 ? -1 : 0;
  }
  rc = export_capsule(capsule, ex);
  Py_DECREF(capsule);
  return rc < 0 ? -1 : 1;
}

int slpy_export_leaf(slpy_state *st, PyObject *obj, slpy_export *ex) {
  PyObject *ready;
  int rc;

  memset(ex, 0, sizeof(*ex));
  if (st->export_slow == NULL) return slpy_export_tensor(obj, ex);
  if (st->torch_tensor == NULL && torch_known(st) < 0) return -1;
  if (st->torch_tensor != NULL && (PyObject *)Py_TYPE(obj) == st->torch_tensor) {
    rc = export_plain_torch(st, obj, ex);
    if (rc != 0) return rc < 0 ? -1 : 0;
  }
  /* a DLPack capsule is exported as it is: its producer made it sendable */
  if (PyCapsule_CheckExact(obj) && PyCapsule_IsValid(obj, "dltensor")) {
    return slpy_export_tensor(obj, ex);
  }
  ready = PyObject_CallOneArg(st->export_slow, obj);
  if (ready == NULL) return -1;
  rc = slpy_export_tensor(ready, ex);
  Py_DECREF(ready);
  return rc;
}

/* Called without the GIL, from any thread. */
void slpy_export_release(void *p) {
  DLManagedTensor *dlm = p;
  if (dlm != NULL && dlm->deleter != NULL) dlm->deleter(dlm);
}

/* ---- import ---- */

/* DLPack 1.0's versioned tensor (capsule "dltensor_versioned"). Debian's
 * dlpack.h (0.6) predates it; the layout is fixed by the DLPack 1.x ABI. Consumers
 * that ask for it (NumPy 2 passes max_version=(1, 0)) learn that the tensor is
 * writable: from a legacy capsule NumPy makes a read-only array. */
typedef struct sl_dlpack_version {
  uint32_t major;
  uint32_t minor;
} sl_dlpack_version;

typedef struct sl_dlmtensor_versioned {
  sl_dlpack_version version;
  void *manager_ctx;
  void (*deleter)(struct sl_dlmtensor_versioned *self);
  uint64_t flags; /* bit 0: read only; bit 1: is copied; none set */
  DLTensor dl_tensor;
} sl_dlmtensor_versioned;

/* One received tensor and the two DLPack views of it. Ownership follows two
 * references: the producer side's (the holder, then the capsule it hands out) and
 * the consumer's (taken by a consumer that renames the capsule, released through
 * the deleter). The storage is freed by the first deleter call only, the struct
 * when both references are gone. A consumer that fails after it already called
 * the deleter but before it renamed the capsule (torch.from_dlpack does this when
 * it cannot compute strides) then costs nothing: the capsule's destructor calls
 * the deleter again, which finds the storage already freed. Both counters are
 * atomics: deleters run on any thread, with or without the GIL. */
typedef struct owned_tensor {
  DLManagedTensor dlm;              /* handed out as a legacy capsule, or */
  sl_dlmtensor_versioned versioned; /* as a versioned one; both describe the same bytes */
  int64_t shape[SL_MAX_NDIM];
  void (*release)(void *);          /* lets go of the bytes: sl_storage_free, or a */
  void *owner;                      /* lender's unlend (a shared-memory segment) */
  int refs;                         /* 2 until the capsule or the deleter lets go */
  int freed;                        /* the storage was freed (first deleter call) */
} owned_tensor;

static void owned_unref(owned_tensor *o) {
  if (__atomic_sub_fetch(&o->refs, 1, __ATOMIC_ACQ_REL) == 0) PyMem_RawFree(o);
}

/* The consumer's release: frees the storage once, whatever number of calls. */
static void owned_release_data(owned_tensor *o) {
  if (__atomic_exchange_n(&o->freed, 1, __ATOMIC_ACQ_REL)) return;
  if (o->release != NULL) o->release(o->owner);
  owned_unref(o);
}

/* Producer side gone without the consumer ever taking the tensor (a holder never
 * exported, a capsule never consumed): free the storage and the struct. */
static void owned_free(owned_tensor *o) {
  owned_release_data(o);
  owned_unref(o);
}

/* The deleters of tensors we hand out: any thread, no GIL needed. */
static void owned_deleter(DLManagedTensor *self) {
  owned_release_data((owned_tensor *)self->manager_ctx);
}

static void owned_versioned_deleter(sl_dlmtensor_versioned *self) {
  owned_release_data((owned_tensor *)self->manager_ctx);
}

typedef struct holder {
  PyObject_HEAD
  owned_tensor *tensor; /* NULL once handed out through DLPack */
  size_t nbytes;
  Py_ssize_t exports;   /* live buffer views: DLPack export is refused while > 0 */
} holder;

static void storage_release(void *p) { sl_storage_free(p); }

/* The owned_tensor of received bytes: release(owner) lets go of them, once (also
 * when this fails). */
static owned_tensor *owned_new(void *data, const sl_tensor_desc *desc, void (*release)(void *),
                               void *owner) {
  owned_tensor *o = PyMem_RawCalloc(1, sizeof(*o));
  if (o == NULL) {
    if (release != NULL) release(owner);
    PyErr_NoMemory();
    return NULL;
  }
  o->release = release;
  o->owner = owner;
  o->dlm.dl_tensor.data = data;
  o->dlm.dl_tensor.device.device_type = kDLCPU;
  o->dlm.dl_tensor.device.device_id = 0;
  o->dlm.dl_tensor.ndim = desc->ndim;
  sl_dtype_to_dlpack(desc->dtype, &o->dlm.dl_tensor.dtype.code, &o->dlm.dl_tensor.dtype.bits);
  o->dlm.dl_tensor.dtype.lanes = 1;
  for (int i = 0; i < desc->ndim; i++) o->shape[i] = desc->shape[i];
  o->dlm.dl_tensor.shape = o->shape;
  o->dlm.dl_tensor.strides = NULL; /* C-contiguous */
  o->dlm.dl_tensor.byte_offset = 0;
  o->dlm.manager_ctx = o;
  o->dlm.deleter = owned_deleter;
  o->versioned.version.major = 1;
  o->versioned.version.minor = 0;
  o->versioned.manager_ctx = o;
  o->versioned.deleter = owned_versioned_deleter;
  o->versioned.flags = 0;
  o->versioned.dl_tensor = o->dlm.dl_tensor;
  o->refs = 2;
  o->freed = 0;
  return o;
}

PyObject *slpy_holder_new(slpy_state *st, void *storage, const sl_tensor_desc *desc) {
  return slpy_holder_new_lent(st, storage, desc, storage_release, storage);
}

PyObject *slpy_holder_new_lent(slpy_state *st, void *data, const sl_tensor_desc *desc,
                               void (*release)(void *), void *owner) {
  holder *h;
  owned_tensor *o = owned_new(data, desc, release, owner);
  if (o == NULL) return NULL;
  h = PyObject_New(holder, st->holder_type);
  if (h == NULL) {
    owned_free(o);
    return NULL;
  }
  h->tensor = o;
  h->exports = 0;
  if (sl_desc_nbytes(desc, &h->nbytes) != SL_OK) h->nbytes = 0;
  return (PyObject *)h;
}

static void capsule_destructor(PyObject *capsule);

PyObject *slpy_capsule_new(void *data, const sl_tensor_desc *desc, void (*release)(void *),
                           void *owner) {
  PyObject *capsule;
  owned_tensor *o = owned_new(data, desc, release, owner);
  if (o == NULL) return NULL;
  capsule = PyCapsule_New(&o->dlm, "dltensor", capsule_destructor);
  if (capsule == NULL) {
    owned_free(o);
    return NULL;
  }
  if (PyCapsule_SetContext(capsule, o) < 0) {
    Py_DECREF(capsule); /* no context: its destructor leaves the tensor alone */
    owned_free(o);
    return NULL;
  }
  return capsule;
}

/* A capsule still under its first name was never consumed and owns the data
 * too; a renamed one was taken by a consumer, which calls the deleter itself.
 * Either way the capsule's own reference goes. */
static void capsule_destructor(PyObject *capsule) {
  const char *name = PyCapsule_GetName(capsule);
  owned_tensor *o = PyCapsule_GetContext(capsule);
  if (o == NULL) return; /* never handed out (see holder_dlpack) */
  if (name != NULL && (strcmp(name, "dltensor") == 0 || strcmp(name, "dltensor_versioned") == 0)) {
    owned_release_data(o);
  }
  owned_unref(o);
}

/* __dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None): a
 * versioned capsule when the consumer takes DLPack 1.x, a legacy one otherwise.
 * The tensor is on the CPU, so stream, dl_device and copy need no action. */
static PyObject *holder_dlpack(holder *self, PyObject *args, PyObject *kwargs) {
  PyObject *capsule, *max_version = NULL;
  int versioned = 0;
  (void)args;
  if (kwargs != NULL) max_version = PyDict_GetItemString(kwargs, "max_version");
  if (max_version != NULL && max_version != Py_None) {
    PyObject *major = PySequence_GetItem(max_version, 0);
    if (major == NULL) return NULL;
    versioned = PyLong_AsLong(major) >= 1;
    Py_DECREF(major);
    if (PyErr_Occurred()) return NULL;
  }
  if (self->tensor == NULL) {
    PyErr_SetString(PyExc_BufferError, "this tensor was already exported once");
    return NULL;
  }
  if (self->exports > 0) {
    PyErr_SetString(PyExc_BufferError, "this tensor's bytes are viewed by a memoryview");
    return NULL;
  }
  capsule = versioned ? PyCapsule_New(&self->tensor->versioned, "dltensor_versioned",
                                      capsule_destructor)
                      : PyCapsule_New(&self->tensor->dlm, "dltensor", capsule_destructor);
  if (capsule == NULL) return NULL;
  if (PyCapsule_SetContext(capsule, self->tensor) < 0) {
    /* no context: the destructor leaves the tensor alone, so it stays ours */
    Py_DECREF(capsule);
    return NULL;
  }
  self->tensor = NULL;
  return capsule;
}

/* The legacy capsule of a DLPackTensor, as __dlpack__() with no arguments hands
 * out (the bindings' fast path: no method lookup, no argument tuple). */
PyObject *slpy_holder_capsule(PyObject *obj) {
  return holder_dlpack((holder *)obj, NULL, NULL);
}

static PyObject *holder_dlpack_device(holder *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return Py_BuildValue("(ii)", (int)kDLCPU, 0);
}

static void holder_dealloc(holder *self) {
  PyTypeObject *tp = Py_TYPE(self);
  if (self->tensor != NULL) owned_free(self->tensor);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
}

static int holder_getbuffer(holder *self, Py_buffer *view, int flags) {
  if (self->tensor == NULL) {
    PyErr_SetString(PyExc_BufferError, "this tensor was already exported through DLPack");
    return -1;
  }
  if (PyBuffer_FillInfo(view, (PyObject *)self, self->tensor->dlm.dl_tensor.data,
                        (Py_ssize_t)self->nbytes, 0, flags) < 0) {
    return -1;
  }
  self->exports++;
  return 0;
}

static void holder_releasebuffer(holder *self, Py_buffer *view) {
  (void)view;
  self->exports--;
}

static PyMethodDef holder_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))holder_dlpack, METH_VARARGS | METH_KEYWORDS,
     "Hand out the tensor as a DLPack capsule (once)."},
    {"__dlpack_device__", (PyCFunction)holder_dlpack_device, METH_NOARGS,
     "The (device type, device id) of the tensor: always the CPU."},
    {NULL, NULL, 0, NULL}};

static PyType_Slot holder_slots[] = {
    {Py_tp_dealloc, holder_dealloc},
    {Py_tp_methods, holder_methods},
    {Py_bf_getbuffer, holder_getbuffer},
    {Py_bf_releasebuffer, holder_releasebuffer},
    {Py_tp_doc, "A received tensor, owned by C, exported once through DLPack."},
    {0, NULL}};

PyType_Spec slpy_holder_spec = {
    .name = "splitlearn_comm._core.DLPackTensor",
    .basicsize = sizeof(holder),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = holder_slots,
};
