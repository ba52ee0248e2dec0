/* payload.c: see payload.h. */
#include "payload.h"

#include <stdatomic.h>
#include <stdlib.h>

struct sl_payload {
  atomic_int refs;
  uint8_t *header;
  size_t header_len;
  const void *data;
  size_t data_len;
  sl_release_fn release;
  void *owner;
};

int sl_payload_new(uint8_t *header, size_t header_len, const void *data, size_t data_len,
                   sl_release_fn release, void *owner, sl_payload **out) {
  sl_payload *p = calloc(1, sizeof(*p));
  *out = NULL;
  if (p == NULL) return SL_ENOMEM;
  atomic_init(&p->refs, 1);
  p->header = header;
  p->header_len = header_len;
  p->data = data;
  p->data_len = data_len;
  p->release = release;
  p->owner = owner;
  *out = p;
  return SL_OK;
}

void sl_payload_ref(sl_payload *p) { atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed); }

void sl_payload_unref(sl_payload *p) {
  if (p == NULL) return;
  if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1) return;
  if (p->release != NULL) p->release(p->owner);
  free(p->header);
  free(p);
}

const uint8_t *sl_payload_header(const sl_payload *p, size_t *len) {
  *len = p->header_len;
  return p->header;
}

const void *sl_payload_data(const sl_payload *p, size_t *len) {
  *len = p->data_len;
  return p->data;
}

size_t sl_payload_size(const sl_payload *p) { return p->header_len + p->data_len; }
