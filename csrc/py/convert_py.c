/* convert_py.c: conversions between Python objects and the core's values
 * (channel options, metadata, exceptions, typed codec metadata, shapes, tensors a
 * Python codec already encoded). Called with the GIL unless a comment says
 * otherwise. Failing functions follow the ownership rule of sl_common.h.
 */
#include "slpy.h" /* first: Python.h must come before any system header */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
  /* the type's short name: tp_name after its last dot, as type.__name__ gives */
  const char *name = Py_TYPE(exc)->tp_name;
  const char *dot = strrchr(name, '.');
  if (dot != NULL) name = dot + 1;
  if (msg[0] != '\0') {
    snprintf(buf, buflen, "%s: %s", name, msg);
  } else {
    snprintf(buf, buflen, "%s", name);
  }
  Py_XDECREF(s);
}

/* ---- codec metadata and pre-encoded tensors ---- */

int slpy_meta_from_dict(PyObject *dict, sl_meta *out) {
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  if (dict == NULL || dict == Py_None) return 0;
  if (!PyDict_Check(dict)) {
    PyErr_Format(PyExc_TypeError, "codec metadata must be a dict, got %.100s",
                 Py_TYPE(dict)->tp_name);
    return -1;
  }
  while (PyDict_Next(dict, &pos, &key, &value)) {
    const char *k;
    int rc = SL_OK;
    if (!PyUnicode_Check(key)) {
      PyErr_Format(PyExc_TypeError, "codec metadata keys must be str, got %.100s",
                   Py_TYPE(key)->tp_name);
      return -1;
    }
    k = PyUnicode_AsUTF8(key);
    if (k == NULL) return -1;
    /* bool first: it is an int too. NumPy scalars: np.bool_ has __bool__ only,
     * np.integer has __index__, np.floating has __float__. */
    if (PyBool_Check(value) || strcmp(Py_TYPE(value)->tp_name, "numpy.bool_") == 0 ||
        strcmp(Py_TYPE(value)->tp_name, "numpy.bool") == 0) {
      int b = PyObject_IsTrue(value);
      if (b < 0) return -1;
      rc = sl_meta_add_bool(out, k, b);
    } else if (PyLong_Check(value) || (!PyFloat_Check(value) && PyIndex_Check(value))) {
      long long v;
      PyObject *idx = PyNumber_Index(value);
      if (idx == NULL) return -1;
      v = PyLong_AsLongLong(idx);
      Py_DECREF(idx);
      if (v == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_OverflowError, "codec metadata '%s': int does not fit 64 bits", k);
        return -1;
      }
      rc = sl_meta_add_int(out, k, v);
    } else if (PyFloat_Check(value) || (PyNumber_Check(value) && !PyUnicode_Check(value) &&
                                        !PyBytes_Check(value) &&
                                        PyObject_HasAttrString(value, "__float__"))) {
      double d = PyFloat_AsDouble(value);
      if (d == -1.0 && PyErr_Occurred()) return -1;
      rc = sl_meta_add_double(out, k, d);
    } else if (PyUnicode_Check(value)) {
      const char *sv = PyUnicode_AsUTF8(value);
      if (sv == NULL) return -1;
      rc = sl_meta_add_string(out, k, sv);
    } else if (PyBytes_Check(value) || PyByteArray_Check(value) || PyMemoryView_Check(value)) {
      Py_buffer view;
      if (PyObject_GetBuffer(value, &view, PyBUF_SIMPLE) < 0) return -1;
      rc = sl_meta_add_bytes(out, k, view.buf, (size_t)view.len);
      PyBuffer_Release(&view);
    } else {
      PyErr_Format(PyExc_TypeError,
                   "codec metadata '%s': values must be float, int, str, bytes or bool, "
                   "got %.100s",
                   k, Py_TYPE(value)->tp_name);
      return -1;
    }
    if (rc != SL_OK) {
      PyErr_NoMemory();
      return -1;
    }
  }
  return 0;
}

