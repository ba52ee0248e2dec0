/* codec_quant.c: the "int8" codec, affine 8-bit quantization (to uint8) per
 * tensor or per channel, for float16, bfloat16, float32 and float64 tensors;
 * decoding gives back the original dtype.
 *
 * Parameters (PyTorch's MinMaxObserver convention, computed in double):
 *   lo = min(min(x), 0), hi = max(max(x), 0)   (so 0.0 is exactly representable)
 *   scale = hi/255 - lo/255                      (0 when hi == lo, i.e. all zeros)
 *   zero_point = round(-lo / scale), in 0..255
 *   q = clamp(floor(x / scale + 0.5) + zero_point, 0, 255)
 *   x' = (q - zero_point) * scale, clamped to the dtype's finite range, rounded
 *        to the dtype (float16 and bfloat16 through float32, as PyTorch does)
 * Error: |x - x'| <= scale / 2 for every element, up to the rounding of the
 * double arithmetic (a relative 1e-12 of scale) and of the final rounding to the
 * output dtype (half an ulp of x'; one ulp for float16/bfloat16, rounded twice).
 * A scale that would be below DBL_MIN (float64 tensors of subnormals only) is
 * raised to DBL_MIN; the bound then holds with that scale.
 *
 * Non-finite input: encoding refuses a tensor holding NaN or +-inf with SL_EINVAL
 * (INVALID_ARGUMENT, naming the first such element): no 8-bit code can carry it,
 * and mapping it to a finite value would hide a diverged model. All-zero and
 * empty tensors get scale 0 and zero point 0 and decode to +0.0 everywhere (so
 * -0.0 comes back as +0.0).
 *
 * Metadata:
 *   "per_channel" (bool)
 *   per tensor:  "scale" (double, finite, >= 0), "zero_point" (int, 0..255)
 *   per channel: "axis" (int, 0 <= axis < ndim, as a non-negative index)
 * Payload (little-endian):
 *   per tensor:  numel uint8 codes, C order
 *   per channel: C float64 scales (C = shape[axis]; each finite and >= 0),
 *                then C uint8 zero points, then numel uint8 codes, C order;
 *                channel c of element (o, c, i) uses scales[c], zero_points[c].
 * Length: exactly numel (+ 9 * C per channel).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "codec_internal.h"

#define NAME "int8"

static inline double load_el(sl_dtype dt, const void *base, size_t i) {
  switch (dt) {
    case SL_DTYPE_FLOAT32: {
      float f;
      memcpy(&f, (const char *)base + 4 * i, 4);
      return f;
    }
    case SL_DTYPE_FLOAT64: {
      double d;
      memcpy(&d, (const char *)base + 8 * i, 8);
      return d;
    }
    case SL_DTYPE_FLOAT16: {
      uint16_t h;
      memcpy(&h, (const char *)base + 2 * i, 2);
      return sl__f16_to_f32_one(h);
    }
    case SL_DTYPE_BFLOAT16: {
      uint16_t b;
      memcpy(&b, (const char *)base + 2 * i, 2);
      return sl__bf16_to_f32_one(b);
    }
    default: return 0.0;
  }
}

static double max_finite(sl_dtype dt) {
  switch (dt) {
    case SL_DTYPE_FLOAT16: return 65504.0;
    case SL_DTYPE_BFLOAT16: return 3.38953138925153547590470800371487866880e+38; /* 0x7F7F */
    case SL_DTYPE_FLOAT32: return FLT_MAX;
    default: return DBL_MAX;
  }
}

static inline void store_el(sl_dtype dt, void *base, size_t i, double v) {
  switch (dt) {
    case SL_DTYPE_FLOAT32: {
      float f = (float)v;
      memcpy((char *)base + 4 * i, &f, 4);
      break;
    }
    case SL_DTYPE_FLOAT64: memcpy((char *)base + 8 * i, &v, 8); break;
    case SL_DTYPE_FLOAT16: {
      uint16_t h = sl__f32_to_f16_one((float)v);
      memcpy((char *)base + 2 * i, &h, 2);
      break;
    }
    case SL_DTYPE_BFLOAT16: {
      uint16_t b = sl__f32_to_bf16_one((float)v);
      memcpy((char *)base + 2 * i, &b, 2);
      break;
    }
    default: break;
  }
}

