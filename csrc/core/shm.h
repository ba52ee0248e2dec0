/* shm.h: the same-host shared-memory channel (tensor bytes in memfd segments, gRPC
 * carrying only the control message).
 *
 * A client segment is an anonymous memfd (no name in /dev/shm or anywhere else),
 * mode 0600, sealed against shrinking (F_SEAL_SHRINK), that starts with an
 * sl_shm_hdr (a magic, a random 128-bit token, the state word) followed by
 * SL_SHM_HDR - sizeof(hdr) bytes of padding and the data area. The server opens it
 * through /proc/<client pid>/fd/<fd> (which the kernel allows only to the same
 * user, in the same pid namespace), refuses it unless the boot id is its own, the
 * file is a regular file owned by its own effective uid with no group/other
 * permissions, sealed against shrinking, and starts with the token the client
 * named; then it maps it (no name ever exists, so nothing is left behind when
 * either side is killed: the memory goes with the last mapping).
 *
 * One call at a time uses a segment: the client writes the packed request into
 * the data area (at an offset that puts its largest piece, the tensor, on a
 * 64-byte boundary) and posts a sequence number (state = seq, POSTED); the server
 * takes it (POSTED -> HELD), reads the request, computes, and when its reply fits
 * moves HELD -> WRITING, writes the reply beside the request (over it when
 * nothing views the request and it does not fit beside), and sets DONE; otherwise
 * it lets go (HELD -> RELEASED). A client giving up on a call moves POSTED ->
 * ABANDONED, after which the server never takes it; a segment found HELD or
 * WRITING when its client gave up is never reused (the server may still read or
 * write it). The moves are atomic compare-and-swaps on the shared word.
 *
 * Zero copies on receive: a raw tensor of the request (server) or of the reply
 * (client) is not copied out of the segment but lent (sl_span_owner.lend in
 * message.h): the tensor views the segment and holds a reference on it until it is
 * freed, from any thread. While the server's tensors view a segment its header's
 * hold word is 1 and the client writes no new request into it (it takes another
 * segment, or goes over TCP); while the client's tensors view it, the client's
 * pool does not hand it out. Either side's mapping lives as long as its tensors,
 * past its call, its pool or table, and the peer's exit.
 *
 * Control metadata (see docs/shm.md): "sl-shm-attach" = "<boot id> <pid> <fd>
 * <token hex>" on an ordinary call; "sl-shm-req" = "<token hex> <seq> <len> [<off>]"
 * on a call whose message is empty (the request is at data offset <off>, 0 when
 * absent); the server answers in trailing metadata "sl-shm" ("attached", "refused:
 * <why>", "unknown") and "sl-shm-reply" = "<len> [<off>]".
 *
 * Nothing here calls gRPC or Python. Ownership: each object is owned by whoever
 * created it and freed by its _free or _destroy function; the functions borrow their
 * arguments. Pools and tables are thread-safe (one mutex each); a segment acquired
 * from a pool belongs to one thread until it is released.
 */
#ifndef SL_SHM_H
#define SL_SHM_H

#include <stddef.h>
#include <stdint.h>

#include "payload.h"
#include "sl_common.h"
#include "wire.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SL_SHM_HDR 4096                    /* data starts here (page aligned) */
#define SL_SHM_ALIGN 64                    /* tensors in a segment start on this boundary */
#define SL_SHM_MIN_CAPACITY ((size_t)1 << 20)
#define SL_SHM_MAX_CAPACITY ((size_t)1 << 31) /* bigger messages go over TCP */
#define SL_SHM_MIN_MESSAGE ((size_t)64 << 10) /* smaller messages stay on gRPC (no gain) */
#define SL_SHM_POOL_MAX 8                  /* segments per client */
#define SL_SHM_POOL_BYTES ((size_t)4 << 30)   /* their capacities together, per client */
#define SL_SHM_TABLE_MAX 1024              /* segments mapped by one server */
#define SL_SHM_TOKEN_HEX 32

#define SL_SHM_MD_ATTACH "sl-shm-attach"
#define SL_SHM_MD_REQ "sl-shm-req"
#define SL_SHM_MD_STATE "sl-shm"
#define SL_SHM_MD_REPLY "sl-shm-reply"
#define SL_SHM_MD_PREFIX "sl-shm"

/* 1 when shared memory is allowed by the environment: SPLITLEARN_SHM is unset or
 * not "0". */
int sl_shm_env_enabled(void);

/* 1 when `target` (a gRPC target string) names this host: unix:/unix-abstract:
 * addresses, localhost, 127.0.0.0/8 and [::1] (with or without ipv4:/ipv6:/dns:). */
int sl_shm_target_is_local(const char *target);

/* Where to place `p` in a data area (0 .. SL_SHM_ALIGN - 1) so that its first
 * tensor (a message of named tensors, whose other tensors padding aligns) or its
 * largest piece (any other message) starts on an SL_SHM_ALIGN boundary. */
size_t sl_shm_align_offset(const sl_payload *p);

/* The most bytes `p` takes in a segment: its size, that offset, and the padding. */
size_t sl_shm_payload_room(const sl_payload *p);

/* Copy every piece of `p` to `dst` (at most `cap` bytes); in a message of named
 * tensors, a padding field (number 100, reserved in proto/, skipped by every
 * protobuf reader) goes before each tensor after the first so that every tensor
 * starts on an SL_SHM_ALIGN boundary of dst's address (the peer's mapping is page
 * aligned too). *written gets the message's length as written. SL_ETOOBIG when it
 * does not fit (nothing meaningful written). */
int sl_shm_copy_payload(uint8_t *dst, size_t cap, const sl_payload *p, size_t *written);

/* ---- client side ---------------------------------------------------------- */

