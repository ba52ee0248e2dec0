/* fuzz_input.h: the byte format of the codec fuzz target's inputs, shared by the
 * target (fuzz_codec.c) and the seed generator (gen_corpus.c). Test code only.
 *
 *   codec   1 byte, an index into FUZZ_CODECS (modulo its length)
 *   dtype   1 byte, modulo SL_DTYPE_COUNT
 *   ndim    1 byte, modulo 5
 *   dims    ndim little-endian uint16 values
 *   nmeta   1 byte, modulo 9
 *   entries type (1 byte, modulo 5: double, int, bool, string, bytes),
 *           key length (1 byte, modulo 32), key bytes, then the value:
 *           8 bytes (double, int), 1 byte (bool), length (1 byte) and bytes
 *           (string), length (2 bytes, little-endian) and bytes (bytes)
 *   payload every byte left
 * Running out of input ends the header early: what was read is used.
 */
#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

#include <stdint.h>
#include <string.h>

#include "codec.h"
#include "tensor.h"

static const char *const FUZZ_CODECS[] = {"cast", "float16", "bfloat16",  "int8",
                                          "zstd", "zlib",    "sparse_coo", "raw"};
#define FUZZ_NCODECS (sizeof(FUZZ_CODECS) / sizeof(FUZZ_CODECS[0]))

typedef struct fuzz_reader {
  const uint8_t *p;
  size_t left;
} fuzz_reader;

static inline int fuzz_take(fuzz_reader *r, void *dst, size_t n) {
  if (r->left < n) return -1;
  memcpy(dst, r->p, n);
  r->p += n;
  r->left -= n;
  return 0;
}

static inline uint8_t fuzz_u8(fuzz_reader *r) {
  uint8_t v = 0;
  fuzz_take(r, &v, 1);
  return v;
}

/* Parse an input; `meta` must start empty (cleared by the caller either way). */
static inline void fuzz_parse(const uint8_t *data, size_t size, const char **codec, sl_tensor_desc *desc,
                       sl_meta *meta, const uint8_t **payload, size_t *payload_len) {
  fuzz_reader r = {data, size};
  uint8_t nmeta;
  *codec = FUZZ_CODECS[fuzz_u8(&r) % FUZZ_NCODECS];
  memset(desc, 0, sizeof(*desc));
  desc->dtype = (sl_dtype)(fuzz_u8(&r) % SL_DTYPE_COUNT);
  desc->ndim = fuzz_u8(&r) % 5;
  for (int i = 0; i < desc->ndim; i++) {
    uint8_t b[2] = {0, 0};
    fuzz_take(&r, b, 2);
    desc->shape[i] = (int64_t)(b[0] | (b[1] << 8));
  }
  nmeta = fuzz_u8(&r) % 9;
  for (uint8_t i = 0; i < nmeta && r.left > 0; i++) {
    uint8_t type = fuzz_u8(&r) % 5, klen = fuzz_u8(&r) % 32;
    char key[33];
    uint8_t buf[8] = {0}, len8 = 0, l2[2] = {0, 0};
    size_t vlen;
    if (fuzz_take(&r, key, klen) < 0) break;
    key[klen] = '\0';
    switch (type) {
      case 0: {
        double d;
        fuzz_take(&r, buf, 8);
        memcpy(&d, buf, 8);
        sl_meta_add_double(meta, key, d);
        break;
      }
      case 1: {
        int64_t v;
        fuzz_take(&r, buf, 8);
        memcpy(&v, buf, 8);
        sl_meta_add_int(meta, key, v);
        break;
      }
      case 2:
        sl_meta_add_bool(meta, key, fuzz_u8(&r) & 1);
        break;
      case 3: {
        char s[256];
        len8 = fuzz_u8(&r);
        vlen = len8 < r.left ? len8 : r.left;
        fuzz_take(&r, s, vlen);
        s[vlen] = '\0';
        sl_meta_add_string(meta, key, s);
        break;
      }
      default:
        fuzz_take(&r, l2, 2);
        vlen = (size_t)(l2[0] | (l2[1] << 8));
        if (vlen > r.left) vlen = r.left;
        sl_meta_add_bytes(meta, key, r.p, vlen);
        r.p += vlen;
        r.left -= vlen;
        break;
    }
  }
  *payload = r.p;
  *payload_len = r.left;
}

#endif /* FUZZ_INPUT_H */
