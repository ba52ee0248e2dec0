/* payload.h: an outgoing tensor message, shared by every attempt that sends it.
 *
 * A payload is a packed protobuf header (owned, malloc'd; it already ends with the
 * tag and length prefix of the tensor field) followed by the tensor bytes, which
 * are referenced, never copied. The payload is reference counted: whoever creates
 * it holds one reference, each gRPC slice that points at the tensor bytes holds
 * another. When the last reference goes, `release(owner)` runs exactly once, on
 * whichever thread dropped it (the creator's, or a gRPC thread that holds no Python
 * lock): it is how the tensor's owner learns that its memory is free again.
 */
#ifndef SL_PAYLOAD_H
#define SL_PAYLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "sl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*sl_release_fn)(void *owner);

typedef struct sl_payload sl_payload;

/* Create a payload with one reference held by the caller. Takes ownership of
 * `header` (malloc'd, freed with free()) on success only; `data` stays owned by
 * `owner` until `release(owner)` runs (release may be NULL). Returns SL_OK or
 * SL_ENOMEM (then nothing was taken and release is not called). */
int sl_payload_new(uint8_t *header, size_t header_len, const void *data, size_t data_len,
                   sl_release_fn release, void *owner, sl_payload **out);

void sl_payload_ref(sl_payload *p);

/* Drop one reference; the last one runs release(owner) and frees the payload. */
void sl_payload_unref(sl_payload *p);

/* Accessors. */
const uint8_t *sl_payload_header(const sl_payload *p, size_t *len);
const void *sl_payload_data(const sl_payload *p, size_t *len);
size_t sl_payload_size(const sl_payload *p); /* header + data bytes */

#ifdef __cplusplus
}
#endif

#endif /* SL_PAYLOAD_H */
