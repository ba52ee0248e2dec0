/* test_shm.c: the shared-memory segments (client side), the server's table of
 * mapped segments, the control values and their refusals, and the sweep after a
 * client process is killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shm.h"
#include "sl_test.h"

static sl_payload *payload_of(const char *head, const char *body) {
  sl_payload *p = NULL;
  uint8_t *h = malloc(strlen(head) + 1);
  memcpy(h, head, strlen(head));
  sl_payload_new(h, strlen(head), body, strlen(body), NULL, NULL, &p);
  return p;
}

static void test_round_trip_in_one_process(void) {
  sl_shm_seg *s = NULL;
  sl_shm_table *t = NULL;
  sl_shm_use *u = NULL;
  sl_span span;
  sl_err err;
  char av[200], rv[100];
  sl_payload *req = payload_of("head:", "request bytes"), *rep = payload_of("R:", "reply");
  CHECK_EQ_INT(sl_shm_seg_create(100, &s, &err), SL_OK);
  CHECK(sl_shm_seg_capacity(s) >= SL_SHM_MIN_CAPACITY);
  CHECK_EQ_INT(sl_shm_table_new(&t), SL_OK);
  CHECK_EQ_INT(sl_shm_seg_attach_value(s, av, sizeof(av)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_attach(t, av, strlen(av), &err), SL_OK);
  CHECK_EQ_INT(sl_shm_table_attach(t, av, strlen(av), &err), SL_OK); /* again: no second map */
  CHECK_EQ_INT(sl_shm_table_count(t), 1);
  {
    size_t n = 0;
    CHECK_EQ_INT(sl_shm_copy_payload(sl_shm_seg_data(s), sl_shm_seg_capacity(s), req, &n), SL_OK);
    CHECK_EQ_INT(n, sl_payload_size(req)); /* one tensor: no padding */
  }
  CHECK_EQ_INT(sl_shm_seg_post(s, 0, sl_payload_size(req), rv, sizeof(rv)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u, &span, &err), SL_OK);
  CHECK_EQ_INT(span.len, 18);
  CHECK(memcmp(span.ptr, "head:request bytes", 18) == 0);
  /* a second call naming the same segment while it is in use is refused */
  {
    sl_shm_use *u2 = NULL;
    CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u2, &span, &err), SL_ESTATE);
    CHECK_EQ_INT(err.code, SL_STATUS_FAILED_PRECONDITION);
  }
  CHECK(!sl_shm_seg_settle(s)); /* the server holds it: never reused */
  {
    /* the reply goes beside the request, its largest piece on a 64-byte boundary */
    size_t off = 0, n = 0;
    CHECK_EQ_INT(sl_shm_use_reply(u, rep, &off, &n), SL_OK);
    CHECK_EQ_INT(n, 7);
    CHECK(off >= 18);
    CHECK_EQ_INT((off + 2) % SL_SHM_ALIGN, 0); /* "reply" follows "R:" */
    CHECK(memcmp(sl_shm_seg_data(s) + off, "R:reply", 7) == 0);
    CHECK(memcmp(sl_shm_seg_data(s), "head:request bytes", 18) == 0);
  }
  sl_shm_use_end(t, u);
  CHECK(sl_shm_seg_reply_ready(s));
  CHECK(sl_shm_seg_settle(s)); /* DONE: reusable */
  /* a client that gave up before the server took the request: it never takes it */
  CHECK_EQ_INT(sl_shm_seg_post(s, 0, 4, rv, sizeof(rv)), SL_OK);
  CHECK(sl_shm_seg_settle(s));
  CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u, &span, &err), SL_ESTATE);
  CHECK(u == NULL);
  /* a server that lets go without a reply (an error, a reply over TCP) */
  CHECK_EQ_INT(sl_shm_seg_post(s, 0, 4, rv, sizeof(rv)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u, &span, &err), SL_OK);
  sl_shm_use_end(t, u);
  CHECK(!sl_shm_seg_reply_ready(s));
  CHECK(sl_shm_seg_settle(s));
  /* an old sequence number is not taken */
  {
    char old[100];
    memcpy(old, rv, sizeof(old));
    CHECK_EQ_INT(sl_shm_seg_post(s, 0, 4, rv, sizeof(rv)), SL_OK);
    CHECK_EQ_INT(sl_shm_table_begin(t, old, strlen(old), &u, &span, &err), SL_ESTATE);
    CHECK(sl_shm_seg_settle(s));
  }
  /* the client closes the segment: the sweep unmaps it */
  sl_shm_seg_destroy(s);
  CHECK_EQ_INT(sl_shm_table_sweep(t), 1);
  CHECK_EQ_INT(sl_shm_table_count(t), 0);
  sl_shm_table_free(t);
  sl_payload_unref(req);
  sl_payload_unref(rep);
}

