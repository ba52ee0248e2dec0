/* shm.c: see shm.h. */
#define _GNU_SOURCE
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

/* The state word: seq << PHASE_BITS | phase. */
#define PHASE_BITS 3
#define PHASE_MASK 7u
#define PHASE_ABANDONED 0u /* the client gave up before the server took the request */
#define PHASE_POSTED 1u    /* the client posted a request */
#define PHASE_HELD 2u      /* the server took it (reading, computing) */
#define PHASE_WRITING 3u   /* the server writes its reply */
#define PHASE_DONE 4u      /* the reply is in the segment */
#define PHASE_RELEASED 5u  /* the server let go without writing a reply */
#define STATE(seq, phase) ((uint64_t)(seq) << PHASE_BITS | (phase))

/* The last byte is the layout's version: 2 added the hold word and the offsets. */
static const char MAGIC[8] = {'S', 'L', 'S', 'H', 'M', 0, 0, 2};

/* At offset 0 of every segment. */
typedef struct sl_shm_hdr {
  char magic[8];
  uint8_t token[16];
  _Atomic uint64_t state; /* STATE(seq, phase) */
  _Atomic uint32_t hold;  /* 1 while the server's tensors still view the segment */
} sl_shm_hdr;

static sl_shm_hdr *hdr_of(uint8_t *base) { return (sl_shm_hdr *)(void *)base; }

int sl_shm_env_enabled(void) {
  const char *v = getenv("SPLITLEARN_SHM");
  return v == NULL || strcmp(v, "0") != 0;
}

static int has_prefix(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

int sl_shm_target_is_local(const char *target) {
  const char *t = target;
  if (t == NULL) return 0;
  if (has_prefix(t, "unix:") || has_prefix(t, "unix-abstract:")) return 1;
  if (has_prefix(t, "ipv4:")) t += 5;
  else if (has_prefix(t, "ipv6:")) t += 5;
  else if (has_prefix(t, "dns:///")) t += 7;
  else if (has_prefix(t, "dns:")) t += 4;
  if (has_prefix(t, "localhost:") || strcmp(t, "localhost") == 0) return 1;
  if (has_prefix(t, "127.")) return strchr(t, ',') == NULL; /* one address, loopback */
  if (has_prefix(t, "[::1]")) return 1;
  return 0;
}

/* The padding field (SL_WIRE_PAD_FIELD), wire type 2, as a tag varint. */
static const uint8_t PAD_TAG[2] = {(uint8_t)(((SL_WIRE_PAD_FIELD << 3) | 2) & 0x7F) | 0x80,
                                   (uint8_t)((SL_WIRE_PAD_FIELD << 3) >> 7)};
#define PAD_MAX (3 + SL_SHM_ALIGN + 2) /* a padding field is 3 + L bytes, L < 128 */

/* Whether padding may go before each tensor after the first: the message is one of
 * named tensors, each a top-level field 20 whose prefix is the whole block piece
 * between two tensors (a KV cache entry, a nested message, is never cut). */
static int pads_possible(const sl_payload *p) {
  size_t n = sl_payload_npieces(p), nseg = (n - 1) / 2;
  if (nseg < 2) return 0;
  for (size_t k = 1; k < nseg; k++) {
    size_t blen = 0, slen = 0, v, i = 2;
    const uint8_t *b = sl_payload_piece(p, 2 * k, &blen);
    (void)sl_payload_piece(p, 2 * k + 1, &slen);
    if (blen < 3 || b[0] != 0xA2 || b[1] != 0x01) return 0; /* field 20, wire type 2 */
    for (v = slen; v >= 0x80; v >>= 7, i++) {
      if (i >= blen || b[i] != (uint8_t)(v | 0x80)) return 0;
    }
    if (i + 1 != blen || b[i] != (uint8_t)v) return 0;
  }
  return 1;
}

size_t sl_shm_payload_room(const sl_payload *p) {
  size_t nseg = (sl_payload_npieces(p) - 1) / 2;
  return sl_payload_size(p) + SL_SHM_ALIGN + nseg * PAD_MAX;
}

size_t sl_shm_align_offset(const sl_payload *p) {
  size_t off = 0, best = 0, best_len = 0, n = sl_payload_npieces(p);
  int first = pads_possible(p); /* padding aligns the others: align the first */
  for (size_t i = 0; i < n; i++) {
    size_t len = 0;
    (void)sl_payload_piece(p, i, &len);
    if (i % 2 == 1 && (len > best_len || (first && i == 1))) {
      best_len = len;
      best = off;
      if (first) break;
    }
    off += len;
  }
  return (SL_SHM_ALIGN - best % SL_SHM_ALIGN) % SL_SHM_ALIGN;
}

int sl_shm_copy_payload(uint8_t *dst, size_t cap, const sl_payload *p, size_t *written) {
  size_t off = 0, n = sl_payload_npieces(p);
  int pad = pads_possible(p);
  *written = 0;
  if (sl_payload_size(p) > cap) return SL_ETOOBIG;
  for (size_t i = 0; i < n; i++) {
    size_t len = 0;
    const void *piece = sl_payload_piece(p, i, &len);
    if (pad && i >= 2 && i % 2 == 0) {
      /* a padding field, so that the tensor after this prefix starts aligned */
      size_t r = ((uintptr_t)dst + off + len) % SL_SHM_ALIGN;
      size_t g = (SL_SHM_ALIGN - r) % SL_SHM_ALIGN;
      if (g == 1 || g == 2) g += SL_SHM_ALIGN;
      if (g > 0) {
        if (g > cap - off) return SL_ETOOBIG;
        memcpy(dst + off, PAD_TAG, 2);
        dst[off + 2] = (uint8_t)(g - 3);
        memset(dst + off + 3, 0, g - 3);
        off += g;
      }
    }
    if (len == 0) continue;
    if (len > cap - off) return SL_ETOOBIG;
    memcpy(dst + off, piece, len);
    off += len;
  }
  *written = off;
  return SL_OK;
}

static void hex_of(const uint8_t *b, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[b[i] >> 4];
    out[2 * i + 1] = digits[b[i] & 15];
  }
  out[2 * n] = '\0';
}

