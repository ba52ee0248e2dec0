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

int slpy_export_tensor(PyObject *obj, slpy_export *ex) {
  int status = -1;
  PyObject *capsule = NULL;
  DLManagedTensor *dlm = NULL;
  DLTensor *t;
  size_t nbytes = 0;

  memset(ex, 0, sizeof(*ex));
  capsule = PyObject_CallMethod(obj, "__dlpack__", NULL);
  if (capsule == NULL) {
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
      PyErr_Format(PyExc_TypeError,
                   "expected a tensor (torch.Tensor, numpy.ndarray or any object with "
                   "__dlpack__), got %.200s",
                   Py_TYPE(obj)->tp_name);
    }
    goto cleanup;
  }
  dlm = PyCapsule_GetPointer(capsule, "dltensor");
  if (dlm == NULL) goto cleanup;
  t = &dlm->dl_tensor;
  if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) {
    PyErr_Format(PyExc_ValueError, "tensor is on %s; only CPU memory can be sent directly",
                 device_name(t->device.device_type));
    dlm = NULL;
    goto cleanup;
  }
  if (sl_dtype_from_dlpack(t->dtype.code, t->dtype.bits, t->dtype.lanes, &ex->desc.dtype) !=
      SL_OK) {
    PyErr_Format(PyExc_TypeError,
                 "unsupported tensor dtype (DLPack code %d, %d bits, %d lanes); supported: "
                 "float16, bfloat16, float32, float64, complex64, complex128, int8, int16, "
                 "int32, int64, uint8, uint16, uint32, uint64, bool",
                 (int)t->dtype.code, (int)t->dtype.bits, (int)t->dtype.lanes);
    dlm = NULL;
    goto cleanup;
  }
  if (t->ndim < 0 || t->ndim > SL_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "tensor has %d dimensions; at most %d are supported",
                 t->ndim, SL_MAX_NDIM);
    dlm = NULL;
    goto cleanup;
  }
  ex->desc.ndim = t->ndim;
  for (int i = 0; i < t->ndim; i++) ex->desc.shape[i] = t->shape[i];
  if (sl_desc_nbytes(&ex->desc, &nbytes) != SL_OK) {
    PyErr_SetString(PyExc_ValueError, "tensor shape is invalid or too large");
    dlm = NULL;
    goto cleanup;
  }
  if (t->strides != NULL && nbytes > 0) {
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
      if (t->shape[i] != 1 && t->strides[i] != expect) {
        PyErr_SetString(PyExc_ValueError,
                        "tensor is not contiguous; call .contiguous() first");
        dlm = NULL;
        goto cleanup;
      }
      expect *= t->shape[i];
    }
  }
  ex->data = (const char *)t->data + t->byte_offset;
  ex->nbytes = nbytes;
  /* consume the capsule: from here on we own dlm and must call its deleter */
  if (PyCapsule_SetName(capsule, "used_dltensor") < 0) {
    dlm = NULL;
    goto cleanup;
  }
  ex->dlm = dlm;
  status = 0;
cleanup:
  Py_XDECREF(capsule);
  return status;
}

/* Called without the GIL, from any thread. */
void slpy_export_release(void *p) {
  DLManagedTensor *dlm = p;
  if (dlm != NULL && dlm->deleter != NULL) dlm->deleter(dlm);
}

/* ---- import ---- */

typedef struct owned_tensor {
  DLManagedTensor dlm;
  int64_t shape[SL_MAX_NDIM];
} owned_tensor;

/* The deleter of tensors we hand out: any thread, no GIL needed. */
static void owned_deleter(DLManagedTensor *self) {
  owned_tensor *o = (owned_tensor *)self;
  sl_storage_free(self->dl_tensor.data);
  PyMem_RawFree(o);
}

typedef struct holder {
  PyObject_HEAD
  owned_tensor *tensor; /* NULL once handed out */
} holder;

PyObject *slpy_holder_new(slpy_state *st, void *storage, const sl_tensor_desc *desc) {
  holder *h;
  owned_tensor *o = PyMem_RawCalloc(1, sizeof(*o));
  if (o == NULL) {
    sl_storage_free(storage);
    return PyErr_NoMemory();
  }
  o->dlm.dl_tensor.data = storage;
  o->dlm.dl_tensor.device.device_type = kDLCPU;
  o->dlm.dl_tensor.device.device_id = 0;
  o->dlm.dl_tensor.ndim = desc->ndim;
  sl_dtype_to_dlpack(desc->dtype, &o->dlm.dl_tensor.dtype.code, &o->dlm.dl_tensor.dtype.bits);
  o->dlm.dl_tensor.dtype.lanes = 1;
  for (int i = 0; i < desc->ndim; i++) o->shape[i] = desc->shape[i];
  o->dlm.dl_tensor.shape = o->shape;
  o->dlm.dl_tensor.strides = NULL; /* C-contiguous */
  o->dlm.dl_tensor.byte_offset = 0;
  o->dlm.manager_ctx = NULL;
  o->dlm.deleter = owned_deleter;
  h = PyObject_New(holder, st->holder_type);
  if (h == NULL) {
    owned_deleter(&o->dlm);
    return NULL;
  }
  h->tensor = o;
  return (PyObject *)h;
}

static void capsule_destructor(PyObject *capsule) {
  /* A capsule never consumed still owns its tensor. */
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    DLManagedTensor *dlm = PyCapsule_GetPointer(capsule, "dltensor");
    if (dlm != NULL && dlm->deleter != NULL) dlm->deleter(dlm);
  }
}

static PyObject *holder_dlpack(holder *self, PyObject *args, PyObject *kwargs) {
  PyObject *capsule;
  (void)args;
  (void)kwargs; /* stream, max_version, dl_device, copy: a legacy CPU capsule fits all */
  if (self->tensor == NULL) {
    PyErr_SetString(PyExc_BufferError, "this tensor was already exported once");
    return NULL;
  }
  capsule = PyCapsule_New(&self->tensor->dlm, "dltensor", capsule_destructor);
  if (capsule == NULL) return NULL;
  self->tensor = NULL;
  return capsule;
}

static PyObject *holder_dlpack_device(holder *self, PyObject *unused) {
  (void)self;
  (void)unused;
  return Py_BuildValue("(ii)", (int)kDLCPU, 0);
}

static void holder_dealloc(holder *self) {
  PyTypeObject *tp = Py_TYPE(self);
  if (self->tensor != NULL) owned_deleter(&self->tensor->dlm);
  tp->tp_free((PyObject *)self);
  Py_DECREF(tp);
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
    {Py_tp_doc, "A received tensor, owned by C, exported once through DLPack."},
    {0, NULL}};

PyType_Spec slpy_holder_spec = {
    .name = "splitlearn_comm._core.DLPackTensor",
    .basicsize = sizeof(holder),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = holder_slots,
};