/* scale and zero point from the range [mn, mx] of a tensor or channel */
static void choose_params(double mn, double mx, double *scale, int *zp) {
  double lo = mn < 0.0 ? mn : 0.0, hi = mx > 0.0 ? mx : 0.0, s, z;
  if (!(hi > lo)) { /* all zeros, or empty */
    *scale = 0.0;
    *zp = 0;
    return;
  }
  s = hi / 255.0 - lo / 255.0; /* no overflow, even for float64 near DBL_MAX */
  if (s < DBL_MIN) s = DBL_MIN;
  z = floor(-lo / s + 0.5);
  if (z < 0.0) z = 0.0;
  if (z > 255.0) z = 255.0;
  *scale = s;
  *zp = (int)z;
}

static inline uint8_t quantize(double x, double scale, int zp) {
  double q;
  if (scale == 0.0) return (uint8_t)zp;
  q = floor(x / scale + 0.5) + (double)zp;
  if (q < 0.0) q = 0.0;
  if (q > 255.0) q = 255.0;
  return (uint8_t)q;
}

static inline double dequantize(uint8_t q, double scale, int zp, double lim) {
  double v = ((double)q - (double)zp) * scale;
  if (v > lim) v = lim;
  if (v < -lim) v = -lim;
  return v + 0.0; /* -0.0 -> +0.0 */
}

/* the channel layout of `desc` along `axis`: outer x C x inner */
static void channel_layout(const sl_tensor_desc *desc, int axis, size_t *outer, size_t *chans,
                           size_t *inner) {
  size_t o = 1, in = 1;
  int i;
  for (i = 0; i < axis; i++) o *= (size_t)desc->shape[i];
  for (i = axis + 1; i < desc->ndim; i++) in *= (size_t)desc->shape[i];
  *outer = o;
  *chans = (size_t)desc->shape[axis];
  *inner = in;
}

static int refuse_nonfinite(double x, size_t i, sl_err *err) {
  return sl__codec_fail(err, SL_EINVAL, NAME,
                        "element %zu is %s; int8 quantization needs finite values", i,
                        isnan(x) ? "NaN" : (x > 0 ? "+inf" : "-inf"));
}

