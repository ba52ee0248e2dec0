/* bench_codec.c: throughput of the float16/bfloat16 kernels and the codecs, and
 * an exhaustive check of the vector kernels against the scalar ones. Built on
 * demand, not by `make ctest` (its name does not start with test_):
 *
 *   gcc -std=gnu11 -O2 -Icsrc/core tests/c/bench_codec.c csrc/core/codec*.c \
 *       csrc/core/tensor.c csrc/core/dtype.c csrc/core/sl_common.c \
 *       $(pkg-config --cflags --libs libzstd zlib) -lpthread -lm -o build/bench_codec
 *   ./build/bench_codec              # kernels on 16M elements, then the codecs
 *   ./build/bench_codec --exhaustive # all 2^32 float32 inputs: vector == scalar
 *
 * GB/s counts bytes read plus bytes written. "warm" converts into an output
 * buffer that was used before; "fresh" allocates (malloc) the output each time
 * and so pays its page faults, as torch's tensor.half() does.
 *
 * PyTorch's own figures, for comparison (same machine, same counting):
 *
 *   import torch, time
 *   for th in (1, torch.get_num_threads()):
 *       torch.set_num_threads(th)
 *       x = torch.randn(16 << 20); h = x.half(); b = x.bfloat16()
 *       for name, f, a in (("f32->f16", lambda t: t.half(), x), ("f16->f32", lambda t: t.float(), h),
 *                          ("f32->bf16", lambda t: t.bfloat16(), x), ("bf16->f32", lambda t: t.float(), b)):
 *           best = min(timeit(f, a) for _ in range(20))   # seconds per call
 *           print(th, name, (16 << 20) * 6 / best / 1e9, "GB/s")
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codec.h"
#include "codec_internal.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef void (*kern_fn)(const void *in, void *out, size_t n);

static void k_f2h(const void *i, void *o, size_t n) { sl_f32_to_f16(i, o, n); }
static void k_h2f(const void *i, void *o, size_t n) { sl_f16_to_f32(i, o, n); }
static void k_f2b(const void *i, void *o, size_t n) { sl_f32_to_bf16(i, o, n); }
static void k_b2f(const void *i, void *o, size_t n) { sl_bf16_to_f32(i, o, n); }
static void k_f2h_s(const void *i, void *o, size_t n) { sl__f32_to_f16_scalar(i, o, n); }
static void k_h2f_s(const void *i, void *o, size_t n) { sl__f16_to_f32_scalar(i, o, n); }
static void k_f2b_s(const void *i, void *o, size_t n) { sl__f32_to_bf16_scalar(i, o, n); }
static void k_b2f_s(const void *i, void *o, size_t n) { sl__bf16_to_f32_scalar(i, o, n); }

static double best_of(kern_fn f, const void *in, size_t out_bytes, void *warm_out, size_t n,
                      int reps) {
  double best = 1e30;
  int r;
  for (r = 0; r < reps; r++) {
    void *out = warm_out ? warm_out : malloc(out_bytes);
    double t0 = now(), t;
    f(in, out, n);
    t = now() - t0;
    if (t < best) best = t;
    if (!warm_out) free(out);
  }
  return best;
}

static void bench_kernels(void) {
  const size_t n = (size_t)16 << 20;
  float *f = malloc(n * 4), *fo = malloc(n * 4);
  uint16_t *h = malloc(n * 2), *ho = malloc(n * 2), *b = malloc(n * 2);
  size_t i;
  struct {
    const char *name;
    kern_fn fast, scalar;
    const void *in;
    void *warm;
    size_t in_b, out_b;
  } ks[4];
  uint64_t s = 88172645463325252ULL;
  for (i = 0; i < n; i++) {
    double u1, u2;
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    u1 = ((double)(s >> 11) + 1.0) / 9007199254740993.0;
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    u2 = (double)(s >> 11) / 9007199254740992.0;
    f[i] = (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
  }
  sl_f32_to_f16(f, h, n);
  sl_f32_to_bf16(f, b, n);
  memset(fo, 0, n * 4);
  memset(ho, 0, n * 2);
  ks[0] = (typeof(ks[0])){"f32->f16 ", k_f2h, k_f2h_s, f, ho, 4, 2};
  ks[1] = (typeof(ks[0])){"f16->f32 ", k_h2f, k_h2f_s, h, fo, 2, 4};
  ks[2] = (typeof(ks[0])){"f32->bf16", k_f2b, k_f2b_s, f, ho, 4, 2};
  ks[3] = (typeof(ks[0])){"bf16->f32", k_b2f, k_b2f_s, b, fo, 2, 4};
  printf("kernels, %zu elements, one thread (%s), GB/s = (read + written) / time\n", n,
         sl__cpu_has_avx2_f16c() ? "AVX2+F16C" : "scalar only");
  printf("%-10s %12s %12s %12s\n", "", "warm", "fresh", "scalar warm");
  for (i = 0; i < 4; i++) {
    double bytes = (double)n * (double)(ks[i].in_b + ks[i].out_b);
    double tw = best_of(ks[i].fast, ks[i].in, n * ks[i].out_b, ks[i].warm, n, 20);
    double tf = best_of(ks[i].fast, ks[i].in, n * ks[i].out_b, NULL, n, 20);
    double ts = best_of(ks[i].scalar, ks[i].in, n * ks[i].out_b, ks[i].warm, n, 5);
    printf("%-10s %6.2f GB/s  %6.2f GB/s  %6.2f GB/s   (%.2f / %.2f / %.2f ms)\n", ks[i].name,
           bytes / tw / 1e9, bytes / tf / 1e9, bytes / ts / 1e9, tw * 1e3, tf * 1e3, ts * 1e3);
  }
  free(f);
  free(fo);
  free(h);
  free(ho);
  free(b);
}

static void bench_codecs(void) {
  const size_t n = (size_t)16 << 20;
  sl_tensor_desc d;
  sl_codec_spec bf = {.kind = SL_CODEC_KIND_BFLOAT16};
  sl_codec_spec sp = {.kind = SL_CODEC_KIND_SPARSE_COO};
  struct {
    const char *label;
    sl_codec_spec spec;
  } cs[] = {
      {"raw", {.kind = SL_CODEC_KIND_RAW}},
      {"float16", {.kind = SL_CODEC_KIND_FLOAT16}},
      {"bfloat16", {.kind = SL_CODEC_KIND_BFLOAT16}},
      {"cast->bf16", {.kind = SL_CODEC_KIND_CAST, .wire_dtype = SL_DTYPE_BFLOAT16}},
      {"int8", {.kind = SL_CODEC_KIND_INT8}},
      {"int8 axis1", {.kind = SL_CODEC_KIND_INT8, .per_channel = 1, .axis = 1}},
      {"sparse_coo", {.kind = SL_CODEC_KIND_SPARSE_COO}},
      {"zstd(raw) 1", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 1}},
      {"zstd(bf16) 3", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 3,
                        .inner = &bf}},
      {"zstd(sparse)", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 3,
                        .inner = &sp}},
      {"zlib(raw) 6", {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = 6}},
  };
  float *x = malloc(n * 4);
  size_t i, k;
  memset(&d, 0, sizeof(d));
  d.dtype = SL_DTYPE_FLOAT32;
  d.ndim = 2;
  d.shape[0] = 4096;
  d.shape[1] = (int64_t)(n / 4096);
  /* activations after a ReLU: half zeros, the rest normal-ish */
  for (i = 0; i < n; i++) {
    double v = sin((double)i * 0.7549) * 2.0;
    x[i] = v > 0 ? (float)v : 0.0f;
  }
  printf("\ncodecs on a float32 tensor [4096, %zu] (64 MiB, half zeros), MB/s of tensor\n",
         n / 4096);
  for (k = 0; k < sizeof(cs) / sizeof(cs[0]); k++) {
    sl_codec *c = NULL;
    sl_err err;
    double te = 1e30, td = 1e30;
    size_t len = 0;
    int r;
    if (sl_codec_create(&cs[k].spec, &c, &err) != SL_OK) {
      printf("%s: %s\n", cs[k].label, err.msg);
      continue;
    }
    for (r = 0; r < 3; r++) {
      void *p = NULL, *o = NULL;
      sl_meta m = {0};
      double t0 = now(), t1, t2;
      if (sl_codec_encode(c, &d, x, n * 4, &p, &len, &m, &err) != SL_OK) {
        printf("%s: %s\n", cs[k].label, err.msg);
        break;
      }
      t1 = now();
      if (sl_codec_decode(sl_codec_name(c), &d, p, len, &m, &o, &err) != SL_OK) {
        printf("%s: %s\n", cs[k].label, err.msg);
      }
      t2 = now();
      if (t1 - t0 < te) te = t1 - t0;
      if (t2 - t1 < td) td = t2 - t1;
      sl_storage_free(p);
      sl_storage_free(o);
      sl_meta_clear(&m);
    }
    printf("%-13s encode %8.0f MB/s  decode %8.0f MB/s  payload %5.1f%%\n", cs[k].label,
           n * 4 / te / 1e6, n * 4 / td / 1e6, 100.0 * (double)len / (double)(n * 4));
    sl_codec_destroy(c);
  }
  free(x);
  sl_storage_pool_trim();
}