static int unhex(const char *s, uint8_t *out, size_t n) {
  for (size_t i = 0; i < 2 * n; i++) {
    char c = s[i];
    int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (v < 0) return -1;
    if (i % 2 == 0) out[i / 2] = (uint8_t)(v << 4);
    else out[i / 2] |= (uint8_t)v;
  }
  return 0;
}

/* The kernel's boot id (36 characters): differs between hosts. */
static int boot_id(char out[40]) {
  ssize_t n;
  int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  n = read(fd, out, 39);
  close(fd);
  if (n < 36) return -1;
  out[36] = '\0';
  return 0;
}

/* ---- client side ------------------------------------------------------------ */

struct sl_shm_seg {
  int fd;
  uint8_t *base;
  size_t size; /* of the file and the mapping */
  char token_hex[SL_SHM_TOKEN_HEX + 1];
  uint64_t seq;
  int busy, attached;   /* the pool's (under its lock) */
  _Atomic int refs;     /* the pool's (or the creator's) and one per lent tensor */
};

int sl_shm_seg_create(size_t capacity, sl_shm_seg **out, sl_err *err) {
  int status;
  sl_shm_seg *s = calloc(1, sizeof(*s));
  uint8_t token[16];
  *out = NULL;
  if (s == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  s->fd = -1;
  s->base = MAP_FAILED;
  atomic_init(&s->refs, 1);
  if (capacity > SL_SHM_MAX_CAPACITY) {
    status = sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED, "segment too big");
    goto cleanup;
  }
  if (capacity < SL_SHM_MIN_CAPACITY) capacity = SL_SHM_MIN_CAPACITY;
  s->size = SL_SHM_HDR + capacity;
  if (getrandom(token, sizeof(token), 0) != (ssize_t)sizeof(token)) {
    status = sl_err_set(err, SL_ESTATE, SL_STATUS_UNAVAILABLE, "getrandom failed: %s",
                        strerror(errno));
    goto cleanup;
  }
  s->fd = memfd_create("splitlearn-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (s->fd < 0 || fchmod(s->fd, 0600) != 0 || ftruncate(s->fd, (off_t)s->size) != 0 ||
      fcntl(s->fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    status = sl_err_set(err, SL_ESTATE, SL_STATUS_UNAVAILABLE, "memfd: %s", strerror(errno));
    goto cleanup;
  }
  s->base = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
  if (s->base == MAP_FAILED) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "mmap: %s", strerror(errno));
    goto cleanup;
  }
  memcpy(hdr_of(s->base)->magic, MAGIC, sizeof(MAGIC));
  memcpy(hdr_of(s->base)->token, token, sizeof(token));
  atomic_store(&hdr_of(s->base)->state, 0);
  atomic_store(&hdr_of(s->base)->hold, 0);
  hex_of(token, sizeof(token), s->token_hex);
  *out = s;
  s = NULL;
  status = SL_OK;
