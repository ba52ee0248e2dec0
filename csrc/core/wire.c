/* wire.c: see wire.h. */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

/* A cursor over a list of spans. `pos` is the absolute offset. */
typedef struct cursor {
  const sl_span *spans;
  size_t nspans;
  size_t idx; /* current span */
  size_t off; /* offset in the current span */
  size_t pos; /* absolute position */
  size_t total;
} cursor;

static void cursor_init(cursor *c, const sl_span *spans, size_t nspans) {
  size_t i;
  c->spans = spans;
  c->nspans = nspans;
  c->idx = 0;
  c->off = 0;
  c->pos = 0;
  c->total = 0;
  for (i = 0; i < nspans; i++) c->total += spans[i].len;
  /* skip leading empty spans */
  while (c->idx < c->nspans && c->spans[c->idx].len == 0) c->idx++;
}

static size_t cursor_left(const cursor *c) { return c->total - c->pos; }

/* Advance past n bytes, optionally copying them into dst. n <= cursor_left(). */
static void cursor_take(cursor *c, size_t n, uint8_t *dst) {
  while (n > 0) {
    const sl_span *s = &c->spans[c->idx];
    size_t avail = s->len - c->off;
    size_t k = n < avail ? n : avail;
    if (dst != NULL) {
      memcpy(dst, s->ptr + c->off, k);
      dst += k;
    }
    c->off += k;
    c->pos += k;
    n -= k;
    if (c->off == s->len) {
      c->idx++;
      c->off = 0;
      while (c->idx < c->nspans && c->spans[c->idx].len == 0) c->idx++;
    }
  }
}

/* Read a varint; SL_EINVAL when truncated or longer than 10 bytes. The raw bytes
 * are stored into raw[0..*rawlen) for re-emission. */
static int cursor_varint(cursor *c, uint64_t *v, uint8_t raw[10], size_t *rawlen) {
  uint64_t result = 0;
  int shift = 0;
  size_t n = 0;
  for (;;) {
    uint8_t b;
    if (cursor_left(c) == 0 || n == 10) return SL_EINVAL;
    cursor_take(c, 1, &b);
    raw[n++] = b;
    result |= (uint64_t)(b & 0x7f) << shift;
    if ((b & 0x80) == 0) break;
    shift += 7;
  }
  *v = result;
  *rawlen = n;
  return SL_OK;
}

static int is_bulk(uint32_t field, const uint32_t *bulk, size_t nbulk) {
  for (size_t i = 0; i < nbulk; i++)
    if (bulk[i] == field) return 1;
  return 0;
}

int sl_wire_split(const sl_span *spans, size_t nspans, uint32_t data_field,
                  sl_wire_split_result *result, sl_err *err) {
  return sl_wire_split_bulk(spans, nspans, data_field, NULL, 0, result, err);
}