int sl__int8_encode(const sl_codec *c, const sl_tensor_desc *desc, size_t numel,
                    const void *data, size_t nbytes, void **payload, size_t *payload_len,
                    sl_meta *meta, sl_err *err) {
  int status = -1;
  sl_dtype dt = desc->dtype;
  void *buf = NULL;
  double *mins = NULL, *maxs = NULL;
  size_t len = 0, i;
  (void)nbytes;
  if (!c->spec.per_channel) {
    double mn = 0.0, mx = 0.0, scale;
    int zp;
    uint8_t *q;
    if (dt == SL_DTYPE_FLOAT32) {
      /* the common case, without the per-element dtype switch (vectorizes) */
      const float *f = data;
      float fmn = 0.0f, fmx = 0.0f, bad = 0.0f;
      for (i = 0; i < numel; i++) {
        float x = f[i];
        bad += x - x; /* NaN for NaN and +-inf, 0 otherwise */
        fmn = x < fmn ? x : fmn;
        fmx = x > fmx ? x : fmx;
      }
      if (bad != 0.0f || bad != bad) {
        for (i = 0; i < numel && isfinite(f[i]); i++) {
        }
        status = refuse_nonfinite(f[i], i, err);
        goto cleanup;
      }
      mn = fmn;
      mx = fmx;
    } else {
      for (i = 0; i < numel; i++) {
        double x = load_el(dt, data, i);
        if (!isfinite(x)) {
          status = refuse_nonfinite(x, i, err);
          goto cleanup;
        }
        if (x < mn) mn = x;
        if (x > mx) mx = x;
      }
    }
    choose_params(mn, mx, &scale, &zp);
    len = numel;
    if (sl_meta_add_bool(meta, "per_channel", 0) != SL_OK ||
        sl_meta_add_double(meta, "scale", scale) != SL_OK ||
        sl_meta_add_int(meta, "zero_point", zp) != SL_OK) {
      status = sl__codec_fail(err, SL_ENOMEM, NAME, "out of memory");
      goto cleanup;
    }
    if (sl_storage_alloc(len, &buf) != SL_OK) {
      status = sl__codec_fail(err, SL_ENOMEM, NAME, "cannot allocate %zu bytes", len);
      goto cleanup;
    }
    q = buf;
    if (dt == SL_DTYPE_FLOAT32 && scale != 0.0) {
      /* quantize() unrolled: floor(x/s + 0.5) + zp == trunc(x/s + 0.5 + zp) once
       * clamped to [0, 255], since zp is an integer; same bits, no branches */
      const float *f = data;
      const double bias = 0.5 + (double)zp;
      for (i = 0; i < numel; i++) {
        double t = (double)f[i] / scale + bias;
        t = t < 0.0 ? 0.0 : t;
        t = t > 255.0 ? 255.0 : t;
        q[i] = (uint8_t)t;
      }
    } else {
      for (i = 0; i < numel; i++) q[i] = quantize(load_el(dt, data, i), scale, zp);
    }
  } else {
    int axis = c->spec.axis;
    size_t outer, chans, inner, o, ch, k, idx;
    uint8_t *zps, *q;
    if (desc->ndim == 0) {
      status = sl__codec_fail(err, SL_EINVAL, NAME,
                              "per-channel quantization needs a tensor with a dimension");
      goto cleanup;
    }
    if (axis < 0) axis += desc->ndim;
    if (axis < 0 || axis >= desc->ndim) {
      status = sl__codec_fail(err, SL_EINVAL, NAME, "axis %d is out of range for %d dimensions",
                              c->spec.axis, desc->ndim);
      goto cleanup;
    }
    channel_layout(desc, axis, &outer, &chans, &inner);
    /* chans <= numel unless the tensor is empty; 9 * chans cannot overflow since
     * shape[axis] is an int64 dimension of a tensor whose byte count fits */
    if (sl__mul_size(chans, 9, &len) || sl__add_size(len, numel, &len)) {
      status = sl__codec_fail(err, SL_EINVAL, NAME, "the payload size overflows");
      goto cleanup;
    }
    mins = calloc(chans ? chans : 1, sizeof(double));
    maxs = calloc(chans ? chans : 1, sizeof(double));
    if (mins == NULL || maxs == NULL) {
      status = sl__codec_fail(err, SL_ENOMEM, NAME, "out of memory");
      goto cleanup;
    }
    idx = 0;
    for (o = 0; o < outer && numel > 0; o++) {
      for (ch = 0; ch < chans; ch++) {
        for (k = 0; k < inner; k++, idx++) {
          double x = load_el(dt, data, idx);
          if (!isfinite(x)) {
            status = refuse_nonfinite(x, idx, err);
            goto cleanup;
          }
          if (x < mins[ch]) mins[ch] = x;
          if (x > maxs[ch]) maxs[ch] = x;
        }
      }
    }
    if (sl_meta_add_bool(meta, "per_channel", 1) != SL_OK ||
        sl_meta_add_int(meta, "axis", axis) != SL_OK) {
      status = sl__codec_fail(err, SL_ENOMEM, NAME, "out of memory");
      goto cleanup;
    }
    if (sl_storage_alloc(len, &buf) != SL_OK) {
      status = sl__codec_fail(err, SL_ENOMEM, NAME, "cannot allocate %zu bytes", len);
      goto cleanup;
    }
    zps = (uint8_t *)buf + 8 * chans;
    q = zps + chans;
    for (ch = 0; ch < chans; ch++) {
      int zp;
      choose_params(mins[ch], maxs[ch], &mins[ch], &zp); /* mins[ch] now holds the scale */
      memcpy((char *)buf + 8 * ch, &mins[ch], 8);
      zps[ch] = (uint8_t)zp;
    }
    idx = 0;
    for (o = 0; o < outer && numel > 0; o++) {
      for (ch = 0; ch < chans; ch++) {
        for (k = 0; k < inner; k++, idx++) {
          q[idx] = quantize(load_el(dt, data, idx), mins[ch], zps[ch]);
        }
      }
    }
  }
  *payload = buf;
  *payload_len = len;
  buf = NULL;
  status = SL_OK;
cleanup:
  free(maxs);
  free(mins);
  sl_storage_free(buf);
  return status;
}