cleanup:
  sl_shm_seg_destroy(s);
  return status;
}

static void seg_free(sl_shm_seg *s) {
  if (s->base != MAP_FAILED) munmap(s->base, s->size);
  if (s->fd >= 0) close(s->fd);
  free(s);
}

void sl_shm_seg_destroy(sl_shm_seg *s) {
  if (s == NULL) return;
  if (atomic_fetch_sub(&s->refs, 1) == 1) seg_free(s);
}

void *sl_shm_seg_lend(void *seg) {
  sl_shm_seg *s = seg;
  atomic_fetch_add(&s->refs, 1);
  return s;
}

void sl_shm_seg_unlend(void *seg) { sl_shm_seg_destroy(seg); }

/* Neither our tensors nor the server's view it: a new request may overwrite it. */
static int seg_free_to_write(sl_shm_seg *s) {
  return atomic_load(&s->refs) == 1 && atomic_load(&hdr_of(s->base)->hold) == 0;
}

uint8_t *sl_shm_seg_data(sl_shm_seg *s) { return s->base + SL_SHM_HDR; }
size_t sl_shm_seg_capacity(const sl_shm_seg *s) { return s->size - SL_SHM_HDR; }
int sl_shm_seg_fd(const sl_shm_seg *s) { return s->fd; }

int sl_shm_seg_attach_value(const sl_shm_seg *s, char *buf, size_t n) {
  char boot[40];
  int len;
  if (boot_id(boot) != 0) return SL_ESTATE;
  len = snprintf(buf, n, "%s %ld %d %s", boot, (long)getpid(), s->fd, s->token_hex);
  return len < 0 || (size_t)len >= n ? SL_ETOOBIG : SL_OK;
}

int sl_shm_seg_post(sl_shm_seg *s, size_t off, size_t len, char *buf, size_t n) {
  int w;
  s->seq++;
  atomic_store(&hdr_of(s->base)->state, STATE(s->seq, PHASE_POSTED));
  w = snprintf(buf, n, "%s %llu %zu %zu", s->token_hex, (unsigned long long)s->seq, len, off);
  return w < 0 || (size_t)w >= n ? SL_ETOOBIG : SL_OK;
}

int sl_shm_seg_put_request(sl_shm_seg *s, const sl_payload *p, char *buf, size_t n) {
  size_t off = sl_shm_align_offset(p), len = 0;
  int rc = sl_shm_copy_payload(sl_shm_seg_data(s) + off, sl_shm_seg_capacity(s) - off, p, &len);
  return rc != SL_OK ? rc : sl_shm_seg_post(s, off, len, buf, n);
}

int sl_shm_seg_settle(sl_shm_seg *s) {
  uint64_t expect = STATE(s->seq, PHASE_POSTED);
  if (atomic_compare_exchange_strong(&hdr_of(s->base)->state, &expect,
                                     STATE(s->seq, PHASE_ABANDONED))) {
    return 1; /* the server never took it, and now never will */
  }
  /* HELD or WRITING: the server still reads or writes it */
  return (expect & PHASE_MASK) != PHASE_HELD && (expect & PHASE_MASK) != PHASE_WRITING;
}