int sl_wire_split_bulk(const sl_span *spans, size_t nspans, uint32_t data_field,
                       const uint32_t *bulk, size_t nbulk, sl_wire_split_result *result,
                       sl_err *err) {
  int status = SL_EINVAL;
  cursor c;
  uint8_t *header = NULL;
  size_t hlen = 0, cap_occ = 0;

  memset(result, 0, sizeof(*result));
  cursor_init(&c, spans, nspans);
  /* The header can never be longer than the message. */
  header = malloc(c.total ? c.total : 1);
  if (header == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                        "out of memory reading a %zu-byte message", c.total);
    goto cleanup;
  }
  while (cursor_left(&c) > 0) {
    uint64_t tag, len;
    uint8_t raw_tag[10], raw_len[10];
    size_t raw_tag_n, raw_len_n;
    size_t field_start = c.pos;
    uint32_t field;
    unsigned wt;

    if (cursor_varint(&c, &tag, raw_tag, &raw_tag_n) != SL_OK) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "malformed message: truncated field tag at byte %zu", field_start);
      goto cleanup;
    }
    field = (uint32_t)(tag >> 3);
    wt = (unsigned)(tag & 7);
    if (field == 0 || tag >> 3 > 0x1fffffffu) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "malformed message: invalid field number at byte %zu", field_start);
      goto cleanup;
    }
    switch (wt) {
      case 0: { /* varint */
        uint64_t v;
        uint8_t raw[10];
        size_t rn;
        if (cursor_varint(&c, &v, raw, &rn) != SL_OK) {
          status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                              "malformed message: truncated varint in field %u at byte %zu",
                              field, field_start);
          goto cleanup;
        }
        memcpy(header + hlen, raw_tag, raw_tag_n);
        hlen += raw_tag_n;
        memcpy(header + hlen, raw, rn);
        hlen += rn;
        break;
      }
      case 1:   /* 64-bit */
      case 5: { /* 32-bit */
        size_t n = wt == 1 ? 8 : 4;
        if (cursor_left(&c) < n) {
          status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                              "malformed message: truncated field %u at byte %zu", field,
                              field_start);
          goto cleanup;
        }
        memcpy(header + hlen, raw_tag, raw_tag_n);
        hlen += raw_tag_n;
        cursor_take(&c, n, header + hlen);
        hlen += n;
        break;
      }
      case 2: { /* length-delimited */
        if (cursor_varint(&c, &len, raw_len, &raw_len_n) != SL_OK || len > cursor_left(&c)) {
          status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                              "malformed message: field %u at byte %zu is truncated", field,
                              field_start);
          goto cleanup;
        }
        if (nbulk > 0 && is_bulk(field, bulk, nbulk)) {
          if (result->n_occ == cap_occ) {
            size_t cap = cap_occ ? 2 * cap_occ : 8;
            sl_wire_occ *bigger = realloc(result->occ, cap * sizeof(*bigger));
            if (bigger == NULL) {
              status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED,
                                  "out of memory reading a %zu-byte message", c.total);
              goto cleanup;
            }
            result->occ = bigger;
            cap_occ = cap;
          }
          result->occ[result->n_occ].field = field;
          result->occ[result->n_occ].span = c.idx;
          result->occ[result->n_occ].off = c.off;
          result->occ[result->n_occ].len = (size_t)len;
          result->n_occ++;
          cursor_take(&c, (size_t)len, NULL);
        } else if (nbulk > 0 && field == SL_WIRE_PAD_FIELD) {
          cursor_take(&c, (size_t)len, NULL); /* filler: never in the header */
        } else if (field == data_field) {
          result->data_found = 1;
          result->data_len = (size_t)len;
          result->data_span = c.idx;
          result->data_off = c.off;
          cursor_take(&c, (size_t)len, NULL);
        } else {
          memcpy(header + hlen, raw_tag, raw_tag_n);
          hlen += raw_tag_n;
          memcpy(header + hlen, raw_len, raw_len_n);
          hlen += raw_len_n;
          cursor_take(&c, (size_t)len, header + hlen);
          hlen += (size_t)len;
        }
        break;
      }
      default:
        status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                            "malformed message: unsupported wire type %u for field %u at byte %zu",
                            wt, field, field_start);
        goto cleanup;
    }
    if ((field == data_field || (nbulk > 0 && is_bulk(field, bulk, nbulk))) && wt != 2) {
      status = sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                          "malformed message: tensor field %u has wire type %u, not bytes", field,
                          wt);
      goto cleanup;
    }
  }
  result->header = header;
  result->header_len = hlen;
  header = NULL;
  status = SL_OK;
cleanup:
  free(header);
  if (status != SL_OK) {
    free(result->occ);
    memset(result, 0, sizeof(*result));
  }
  return status;
}

void sl_wire_copy_range(const sl_span *spans, size_t nspans, size_t span, size_t off, size_t len,
                        void *dst) {
  uint8_t *out = dst;
  while (len > 0 && span < nspans) {
    size_t avail = spans[span].len - off;
    size_t k = len < avail ? len : avail;
    if (k > 0) memcpy(out, spans[span].ptr + off, k); /* an empty span may have no pointer */
    out += k;
    len -= k;
    span++;
    off = 0;
  }
}

int sl_wire_subspans(const sl_span *spans, size_t nspans, const sl_wire_occ *occ, sl_span **out,
                     size_t *n) {
  size_t left = occ->len, k = 0, idx = occ->span, off = occ->off;
  sl_span *v;
  /* count first: the spans the range touches */
  for (size_t i = idx, o = off, l = left; l > 0 && i < nspans; i++, o = 0) {
    size_t avail = spans[i].len - o;
    l -= l < avail ? l : avail;
    k++;
  }
  v = malloc((k ? k : 1) * sizeof(*v));
  if (v == NULL) return SL_ENOMEM;
  k = 0;
  while (left > 0 && idx < nspans) {
    size_t avail = spans[idx].len - off;
    size_t take = left < avail ? left : avail;
    if (take == 0) { /* an empty span (its ptr may be NULL): nothing to point at */
      idx++;
      off = 0;
      continue;
    }
    v[k].ptr = spans[idx].ptr + off;
    v[k].len = take;
    k++;
    left -= take;
    idx++;
    off = 0;
  }
  *out = v;
  *n = k;
  return SL_OK;
}

