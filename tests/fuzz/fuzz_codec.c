/* fuzz_codec.c: libFuzzer target for every built-in codec's decoder
 * (sl_codec_decode) and for building a codec from a peer's metadata
 * (sl_codec_create_from_wire, what a server does to answer in the request's
 * codec). Input format: fuzz_input.h. A decode either fails with
 * INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) and a UTF-8 message, or gives the
 * tensor's exact byte count; ASan and UBSan check every read and write. */
#include <stdint.h>
#include <stdlib.h>

#include "codec.h"
#include "fuzz_input.h"
#include "tensor.h"

#define FUZZ_MAX_DECODED (1u << 20) /* what one input may decode to */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *name;
  sl_tensor_desc desc;
  sl_meta meta = {NULL, 0};
  const uint8_t *payload;
  size_t payload_len, nbytes = 0;
  void *out = NULL;
  sl_codec *c = NULL;
  sl_err err;
  int rc;

  fuzz_parse(data, size, &name, &desc, &meta, &payload, &payload_len);
  sl_err_clear(&err);
  /* the server bounds this (max_decoded_bytes) before it decodes */
  if (sl_desc_nbytes(&desc, &nbytes) == SL_OK && nbytes <= FUZZ_MAX_DECODED) {
    /* the payload in a buffer of its own size, so that ASan sees any overread */
    uint8_t *copy = malloc(payload_len ? payload_len : 1);
    if (copy == NULL) abort();
    memcpy(copy, payload, payload_len);
    rc = sl_codec_decode(name, &desc, payload_len ? copy : NULL, payload_len, &meta, &out, &err);
    if (rc == SL_OK) {
      if (out == NULL) __builtin_trap();
      sl_storage_free(out);
    } else {
      if (out != NULL) __builtin_trap();
      if (err.code != SL_STATUS_INVALID_ARGUMENT && err.code != SL_STATUS_RESOURCE_EXHAUSTED)
        __builtin_trap();
      if (!sl_utf8_valid(err.msg, strlen(err.msg), NULL)) __builtin_trap();
    }
    free(copy);
  }
  if (sl_codec_create_from_wire(name, &meta, &c, &err) == SL_OK) sl_codec_destroy(c);
  sl_meta_clear(&meta);
  return 0;
}