int sl_shm_seg_reply_ready(const sl_shm_seg *s) {
  return atomic_load(&hdr_of(s->base)->state) == STATE(s->seq, PHASE_DONE);
}

struct sl_shm_pool {
  pthread_mutex_t mu;
  sl_shm_seg *segs[SL_SHM_POOL_MAX];
  size_t n;
};

int sl_shm_pool_new(sl_shm_pool **out) {
  sl_shm_pool *p = calloc(1, sizeof(*p));
  *out = p;
  if (p == NULL) return SL_ENOMEM;
  pthread_mutex_init(&p->mu, NULL);
  return SL_OK;
}

void sl_shm_pool_free(sl_shm_pool *p) {
  if (p == NULL) return;
  for (size_t i = 0; i < p->n; i++) sl_shm_seg_destroy(p->segs[i]);
  pthread_mutex_destroy(&p->mu);
  free(p);
}

/* Capacities come in eighths of powers of two from 1 MiB: a request of 2^k bytes
 * and its reply beside it (2^(k+1) and a little) take 2.25 x 2^k, not 4. */
static size_t round_capacity(size_t need) {
  size_t c = SL_SHM_MIN_CAPACITY, step;
  while (c < need && c < SL_SHM_MAX_CAPACITY) c <<= 1;
  if (c <= SL_SHM_MIN_CAPACITY) return c;
  step = c / 16; /* an eighth of the power of two below c */
  need = (need + step - 1) / step * step;
  return need < c ? need : c;
}

/* Drop one free segment: the smallest when `largest` is 0, else the largest.
 * Returns 0 when every segment is busy. Called with the pool's lock. */
static int evict_locked(sl_shm_pool *p, int largest) {
  size_t victim = (size_t)-1;
  for (size_t i = 0; i < p->n; i++) {
    if (p->segs[i]->busy) continue;
    if (victim == (size_t)-1 || (largest ? p->segs[i]->size > p->segs[victim]->size
                                         : p->segs[i]->size < p->segs[victim]->size)) {
      victim = i;
    }
  }
  if (victim == (size_t)-1) return 0;
  sl_shm_seg_destroy(p->segs[victim]);
  p->segs[victim] = p->segs[--p->n];
  return 1;
}

static size_t total_locked(const sl_shm_pool *p) {
  size_t total = 0;
  for (size_t i = 0; i < p->n; i++) total += sl_shm_seg_capacity(p->segs[i]);
  return total;
}

sl_shm_seg *sl_shm_pool_acquire(sl_shm_pool *p, size_t need, int *attached, sl_err *err) {
  sl_shm_seg *s = NULL, *fresh = NULL;
  size_t cap = round_capacity(need);
  *attached = 0;
  if (need > SL_SHM_MAX_CAPACITY) {
    sl_err_set(err, SL_ETOOBIG, SL_STATUS_RESOURCE_EXHAUSTED, "too big for shared memory");
    return NULL;
  }
  pthread_mutex_lock(&p->mu);
  for (size_t i = 0; i < p->n; i++) {
    sl_shm_seg *c = p->segs[i];
    if (c->busy || sl_shm_seg_capacity(c) < need || !seg_free_to_write(c)) continue;
    /* the smallest that fits, attached ones first */
    if (s == NULL || (c->attached && !s->attached) ||
        (c->attached == s->attached && c->size < s->size)) {
      s = c;
    }
  }
  if (s != NULL) {
    s->busy = 1;
    *attached = s->attached;
    pthread_mutex_unlock(&p->mu);
    return s;
  }
  /* a new one, within the bounds: free segments (none fits) make room */
  while (p->n == SL_SHM_POOL_MAX && evict_locked(p, 0)) {
  }
  while (total_locked(p) + cap > SL_SHM_POOL_BYTES && evict_locked(p, 1)) {
  }
  if (p->n == SL_SHM_POOL_MAX || total_locked(p) + cap > SL_SHM_POOL_BYTES) {
    pthread_mutex_unlock(&p->mu);
    sl_err_set(err, SL_EAGAIN, SL_STATUS_RESOURCE_EXHAUSTED, "every segment is busy");
    return NULL;
  }
  /* creating is a few system calls (no page is touched yet): under the lock */
  if (sl_shm_seg_create(cap, &fresh, err) == SL_OK) {
    fresh->busy = 1;
    p->segs[p->n++] = fresh;
  }
  pthread_mutex_unlock(&p->mu);
  return fresh;
}