typedef struct sl_shm_seg sl_shm_seg;

/* A new segment whose data area holds at least `capacity` bytes (one reference,
 * the caller's). */
int sl_shm_seg_create(size_t capacity, sl_shm_seg **out, sl_err *err);
/* Drop a reference: the segment is unmapped and closed with the last. */
void sl_shm_seg_destroy(sl_shm_seg *s);
/* sl_span_owner lend/unlend over a segment (`seg`): one more reference, held by a
 * tensor viewing the segment; unlend drops it (any thread). */
void *sl_shm_seg_lend(void *seg);
void sl_shm_seg_unlend(void *seg);
uint8_t *sl_shm_seg_data(sl_shm_seg *s);
size_t sl_shm_seg_capacity(const sl_shm_seg *s);
int sl_shm_seg_fd(const sl_shm_seg *s);
/* The "sl-shm-attach" value (NUL-terminated in buf); SL_ETOOBIG when buf is small. */
int sl_shm_seg_attach_value(const sl_shm_seg *s, char *buf, size_t n);
/* Post a request of `len` bytes already written at offset `off` of the data area:
 * a new sequence number, state POSTED; writes the "sl-shm-req" value into buf. */
int sl_shm_seg_post(sl_shm_seg *s, size_t off, size_t len, char *buf, size_t n);
/* Write request `p` into the data area (at sl_shm_align_offset, padded by
 * sl_shm_copy_payload) and post it; the "sl-shm-req" value goes into buf.
 * SL_ETOOBIG when it does not fit (nothing posted). Each attempt of a call does
 * this again. */
int sl_shm_seg_put_request(sl_shm_seg *s, const sl_payload *p, char *buf, size_t n);
/* After a call that posted: 1 when the server will never touch this segment for
 * the posted request any more (ABANDONED by us, RELEASED or DONE), 0 when it
 * holds it now (the segment must not be reused). */
int sl_shm_seg_settle(sl_shm_seg *s);
/* 1 when the posted request's reply is in the data area (state DONE, our seq). */
int sl_shm_seg_reply_ready(const sl_shm_seg *s);

/* A client's segments: at most SL_SHM_POOL_MAX holding SL_SHM_POOL_BYTES together,
 * each used by one call at a time. */
typedef struct sl_shm_pool sl_shm_pool;
int sl_shm_pool_new(sl_shm_pool **out);
void sl_shm_pool_free(sl_shm_pool *p); /* no segment may be acquired */
/* A free segment with capacity >= need, marked busy (free: no call uses it, and no
 * tensor of ours or of the server views it). *attached says whether the
 * server knows it. When none fits, a new one is created (*attached = 0), free
 * segments dropped first as the bounds require. NULL when the busy segments leave
 * no room, or creation failed (err says why). */
sl_shm_seg *sl_shm_pool_acquire(sl_shm_pool *p, size_t need, int *attached, sl_err *err);
/* Give a segment back. `reusable` 0: drop it (the pool's reference). `attached`:
 * the server knows it. */
void sl_shm_pool_release(sl_shm_pool *p, sl_shm_seg *s, int reusable, int attached);
/* Mark every segment unknown to the server (it restarted): each is offered again. */
void sl_shm_pool_forget(sl_shm_pool *p);
size_t sl_shm_pool_count(sl_shm_pool *p);

/* ---- server side ------------------------------------------------------------ */

typedef struct sl_shm_table sl_shm_table;
typedef struct sl_shm_use sl_shm_use; /* one call's hold on a mapped segment */

int sl_shm_table_new(sl_shm_table **out);
void sl_shm_table_free(sl_shm_table *t); /* no use may be outstanding */

/* Map the segment an "sl-shm-attach" value names. SL_OK when it is mapped (or was
 * already); otherwise SL_EINVAL with err naming why it was refused (the call
 * goes on over TCP). Attaching sweeps first. */
int sl_shm_table_attach(sl_shm_table *t, const char *value, size_t len, sl_err *err);

/* Begin a call from an "sl-shm-req" value: *span gets the request bytes inside the
 * mapping (valid until sl_shm_use_end). Malformed values or a length past the
 * segment: SL_EINVAL, INVALID_ARGUMENT. An unknown token: SL_ENOTFOUND,
 * FAILED_PRECONDITION. A segment another call holds, or a request not posted (the
 * client gave up on it): SL_ESTATE, FAILED_PRECONDITION. */
int sl_shm_table_begin(sl_shm_table *t, const char *value, size_t len, sl_shm_use **use,
                       sl_span *span, sl_err *err);
/* Write the reply `p` into the segment when it fits: SL_OK (*len bytes written at
 * data offset *off), SL_ETOOBIG (does not fit), SL_ESTATE (the state word is not
 * ours: a misbehaving client). */
int sl_shm_use_reply(sl_shm_use *u, const sl_payload *p, size_t *off, size_t *len);
void sl_shm_use_end(sl_shm_table *t, sl_shm_use *u);
/* sl_span_owner lend/unlend over a call's request (`use`): the tensor holds the
 * segment's mapping and its hold word until unlend (any thread; the use, the table
 * and the server may be gone by then). */
void *sl_shm_use_lend(void *use);
void sl_shm_use_unlend(void *token);

/* Unmap the segments whose client closed them or died (checked through
 * /proc/<pid>/fd/<fd>); returns how many went. Segments in use are kept. */
size_t sl_shm_table_sweep(sl_shm_table *t);
/* Sweep at most every `interval` seconds (callers on hot paths). */
void sl_shm_table_maybe_sweep(sl_shm_table *t, double interval);
size_t sl_shm_table_count(sl_shm_table *t);

#ifdef __cplusplus
}
#endif

#endif /* SL_SHM_H */