/* Bad control values: INVALID_ARGUMENT for malformed ones and lengths past the
 * segment, FAILED_PRECONDITION for unknown segments; none maps anything. */
static void test_bad_request_values(void) {
  sl_shm_seg *s = NULL;
  sl_shm_table *t = NULL;
  sl_shm_use *u = NULL;
  sl_span span;
  sl_err err;
  char av[200], v[300];
  const char *tok;
  sl_shm_seg_create(1, &s, &err);
  sl_shm_table_new(&t);
  sl_shm_seg_attach_value(s, av, sizeof(av));
  CHECK_EQ_INT(sl_shm_table_attach(t, av, strlen(av), &err), SL_OK);
  tok = strrchr(av, ' ') + 1;
  {
    const char *bad[] = {"", "x", "zz 1 1", "0123 1 1", "%s", "%s 0 1", "%s -1 5", "%s 1 -5",
                         "%s 1", "%s 1 1 extra", "%s 18446744073709551615 1",
                         "%s 1 99999999999999999999999", "%s 1 1 ", "%s 1 1 5 extra",
                         "%s 1 1 -3", "%s 1 1 5x", "%s 1 1 99999999999999999999999"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
      snprintf(v, sizeof(v), bad[i], tok);
      CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_EINVAL);
      CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
      CHECK(u == NULL);
    }
  }
  /* one byte past the data area */
  snprintf(v, sizeof(v), "%s 1 %zu", tok, sl_shm_seg_capacity(s) + 1);
  CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "past its segment");
  /* an offset past it, or a length that runs past it from the offset */
  snprintf(v, sizeof(v), "%s 1 1 %zu", tok, sl_shm_seg_capacity(s) + 1);
  CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_EINVAL);
  snprintf(v, sizeof(v), "%s 1 %zu 64", tok, sl_shm_seg_capacity(s) - 63);
  CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "past its segment");
  sl_shm_seg_post(s, 0, 1, v, sizeof(v));
  snprintf(v, sizeof(v), "%s 1 %zu", tok, sl_shm_seg_capacity(s));
  CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_OK);
  sl_shm_use_end(t, u);
  sl_shm_seg_post(s, 0, 1, v, sizeof(v)); /* seq 2, with an offset: the span starts there */
  memcpy(sl_shm_seg_data(s) + 64, "at 64", 5);
  snprintf(v, sizeof(v), "%s 2 %zu 64", tok, sl_shm_seg_capacity(s) - 64);
  CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_OK);
  CHECK(memcmp(span.ptr, "at 64", 5) == 0); /* (the server maps it at its own address) */
  sl_shm_use_end(t, u);
  /* a NUL inside the value */
  CHECK_EQ_INT(sl_shm_table_begin(t, "ab\0cd", 5, &u, &span, &err), SL_EINVAL);
  /* an unknown token */
  snprintf(v, sizeof(v), "%032d 1 1", 7);
  CHECK_EQ_INT(sl_shm_table_begin(t, v, strlen(v), &u, &span, &err), SL_ENOTFOUND);
  CHECK_EQ_INT(err.code, SL_STATUS_FAILED_PRECONDITION);
  sl_shm_seg_destroy(s);
  sl_shm_table_free(t);
}