void sl_shm_pool_release(sl_shm_pool *p, sl_shm_seg *s, int reusable, int attached) {
  pthread_mutex_lock(&p->mu);
  for (size_t i = 0; i < p->n; i++) {
    if (p->segs[i] != s) continue;
    if (!reusable) {
      p->segs[i] = p->segs[--p->n];
      pthread_mutex_unlock(&p->mu);
      sl_shm_seg_destroy(s);
      return;
    }
    s->busy = 0;
    s->attached = attached;
    break;
  }
  pthread_mutex_unlock(&p->mu);
}

void sl_shm_pool_forget(sl_shm_pool *p) {
  pthread_mutex_lock(&p->mu);
  for (size_t i = 0; i < p->n; i++) p->segs[i]->attached = 0;
  pthread_mutex_unlock(&p->mu);
}

size_t sl_shm_pool_count(sl_shm_pool *p) {
  size_t n;
  pthread_mutex_lock(&p->mu);
  n = p->n;
  pthread_mutex_unlock(&p->mu);
  return n;
}

/* ---- server side -------------------------------------------------------------- */

/* A mapped segment. The table holds one reference while the segment is in it,
 * each call that uses it one, and each tensor lent from it one: the mapping goes
 * with the last, so a tensor may outlive its call, its client and the server. */
typedef struct entry {
  struct entry *next;
  uint8_t token[16];
  int fd;
  uint8_t *base;
  size_t size;
  long pid;
  int client_fd;
  dev_t dev;
  ino_t ino;
  int in_use;           /* under the table's lock */
  _Atomic int refs;
  pthread_mutex_t mu;   /* guards views and the header's hold word */
  int views;            /* tensors lent from the segment and still alive */
} entry;

struct sl_shm_use {
  entry *e;
  uint64_t seq;
  size_t req_end; /* the request ends here in the data area */
};

struct sl_shm_table {
  pthread_mutex_t mu;
  entry *head;
  size_t n;
  char boot[40];
  int have_boot;
  _Atomic long long last_sweep_us;
};

int sl_shm_table_new(sl_shm_table **out) {
  sl_shm_table *t = calloc(1, sizeof(*t));
  *out = t;
  if (t == NULL) return SL_ENOMEM;
  pthread_mutex_init(&t->mu, NULL);
  t->have_boot = boot_id(t->boot) == 0;
  return SL_OK;
}

static void entry_unref(entry *e) {
  if (atomic_fetch_sub(&e->refs, 1) != 1) return;
  munmap(e->base, e->size);
  close(e->fd);
  pthread_mutex_destroy(&e->mu);
  free(e);
}

void *sl_shm_use_lend(void *use) {
  entry *e = ((sl_shm_use *)use)->e;
  pthread_mutex_lock(&e->mu);
  if (e->views++ == 0) atomic_store(&hdr_of(e->base)->hold, 1);
  pthread_mutex_unlock(&e->mu);
  atomic_fetch_add(&e->refs, 1);
  return e;
}

void sl_shm_use_unlend(void *token) {
  entry *e = token;
  pthread_mutex_lock(&e->mu);
  if (--e->views == 0) atomic_store(&hdr_of(e->base)->hold, 0);
  pthread_mutex_unlock(&e->mu);
  entry_unref(e);
}

