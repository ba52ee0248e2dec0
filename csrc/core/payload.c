/* payload.c: see payload.h. */
#include "payload.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

struct sl_payload {
  atomic_int refs;
  uint8_t *block;
  size_t block_len;
  size_t nsegs;
  size_t *cuts;     /* nsegs offsets into block */
  sl_segment *segs; /* nsegs */
  size_t total;
  /* the common one-segment case without extra allocations */
  size_t cut1;
  sl_segment seg1;
};

int sl_payload_new_segments(uint8_t *block, size_t block_len, const size_t *cuts,
                            const sl_segment *segs, size_t nsegs, sl_payload **out) {
  sl_payload *p = calloc(1, sizeof(*p));
  *out = NULL;
  if (p == NULL) goto fail;
  if (nsegs <= 1) {
    p->cuts = &p->cut1;
    p->segs = &p->seg1;
  } else {
    p->cuts = malloc(nsegs * sizeof(*p->cuts));
    p->segs = malloc(nsegs * sizeof(*p->segs));
    if (p->cuts == NULL || p->segs == NULL) {
      free(p->cuts);
      free(p->segs);
      free(p);
      goto fail;
    }
  }
  atomic_init(&p->refs, 1);
  p->block = block;
  p->block_len = block_len;
  p->nsegs = nsegs;
  p->total = block_len;
  for (size_t i = 0; i < nsegs; i++) {
    p->cuts[i] = cuts[i];
    p->segs[i] = segs[i];
    p->total += segs[i].len;
  }
  *out = p;
  return SL_OK;
fail:
  /* the rule of sl_common.h: what was given is released on failure too */
  for (size_t i = 0; i < nsegs; i++) {
    if (segs[i].release != NULL) segs[i].release(segs[i].owner);
  }
  free(block);
  return SL_ENOMEM;
}

int sl_payload_new(uint8_t *header, size_t header_len, const void *data, size_t data_len,
                   sl_release_fn release, void *owner, sl_payload **out) {
  sl_segment seg = {data, data_len, release, owner};
  return sl_payload_new_segments(header, header_len, &header_len, &seg, 1, out);
}

void sl_payload_ref(sl_payload *p) { atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed); }

void sl_payload_unref(sl_payload *p) {
  if (p == NULL) return;
  if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1) return;
  for (size_t i = 0; i < p->nsegs; i++) {
    if (p->segs[i].release != NULL) p->segs[i].release(p->segs[i].owner);
  }
  if (p->segs != &p->seg1) {
    free(p->segs);
    free(p->cuts);
  }
  free(p->block);
  free(p);
}

size_t sl_payload_npieces(const sl_payload *p) { return 2 * p->nsegs + 1; }

const void *sl_payload_piece(const sl_payload *p, size_t i, size_t *len) {
  size_t k = i / 2;
  if (i % 2 == 1) {
    *len = p->segs[k].len;
    return p->segs[k].data;
  }
  {
    size_t start = k == 0 ? 0 : p->cuts[k - 1];
    size_t end = k < p->nsegs ? p->cuts[k] : p->block_len;
    *len = end - start;
    return p->block + start;
  }
}

const uint8_t *sl_payload_header(const sl_payload *p, size_t *len) {
  *len = p->block_len;
  return p->block;
}

const void *sl_payload_data(const sl_payload *p, size_t *len) {
  *len = p->nsegs > 0 ? p->segs[0].len : 0;
  return p->nsegs > 0 ? p->segs[0].data : NULL;
}

size_t sl_payload_size(const sl_payload *p) { return p->total; }