PyObject *slpy_meta_to_dict(const sl_meta *m) {
  PyObject *d = PyDict_New();
  if (d == NULL) return NULL;
  for (size_t i = 0; i < m->n; i++) {
    const sl_meta_value *v = &m->items[i];
    PyObject *o = NULL;
    switch (v->type) {
      case SL_META_DOUBLE: o = PyFloat_FromDouble(v->d); break;
      case SL_META_INT: o = PyLong_FromLongLong(v->i); break;
      case SL_META_BOOL: o = PyBool_FromLong(v->i != 0); break;
      case SL_META_STRING: o = PyUnicode_DecodeUTF8(v->bytes, (Py_ssize_t)v->len, "replace"); break;
      case SL_META_BYTES: o = PyBytes_FromStringAndSize(v->bytes, (Py_ssize_t)v->len); break;
    }
    if (o == NULL || PyDict_SetItemString(d, v->key, o) < 0) {
      Py_XDECREF(o);
      Py_DECREF(d);
      return NULL;
    }
    Py_DECREF(o);
  }
  return d;
}

PyObject *slpy_shape_tuple(const sl_tensor_desc *d) {
  PyObject *t = PyTuple_New(d->ndim);
  if (t == NULL) return NULL;
  for (int i = 0; i < d->ndim; i++) {
    PyObject *v = PyLong_FromLongLong(d->shape[i]);
    if (v == NULL) {
      Py_DECREF(t);
      return NULL;
    }
    PyTuple_SET_ITEM(t, i, v);
  }
  return t;
}

/* Called without the GIL, from any thread. */
void slpy_encoded_release(void *owner) {
  slpy_encoded *e = owner;
  if (e == NULL) return;
  if (e->has_view) {
    if (slpy_is_finalizing()) return; /* leak rather than touch a dying runtime */
    PyGILState_STATE g = PyGILState_Ensure();
    PyBuffer_Release(&e->view);
    PyGILState_Release(g);
  }
  sl_meta_clear(&e->meta);
  PyMem_RawFree(e);
}

int slpy_encoded_from_tuple(PyObject *t, sl_tensor_out *out) {
  PyObject *data, *shape, *meta, *seq = NULL;
  const char *dtype, *codec;
  slpy_encoded *e = NULL;
  int status = -1;

  if (!PyArg_ParseTuple(t, "OOssO;an encoded tensor is (data, shape, dtype, codec, metadata)",
                        &data, &shape, &dtype, &codec, &meta)) {
    return -1;
  }
  memset(out, 0, sizeof(*out));
  if (sl_dtype_from_name(dtype, strlen(dtype), &out->desc.dtype) != SL_OK) {
    PyErr_Format(PyExc_ValueError, "unknown dtype '%s'", dtype);
    return -1;
  }
  seq = PySequence_Fast(shape, "the shape a codec returns must be a sequence of ints");
  if (seq == NULL) return -1;
  if (PySequence_Fast_GET_SIZE(seq) > SL_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "shape has more than %d dimensions", SL_MAX_NDIM);
    goto cleanup;
  }
  out->desc.ndim = (int)PySequence_Fast_GET_SIZE(seq);
  for (int i = 0; i < out->desc.ndim; i++) {
    long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (v == -1 && PyErr_Occurred()) goto cleanup;
    if (v < 0 || v > INT32_MAX) {
      PyErr_Format(PyExc_ValueError, "shape dimension %d (%lld) is out of range", i, v);
      goto cleanup;
    }
    out->desc.shape[i] = v;
  }
  if (strlen(codec) >= sizeof(e->codec)) {
    PyErr_SetString(PyExc_ValueError, "codec name too long (127 bytes at most)");
    goto cleanup;
  }
  e = PyMem_RawCalloc(1, sizeof(*e));
  if (e == NULL) {
    PyErr_NoMemory();
    goto cleanup;
  }
  if (slpy_meta_from_dict(meta, &e->meta) < 0) goto cleanup;
  if (PyObject_GetBuffer(data, &e->view, PyBUF_SIMPLE) < 0) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "a codec's data must be bytes or another buffer, got %.100s",
                 Py_TYPE(data)->tp_name);
    goto cleanup;
  }
  e->has_view = 1;
  strcpy(e->codec, codec);
  out->data = e->view.buf;
  out->nbytes = (size_t)e->view.len;
  out->encoded = 1;
  out->codec_name = e->codec;
  out->meta = &e->meta;
  out->release = slpy_encoded_release;
  out->owner = e;
  e = NULL;
  status = 0;
cleanup:
  if (e != NULL) {
    sl_meta_clear(&e->meta);
    PyMem_RawFree(e);
  }
  Py_XDECREF(seq);
  return status;
}