static int entry_views(entry *e) {
  int v;
  pthread_mutex_lock(&e->mu);
  v = e->views;
  pthread_mutex_unlock(&e->mu);
  return v;
}

void sl_shm_table_free(sl_shm_table *t) {
  if (t == NULL) return;
  while (t->head != NULL) {
    entry *e = t->head;
    t->head = e->next;
    entry_unref(e);
  }
  pthread_mutex_destroy(&t->mu);
  free(t);
}

/* The client still holds the segment open under the fd number it named. */
static int entry_alive(const entry *e) {
  char path[64];
  struct stat st;
  snprintf(path, sizeof(path), "/proc/%ld/fd/%d", e->pid, e->client_fd);
  return stat(path, &st) == 0 && st.st_dev == e->dev && st.st_ino == e->ino;
}

size_t sl_shm_table_sweep(sl_shm_table *t) {
  size_t gone = 0;
  entry **pp, *dead = NULL;
  pthread_mutex_lock(&t->mu);
  atomic_store(&t->last_sweep_us, (long long)(sl_now() * 1e6));
  pp = &t->head;
  while (*pp != NULL) {
    entry *e = *pp;
    if (!e->in_use && !entry_alive(e)) {
      *pp = e->next;
      e->next = dead;
      dead = e;
      t->n--;
      gone++;
    } else {
      pp = &e->next;
    }
  }
  pthread_mutex_unlock(&t->mu);
  while (dead != NULL) {
    entry *e = dead;
    dead = e->next;
    entry_unref(e); /* tensors lent from it keep it mapped */
  }
  return gone;
}

void sl_shm_table_maybe_sweep(sl_shm_table *t, double interval) {
  long long now = (long long)(sl_now() * 1e6);
  if (t == NULL || now - atomic_load(&t->last_sweep_us) < (long long)(interval * 1e6)) return;
  sl_shm_table_sweep(t);
}

size_t sl_shm_table_count(sl_shm_table *t) {
  size_t n;
  pthread_mutex_lock(&t->mu);
  n = t->n;
  pthread_mutex_unlock(&t->mu);
  return n;
}

static entry *find_locked(sl_shm_table *t, const uint8_t *token) {
  for (entry *e = t->head; e != NULL; e = e->next) {
    if (memcmp(e->token, token, 16) == 0) return e;
  }
  return NULL;
}

/* Copy a metadata value (not NUL-terminated) into buf. */
static int value_str(const char *value, size_t len, char *buf, size_t n) {
  if (len >= n || memchr(value, '\0', len) != NULL) return -1;
  memcpy(buf, value, len);
  buf[len] = '\0';
  return 0;
}