/* Read and check the metadata; *axis is -1 per tensor. */
static int read_meta(const sl_tensor_desc *desc, const sl_meta *meta, int *axis, double *scale,
                     int *zp, sl_err *err) {
  const sl_meta_value *pc, *v;
  int rc = sl__meta_need(meta, NAME, "per_channel", SL_META_BOOL, &pc, err);
  if (rc != SL_OK) return rc;
  *axis = -1;
  *scale = 0.0;
  *zp = 0;
  if (pc->i) {
    rc = sl__meta_need(meta, NAME, "axis", SL_META_INT, &v, err);
    if (rc != SL_OK) return rc;
    if (v->i < 0 || v->i >= desc->ndim) {
      return sl__codec_fail(err, SL_EINVAL, NAME,
                            "metadata 'axis' is %lld; the tensor has %d dimensions",
                            (long long)v->i, desc->ndim);
    }
    *axis = (int)v->i;
    return SL_OK;
  }
  rc = sl__meta_need(meta, NAME, "scale", SL_META_DOUBLE, &v, err);
  if (rc != SL_OK) return rc;
  if (!isfinite(v->d) || v->d < 0.0) {
    return sl__codec_fail(err, SL_EINVAL, NAME,
                          "metadata 'scale' is %g; it must be finite and >= 0", v->d);
  }
  *scale = v->d;
  rc = sl__meta_need(meta, NAME, "zero_point", SL_META_INT, &v, err);
  if (rc != SL_OK) return rc;
  if (v->i < 0 || v->i > 255) {
    return sl__codec_fail(err, SL_EINVAL, NAME, "metadata 'zero_point' is %lld, not in 0..255",
                          (long long)v->i);
  }
  *zp = (int)v->i;
  return SL_OK;
}

int sl__int8_payload_max(const sl_tensor_desc *desc, size_t numel, size_t nbytes,
                         const sl_meta *meta, size_t *max_len, sl_err *err) {
  int axis, zp, rc;
  double scale;
  (void)nbytes;
  rc = read_meta(desc, meta, &axis, &scale, &zp, err);
  if (rc != SL_OK) return rc;
  *max_len = numel;
  if (axis >= 0) {
    size_t chans = (size_t)desc->shape[axis], len;
    if (sl__mul_size(chans, 9, &len) || sl__add_size(len, numel, max_len)) {
      return sl__codec_fail(err, SL_EINVAL, NAME, "the payload size overflows");
    }
  }
  return SL_OK;
}

int sl__int8_decode(const sl_tensor_desc *desc, size_t numel, size_t nbytes, const void *payload,
                    size_t payload_len, const sl_meta *meta, void *out, sl_err *err) {
  int axis, zp, rc;
  double scale, lim = max_finite(desc->dtype);
  size_t need, i;
  sl_dtype dt = desc->dtype;
  const uint8_t *p = payload;
  rc = sl__int8_payload_max(desc, numel, nbytes, meta, &need, err);
  if (rc != SL_OK) return rc;
  (void)read_meta(desc, meta, &axis, &scale, &zp, err);
  if (payload_len != need) {
    return sl__codec_fail(err, SL_EINVAL, NAME,
                          "payload has %zu bytes; %zu elements need %zu (%s)", payload_len,
                          numel, need, axis >= 0 ? "per channel" : "per tensor");
  }
  if (axis < 0) {
    if (dt == SL_DTYPE_FLOAT32) {
      float *f = out;
      for (i = 0; i < numel; i++) {
        double v = ((double)p[i] - (double)zp) * scale;
        v = v > lim ? lim : v;
        v = v < -lim ? -lim : v;
        f[i] = (float)(v + 0.0);
      }
      return SL_OK;
    }
    for (i = 0; i < numel; i++) store_el(dt, out, i, dequantize(p[i], scale, zp, lim));
    return SL_OK;
  }
  {
    size_t outer, chans, inner, o, ch, k, idx = 0;
    const uint8_t *zps, *q;
    channel_layout(desc, axis, &outer, &chans, &inner);
    zps = p + 8 * chans;
    q = zps + chans;
    for (ch = 0; ch < chans; ch++) {
      double s;
      memcpy(&s, p + 8 * ch, 8);
      if (!isfinite(s) || s < 0.0) {
        return sl__codec_fail(err, SL_EINVAL, NAME,
                              "the scale of channel %zu is %g; it must be finite and >= 0", ch,
                              s);
      }
    }
    for (o = 0; o < outer && numel > 0; o++) {
      for (ch = 0; ch < chans; ch++) {
        double s;
        memcpy(&s, p + 8 * ch, 8);
        for (k = 0; k < inner; k++, idx++) {
          store_el(dt, out, idx, dequantize(q[idx], s, zps[ch], lim));
        }
      }
    }
  }
  return SL_OK;
}