/* Attach values the server refuses, each with its reason. */
static void test_attach_refusals(void) {
  sl_shm_seg *s = NULL;
  sl_shm_table *t = NULL;
  sl_err err;
  char av[200], v[300], boot[40], tok[40];
  long pid;
  int fd;
  sl_shm_seg_create(1, &s, &err);
  sl_shm_table_new(&t);
  sl_shm_seg_attach_value(s, av, sizeof(av));
  CHECK_EQ_INT(sscanf(av, "%39s %ld %d %39s", boot, &pid, &fd, tok), 4);
  /* malformed */
  CHECK_EQ_INT(sl_shm_table_attach(t, "nonsense", 8, &err), SL_EINVAL);
  CHECK_EQ_INT(err.code, SL_STATUS_INVALID_ARGUMENT);
  /* another host */
  snprintf(v, sizeof(v), "00000000-0000-0000-0000-000000000000 %ld %d %s", pid, fd, tok);
  CHECK_EQ_INT(sl_shm_table_attach(t, v, strlen(v), &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "another host");
  /* a token the segment does not hold (another pid namespace's fd, a guess) */
  snprintf(v, sizeof(v), "%s %ld %d %032d", boot, pid, fd, 5);
  CHECK_EQ_INT(sl_shm_table_attach(t, v, strlen(v), &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "token");
  /* no such fd */
  snprintf(v, sizeof(v), "%s %ld %d %s", boot, pid, 100000, tok);
  CHECK_EQ_INT(sl_shm_table_attach(t, v, strlen(v), &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "cannot open");
  /* not sealed */
  {
    int m = memfd_create("x", MFD_CLOEXEC);
    CHECK(fchmod(m, 0600) == 0 && ftruncate(m, SL_SHM_HDR + SL_SHM_MIN_CAPACITY) == 0);
    snprintf(v, sizeof(v), "%s %ld %d %s", boot, pid, m, tok);
    CHECK_EQ_INT(sl_shm_table_attach(t, v, strlen(v), &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "sealed");
    /* open to others */
    CHECK(fchmod(m, 0644) == 0);
    CHECK_EQ_INT(sl_shm_table_attach(t, v, strlen(v), &err), SL_EINVAL);
    CHECK_CONTAINS(err.msg, "another user");
    close(m);
  }
  /* a pipe, not a segment */
  {
    int pp[2];
    CHECK(pipe(pp) == 0);
    snprintf(v, sizeof(v), "%s %ld %d %s", boot, pid, pp[0], tok);
    CHECK_EQ_INT(sl_shm_table_attach(t, v, strlen(v), &err), SL_EINVAL);
    close(pp[0]);
    close(pp[1]);
  }
  CHECK_EQ_INT(sl_shm_table_count(t), 0);
  sl_shm_seg_destroy(s);
  sl_shm_table_free(t);
}

/* A child process makes a segment and waits; fills av with its attach value. */
static pid_t child_with_segment(char *av, size_t n, uid_t as_uid) {
  int pp[2], go[2];
  pid_t pid;
  if (pipe(pp) != 0 || pipe(go) != 0) return -1;
  pid = fork();
  if (pid == 0) {
    sl_shm_seg *s = NULL;
    sl_err err;
    char buf[200] = "";
    char c;
    close(pp[0]);
    if (as_uid != (uid_t)-1 && setuid(as_uid) != 0) _exit(2);
    if (sl_shm_seg_create(1, &s, &err) == SL_OK) sl_shm_seg_attach_value(s, buf, sizeof(buf));
    if (write(pp[1], buf, sizeof(buf)) != (ssize_t)sizeof(buf)) _exit(3);
    if (read(go[0], &c, 1) < 0) _exit(4); /* until the parent closes it or kills us */
    _exit(0);
  }
  close(pp[1]);
  close(go[0]);
  if (read(pp[0], av, n < 200 ? n : 200) <= 0) av[0] = '\0';
  close(pp[0]);
  /* go[1] stays open: the child waits until it is killed */
  return pid;
}

/* kill -9 of a client process: its segment goes from the server's table at the
 * next sweep, and since no name ever existed, nothing is left in /dev/shm. */
static void test_sweep_after_kill(void) {
  sl_shm_table *t = NULL;
  sl_err err;
  char av[200];
  int status;
  pid_t pid = child_with_segment(av, sizeof(av), (uid_t)-1);
  CHECK(pid > 0);
  sl_shm_table_new(&t);
  CHECK_EQ_INT(sl_shm_table_attach(t, av, strlen(av), &err), SL_OK);
  CHECK_EQ_INT(sl_shm_table_count(t), 1);
  CHECK_EQ_INT(sl_shm_table_sweep(t), 0); /* alive */
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  CHECK_EQ_INT(sl_shm_table_sweep(t), 1);
  CHECK_EQ_INT(sl_shm_table_count(t), 0);
  sl_shm_table_free(t);
}

/* A segment of another user is refused (needs root to make the other user). */
static void test_other_user_refused(void) {
  sl_shm_table *t = NULL;
  sl_err err;
  char av[200];
  int status;
  pid_t pid;
  if (geteuid() != 0) {
    printf("     (skipped: needs root to run a child as another user)\n");
    return;
  }
  pid = child_with_segment(av, sizeof(av), 65534);
  CHECK(pid > 0);
  CHECK(av[0] != '\0');
  sl_shm_table_new(&t);
  CHECK_EQ_INT(sl_shm_table_attach(t, av, strlen(av), &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "another user");
  CHECK_EQ_INT(sl_shm_table_count(t), 0);
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  sl_shm_table_free(t);
}

static void test_pool(void) {
  sl_shm_pool *p = NULL;
  sl_shm_seg *a, *b, *c, *segs[SL_SHM_POOL_MAX];
  sl_err err;
  int attached;
  CHECK_EQ_INT(sl_shm_pool_new(&p), SL_OK);
  a = sl_shm_pool_acquire(p, 10, &attached, &err);
  CHECK(a != NULL && !attached);
  sl_shm_pool_release(p, a, 1, 1);
  b = sl_shm_pool_acquire(p, 10, &attached, &err);
  CHECK(b == a && attached); /* reused */
  c = sl_shm_pool_acquire(p, 10, &attached, &err);
  CHECK(c != NULL && c != a && !attached); /* a is busy */
  sl_shm_pool_release(p, c, 0, 0);         /* destroyed */
  CHECK_EQ_INT(sl_shm_pool_count(p), 1);
  sl_shm_pool_release(p, b, 1, 1);
  /* a bigger request replaces the free smaller segment when the pool is full */
  for (size_t i = 0; i < SL_SHM_POOL_MAX; i++) {
    segs[i] = sl_shm_pool_acquire(p, 10, &attached, &err);
    CHECK(segs[i] != NULL);
  }
  CHECK(sl_shm_pool_acquire(p, 10, &attached, &err) == NULL); /* all busy */
  sl_shm_pool_release(p, segs[0], 1, 1);
  c = sl_shm_pool_acquire(p, 3 * SL_SHM_MIN_CAPACITY, &attached, &err);
  CHECK(c != NULL && !attached && sl_shm_seg_capacity(c) >= 3 * SL_SHM_MIN_CAPACITY);
  CHECK_EQ_INT(sl_shm_pool_count(p), SL_SHM_POOL_MAX);
  sl_shm_pool_release(p, c, 1, 1);
  for (size_t i = 1; i < SL_SHM_POOL_MAX; i++) sl_shm_pool_release(p, segs[i], 1, 1);
  CHECK(sl_shm_pool_acquire(p, SL_SHM_MAX_CAPACITY + 1, &attached, &err) == NULL);
  /* the bytes bound: two 2 GiB segments fill it (memfd pages are only reserved
   * when touched); a third needs one of them free, and drops it */
  a = sl_shm_pool_acquire(p, SL_SHM_MAX_CAPACITY, &attached, &err);
  b = sl_shm_pool_acquire(p, SL_SHM_MAX_CAPACITY - 1, &attached, &err);
  CHECK(a != NULL && b != NULL);
  CHECK(sl_shm_pool_acquire(p, SL_SHM_MAX_CAPACITY, &attached, &err) == NULL);
  sl_shm_pool_release(p, b, 1, 1);
  c = sl_shm_pool_acquire(p, SL_SHM_MAX_CAPACITY, &attached, &err);
  CHECK(c == b); /* the free one fits */
  sl_shm_pool_release(p, a, 1, 1);
  sl_shm_pool_release(p, c, 1, 1);
  CHECK(sl_shm_pool_count(p) == 2); /* the small ones made room */
  CHECK(sl_shm_pool_acquire(p, 10, &attached, &err) != NULL); /* a free one fits */
  sl_shm_pool_free(p);
}

/* Tensors lent from segments (zero copies on receive): the server's views set the
 * hold word, which keeps the client from writing a new request there; the client's
 * views keep the pool from handing the segment out; and both sides' mappings live
 * as long as the views, past the call, the pool and the table. */
static void test_lent_views(void) {
  sl_shm_pool *p = NULL;
  sl_shm_table *t = NULL;
  sl_shm_seg *s, *other;
  sl_shm_use *u = NULL;
  sl_span span;
  sl_err err;
  char av[200], rv[100];
  int attached;
  void *view, *mine;
  size_t off = 0, n = 0;
  sl_payload *rep = payload_of("R:", "reply");
  CHECK_EQ_INT(sl_shm_pool_new(&p), SL_OK);
  CHECK_EQ_INT(sl_shm_table_new(&t), SL_OK);
  s = sl_shm_pool_acquire(p, 10, &attached, &err);
  CHECK(s != NULL);
  CHECK_EQ_INT(sl_shm_seg_attach_value(s, av, sizeof(av)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_attach(t, av, strlen(av), &err), SL_OK);
  memcpy(sl_shm_seg_data(s) + 64, "tensor", 6);
  CHECK_EQ_INT(sl_shm_seg_post(s, 64, 6, rv, sizeof(rv)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u, &span, &err), SL_OK);
  view = sl_shm_use_lend(u); /* the server's compute() keeps its input */
  CHECK(view != NULL);
  CHECK_EQ_INT(sl_shm_use_reply(u, rep, &off, &n), SL_OK);
  CHECK(off >= 70); /* beside the viewed request */
  sl_shm_use_end(t, u);
  CHECK(sl_shm_seg_settle(s));
  sl_shm_pool_release(p, s, 1, 1);
  /* held by the server's view: the next call gets another segment */
  other = sl_shm_pool_acquire(p, 10, &attached, &err);
  CHECK(other != NULL && other != s);
  /* a client that posts into it anyway is refused, and the view's bytes stay */
  CHECK_EQ_INT(sl_shm_seg_post(s, 64, 6, rv, sizeof(rv)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u, &span, &err), SL_ESTATE);
  CHECK_CONTAINS(err.msg, "tensors of an earlier one");
  CHECK(sl_shm_seg_settle(s));
  sl_shm_use_unlend(view);
  sl_shm_pool_release(p, other, 1, 0);
  /* the client's view of its reply keeps the segment from the pool too */
  mine = sl_shm_seg_lend(s);
  CHECK(sl_shm_pool_acquire(p, 10, &attached, &err) == other);
  sl_shm_seg_unlend(mine);
  CHECK(sl_shm_pool_acquire(p, 10, &attached, &err) == s);
  /* views outlive the table and the pool: the bytes stay mapped */
  CHECK_EQ_INT(sl_shm_seg_post(s, 64, 6, rv, sizeof(rv)), SL_OK);
  CHECK_EQ_INT(sl_shm_table_begin(t, rv, strlen(rv), &u, &span, &err), SL_OK);
  view = sl_shm_use_lend(u);
  sl_shm_use_end(t, u);
  mine = sl_shm_seg_lend(s);
  sl_shm_pool_release(p, s, 1, 1);
  sl_shm_pool_release(p, other, 1, 0);
  sl_shm_pool_free(p);
  sl_shm_table_free(t);
  CHECK(memcmp(span.ptr, "tensor", 6) == 0);
  CHECK(memcmp(sl_shm_seg_data(s) + 64, "tensor", 6) == 0);
  sl_shm_use_unlend(view);
  sl_shm_seg_unlend(mine); /* the last reference: unmapped now */
  sl_payload_unref(rep);
}

static void test_local_targets(void) {
  CHECK(sl_shm_target_is_local("127.0.0.1:5000"));
  CHECK(sl_shm_target_is_local("localhost:5000"));
  CHECK(sl_shm_target_is_local("unix:/tmp/x.sock"));
  CHECK(sl_shm_target_is_local("ipv4:127.0.0.1:1"));
  CHECK(sl_shm_target_is_local("[::1]:1"));
  CHECK(sl_shm_target_is_local("dns:///localhost:1"));
  CHECK(!sl_shm_target_is_local("10.0.0.2:5000"));
  CHECK(!sl_shm_target_is_local("example.com:5000"));
  CHECK(!sl_shm_target_is_local("ipv4:127.0.0.1:1,10.0.0.2:1"));
}

int main(void) {
  RUN(test_round_trip_in_one_process);
  RUN(test_bad_request_values);
  RUN(test_attach_refusals);
  RUN(test_sweep_after_kill);
  RUN(test_other_user_refused);
  RUN(test_pool);
  RUN(test_lent_views);
  RUN(test_local_targets);
  return sl_test_done("shm");
}