int sl_shm_table_attach(sl_shm_table *t, const char *value, size_t len, sl_err *err) {
  char buf[160], boot[40], tokhex[SL_SHM_TOKEN_HEX + 2], path[64], extra;
  long pid;
  int cfd, fd = -1, status, seals;
  uint8_t token[16];
  struct stat st;
  uint8_t *base = MAP_FAILED;
  entry *e = NULL;

  if (value_str(value, len, buf, sizeof(buf)) != 0 ||
      sscanf(buf, "%39s %ld %d %33s %c", boot, &pid, &cfd, tokhex, &extra) != 4 ||
      strlen(boot) != 36 || strlen(tokhex) != SL_SHM_TOKEN_HEX || pid <= 0 || cfd < 0 ||
      unhex(tokhex, token, 16) != 0) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "malformed " SL_SHM_MD_ATTACH " metadata");
  }
  if (!t->have_boot || strcmp(boot, t->boot) != 0) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION, "another host");
  }
  sl_shm_table_sweep(t);
  pthread_mutex_lock(&t->mu);
  e = find_locked(t, token);
  pthread_mutex_unlock(&t->mu);
  if (e != NULL) return SL_OK;
  snprintf(path, sizeof(path), "/proc/%ld/fd/%d", pid, cfd);
  fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION,
                        "cannot open the client's segment (%s): another pid namespace, "
                        "another user, or no /proc",
                        strerror(errno));
    goto cleanup;
  }
  seals = fcntl(fd, F_GET_SEALS);
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION, "not a memory segment");
    goto cleanup;
  }
  if (st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION,
                        "the segment belongs to another user or is open to others");
    goto cleanup;
  }
  if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION,
                        "the segment is not sealed against shrinking");
    goto cleanup;
  }
  if (st.st_size < (off_t)SL_SHM_HDR + (off_t)SL_SHM_MIN_CAPACITY ||
      (uint64_t)st.st_size > (uint64_t)SL_SHM_HDR + SL_SHM_MAX_CAPACITY) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION, "bad segment size");
    goto cleanup;
  }
  base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION, "mmap: %s",
                        strerror(errno));
    goto cleanup;
  }
  if (memcmp(hdr_of(base)->magic, MAGIC, sizeof(MAGIC)) != 0 ||
      memcmp(hdr_of(base)->token, token, 16) != 0) {
    status = sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION,
                        "the segment's token differs (another pid namespace?)");
    goto cleanup;
  }
  e = calloc(1, sizeof(*e));
  if (e == NULL) {
    status = sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    goto cleanup;
  }
  memcpy(e->token, token, 16);
  e->fd = fd;
  e->base = base;
  e->size = (size_t)st.st_size;
  e->pid = pid;
  e->client_fd = cfd;
  e->dev = st.st_dev;
  e->ino = st.st_ino;
  atomic_init(&e->refs, 1);
  pthread_mutex_init(&e->mu, NULL);
  pthread_mutex_lock(&t->mu);
  if (t->n >= SL_SHM_TABLE_MAX || find_locked(t, token) != NULL) {
    int full = t->n >= SL_SHM_TABLE_MAX;
    pthread_mutex_unlock(&t->mu);
    pthread_mutex_destroy(&e->mu);
    free(e);
    e = NULL;
    status = full ? sl_err_set(err, SL_EINVAL, SL_STATUS_FAILED_PRECONDITION,
                               "the server maps %d segments already", SL_SHM_TABLE_MAX)
                  : SL_OK;
    goto cleanup;
  }
  e->next = t->head;
  t->head = e;
  t->n++;
  pthread_mutex_unlock(&t->mu);
  return SL_OK;
cleanup:
  if (base != MAP_FAILED) munmap(base, (size_t)st.st_size);
  if (fd >= 0) close(fd);
  return status;
}

/* "<token hex> <seq> <len>" and an optional " <off>", nothing else; -1 when not. */
static int parse_req(const char *buf, char *tokhex, unsigned long long *seq,
                     unsigned long long *n, unsigned long long *off) {
  int pos = -1, pos2 = -1;
  *off = 0;
  if (sscanf(buf, "%33s %llu %llu%n", tokhex, seq, n, &pos) != 3 || pos < 0) return -1;
  if (buf[pos] == '\0') return 0;
  if (sscanf(buf + pos, " %llu%n", off, &pos2) != 1 || pos2 < 0 || buf[pos + pos2] != '\0') {
    return -1;
  }
  return 0;
}