static int exhaustive(void) {
  enum { CH = 1 << 24 };
  uint32_t *in = malloc((size_t)CH * 4);
  uint16_t *a = malloc((size_t)CH * 2), *b = malloc((size_t)CH * 2);
  uint64_t base;
  int bad = 0;
  if (!sl__cpu_has_avx2_f16c()) {
    printf("no AVX2+F16C: nothing to compare\n");
    return 0;
  }
  for (base = 0; base < ((uint64_t)1 << 32); base += CH) {
    uint32_t i;
    for (i = 0; i < CH; i++) in[i] = (uint32_t)(base + i);
    sl__f32_to_f16_avx2((const float *)in, a, CH);
    sl__f32_to_f16_scalar((const float *)in, b, CH);
    if (memcmp(a, b, (size_t)CH * 2) != 0) {
      printf("f32->f16 differs in [0x%08llx, +2^24)\n", (unsigned long long)base);
      bad = 1;
    }
    sl__f32_to_bf16_avx2((const float *)in, a, CH);
    sl__f32_to_bf16_scalar((const float *)in, b, CH);
    if (memcmp(a, b, (size_t)CH * 2) != 0) {
      printf("f32->bf16 differs in [0x%08llx, +2^24)\n", (unsigned long long)base);
      bad = 1;
    }
  }
  {
    /* and all 65536 half / bfloat16 inputs */
    uint16_t *hin = malloc(65536 * 2);
    float *fa = malloc(65536 * 4), *fb = malloc(65536 * 4);
    uint32_t i;
    for (i = 0; i < 65536; i++) hin[i] = (uint16_t)i;
    sl__f16_to_f32_avx2(hin, fa, 65536);
    sl__f16_to_f32_scalar(hin, fb, 65536);
    if (memcmp(fa, fb, 65536 * 4) != 0) bad = 1, printf("f16->f32 differs\n");
    sl__bf16_to_f32_avx2(hin, fa, 65536);
    sl__bf16_to_f32_scalar(hin, fb, 65536);
    if (memcmp(fa, fb, 65536 * 4) != 0) bad = 1, printf("bf16->f32 differs\n");
    free(hin);
    free(fa);
    free(fb);
  }
  printf("exhaustive: all 2^32 float32 -> float16/bfloat16 and all 2^16 back: %s\n",
         bad ? "MISMATCH" : "vector == scalar");
  free(in);
  free(a);
  free(b);
  return bad;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--exhaustive") == 0) return exhaustive();
  bench_kernels();
  bench_codecs();
  return 0;
}