void sl_wire_copy_data(const sl_span *spans, size_t nspans, const sl_wire_split_result *result,
                       void *dst) {
  sl_wire_copy_range(spans, nspans, result->data_span, result->data_off, result->data_len, dst);
}

void sl_wire_split_result_clear(sl_wire_split_result *result) {
  free(result->header);
  free(result->occ);
  memset(result, 0, sizeof(*result));
}

size_t sl_wire_put_varint(uint64_t v, uint8_t *out) {
  size_t n = 0;
  while (v >= 0x80) {
    out[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  out[n++] = (uint8_t)v;
  return n;
}

size_t sl_wire_data_prefix(uint32_t field, uint64_t len, uint8_t out[SL_WIRE_PREFIX_MAX]) {
  size_t n = sl_wire_put_varint(((uint64_t)field << 3) | 2u, out);
  n += sl_wire_put_varint(len, out + n);
  return n;
}

/* ---- text fields ------------------------------------------------------------ */

/* Read a varint from buf[*pos..len). */
static int flat_varint(const uint8_t *buf, size_t len, size_t *pos, uint64_t *v) {
  uint64_t r = 0;
  for (int i = 0; i < 10; i++) {
    uint8_t b;
    if (*pos >= len) return SL_EINVAL;
    b = buf[(*pos)++];
    r |= (uint64_t)(b & 0x7f) << (7 * i);
    if ((b & 0x80) == 0) {
      *v = r;
      return SL_OK;
    }
  }
  return SL_EINVAL;
}

/* Walk msg[0..len) at nesting `depth`; `prefix` holds the field numbers above. */
static int check_text(const uint8_t *msg, size_t len, int depth,
                      const uint32_t prefix[SL_WIRE_TEXT_DEPTH], const sl_wire_text_field *fields,
                      size_t n, const char *what, sl_err *err) {
  size_t pos = 0;
  while (pos < len) {
    uint64_t key, l;
    uint32_t field;
    int wt;
    if (flat_varint(msg, len, &pos, &key) != SL_OK) goto malformed;
    field = (uint32_t)(key >> 3);
    wt = (int)(key & 7);
    switch (wt) {
      case 0:
        if (flat_varint(msg, len, &pos, &l) != SL_OK) goto malformed;
        continue;
      case 1:
        if (len - pos < 8) goto malformed;
        pos += 8;
        continue;
      case 5:
        if (len - pos < 4) goto malformed;
        pos += 4;
        continue;
      case 2:
        break;
      default:
        goto malformed;
    }
    if (flat_varint(msg, len, &pos, &l) != SL_OK || l > len - pos) goto malformed;
    for (size_t i = 0; i < n; i++) {
      const sl_wire_text_field *f = &fields[i];
      int d, leaf;
      for (d = 0; d < depth; d++)
        if (f->path[d] != prefix[d]) break;
      if (d < depth || f->path[depth] != field) continue;
      leaf = depth + 1 == SL_WIRE_TEXT_DEPTH || f->path[depth + 1] == 0;
      if (leaf) {
        size_t bad = 0;
        const void *nul = memchr(msg + pos, 0, (size_t)l);
        if (nul != NULL) {
          return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                            "field '%s' of %s holds a NUL byte (at byte %zu of its %zu)",
                            f->name, what, (size_t)((const uint8_t *)nul - (msg + pos)),
                            (size_t)l);
        }
        if (!sl_utf8_valid((const char *)msg + pos, (size_t)l, &bad)) {
          return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                            "field '%s' of %s is not valid UTF-8 (byte %zu of its %zu)", f->name,
                            what, bad, (size_t)l);
        }
      } else {
        uint32_t sub[SL_WIRE_TEXT_DEPTH] = {0};
        int rc;
        for (d = 0; d < depth; d++) sub[d] = prefix[d];
        sub[depth] = field;
        /* the fields below this one, all of them in one walk */
        rc = check_text(msg + pos, (size_t)l, depth + 1, sub, fields, n, what, err);
        if (rc != SL_OK) return rc;
        break;
      }
    }
    pos += (size_t)l;
  }
  return SL_OK;
malformed:
  return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                    "malformed %s: a field at depth %d could not be parsed", what, depth);
}

int sl_wire_check_text(const uint8_t *msg, size_t len, const sl_wire_text_field *fields,
                       size_t n, const char *what, sl_err *err) {
  uint32_t prefix[SL_WIRE_TEXT_DEPTH] = {0};
  if (len > 0 && msg == NULL) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "malformed %s", what);
  }
  return check_text(msg, len, 0, prefix, fields, n, what, err);
}