int sl_shm_table_begin(sl_shm_table *t, const char *value, size_t len, sl_shm_use **use,
                       sl_span *span, sl_err *err) {
  char buf[128], tokhex[SL_SHM_TOKEN_HEX + 2];
  unsigned long long seq, n, off = 0;
  uint8_t token[16];
  entry *e;
  sl_shm_use *u;
  *use = NULL;
  if (value_str(value, len, buf, sizeof(buf)) != 0 || parse_req(buf, tokhex, &seq, &n, &off) != 0 ||
      strlen(tokhex) != SL_SHM_TOKEN_HEX || unhex(tokhex, token, 16) != 0 || seq == 0 ||
      seq >= ((unsigned long long)1 << 60) || strchr(buf, '-') != NULL) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "malformed " SL_SHM_MD_REQ " metadata");
  }
  u = malloc(sizeof(*u));
  if (u == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "out of memory");
  pthread_mutex_lock(&t->mu);
  e = find_locked(t, token);
  if (e == NULL) {
    pthread_mutex_unlock(&t->mu);
    free(u);
    return sl_err_set(err, SL_ENOTFOUND, SL_STATUS_FAILED_PRECONDITION,
                      "unknown shared-memory segment (the server restarted?)");
  }
  if (e->in_use || entry_views(e) > 0) {
    pthread_mutex_unlock(&t->mu);
    free(u);
    return sl_err_set(err, SL_ESTATE, SL_STATUS_FAILED_PRECONDITION,
                      "shared-memory segment in use by another call, or by the tensors of an "
                      "earlier one");
  }
  if (off > e->size - SL_SHM_HDR || n > e->size - SL_SHM_HDR - off) {
    size_t cap = e->size - SL_SHM_HDR;
    pthread_mutex_unlock(&t->mu);
    free(u);
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT,
                      "shared-memory request of %llu bytes at offset %llu is past its segment "
                      "(%zu bytes)",
                      n, off, cap);
  }
  {
    /* take the request unless the client gave up on it (or posted another) */
    uint64_t expect = STATE(seq, PHASE_POSTED);
    if (!atomic_compare_exchange_strong(&hdr_of(e->base)->state, &expect,
                                        STATE(seq, PHASE_HELD))) {
      pthread_mutex_unlock(&t->mu);
      free(u);
      return sl_err_set(err, SL_ESTATE, SL_STATUS_FAILED_PRECONDITION,
                        "the shared-memory request %llu is not posted (the client gave up?)",
                        seq);
    }
  }
  e->in_use = 1;
  atomic_fetch_add(&e->refs, 1);
  pthread_mutex_unlock(&t->mu);
  u->e = e;
  u->seq = seq;
  u->req_end = (size_t)(off + n);
  span->ptr = e->base + SL_SHM_HDR + off;
  span->len = (size_t)n;
  *use = u;
  return SL_OK;
}

int sl_shm_use_reply(sl_shm_use *u, const sl_payload *p, size_t *off_out, size_t *len_out) {
  entry *e = u->e;
  uint64_t expect = STATE(u->seq, PHASE_HELD);
  size_t cap = e->size - SL_SHM_HDR, len = sl_shm_payload_room(p), skew = sl_shm_align_offset(p);
  size_t after = (u->req_end + SL_SHM_ALIGN - 1) / SL_SHM_ALIGN * SL_SHM_ALIGN + skew, off;
  if (after <= cap && len <= cap - after) {
    off = after; /* beside the request, which tensors may still view */
  } else if (skew <= cap && len <= cap - skew && entry_views(e) == 0) {
    off = skew; /* over the request: nothing views it */
  } else {
    return SL_ETOOBIG;
  }
  if (!atomic_compare_exchange_strong(&hdr_of(e->base)->state, &expect,
                                      STATE(u->seq, PHASE_WRITING))) {
    return SL_ESTATE; /* the client scribbled on the state word */
  }
  *off_out = off;
  if (sl_shm_copy_payload(e->base + SL_SHM_HDR + off, cap - off, p, len_out) != SL_OK) {
    atomic_store(&hdr_of(e->base)->state, STATE(u->seq, PHASE_RELEASED)); /* cannot be: sized */
    return SL_ETOOBIG;
  }
  atomic_store(&hdr_of(e->base)->state, STATE(u->seq, PHASE_DONE));
  return SL_OK;
}

void sl_shm_use_end(sl_shm_table *t, sl_shm_use *u) {
  uint64_t expect;
  if (u == NULL) return;
  expect = STATE(u->seq, PHASE_HELD); /* no reply written: let go of it */
  atomic_compare_exchange_strong(&hdr_of(u->e->base)->state, &expect,
                                 STATE(u->seq, PHASE_RELEASED));
  pthread_mutex_lock(&t->mu);
  u->e->in_use = 0;
  pthread_mutex_unlock(&t->mu);
  entry_unref(u->e);
  free(u);
}
