/* floor_common.h: private to benchmarks/floor (not part of the library).
 *
 * What echo_floor.c and core_echo.c share: the command line, a server in a forked
 * child process (its port comes back through a pipe; it exits when the parent
 * closes the other pipe or dies), timing, percentiles and the JSON lines both
 * print. Each program defines serve(port_fd) (runs in the child, writes the bound
 * port as an int to port_fd, then serves until the process exits) and the client
 * calls. Output, one JSON object per line on stdout:
 *
 *   {"bench": NAME, "bytes": B, "n": N, "p50_us": .., "p99_us": .., "min_us": ..,
 *    "client_cpu_us": CPU time of the client process per round trip}
 *   {"bench": NAME "-cold", "bytes": B, "calls_ms": [first, second, ...]}
 */
#ifndef FLOOR_COMMON_H
#define FLOOR_COMMON_H

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#define FLOOR_MAX_SIZES 16

/* The C allocator's settings the library makes (sl_malloc_tune in
 * csrc/core/tensor.c: glibc's mmap and trim thresholds at 32 MiB; none with
 * SPLITLEARN_MALLOC_TUNING=0), made here too, before the server forks, so that
 * the floor and our rows run on the same allocator and their ratio compares the
 * designs. Both programs call it first thing. */
static void floor_malloc_like_library(void) {
#if defined(__GLIBC__)
  const char *v = getenv("SPLITLEARN_MALLOC_TUNING");
  if (v != NULL && strcmp(v, "0") == 0) return;
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024);
#endif
}

typedef struct floor_opts {
  size_t sizes[FLOOR_MAX_SIZES];
  int n[FLOOR_MAX_SIZES];
  int nsizes;
  int warm;       /* warm-up calls per size (default n / 10, at least 3) */
  size_t cold;    /* bytes of the cold calls (0: none) */
  int cold_calls; /* how many cold calls on one new client (default 3) */
} floor_opts;

static inline double floor_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void floor_usage(const char *prog) {
  fprintf(stderr,
          "usage: %s [--sizes B,B,..] [--n N,N,..] [--warm W] [--cold BYTES [--cold-calls K]]\n"
          "  --sizes  tensor bytes per round trip (default 3072,1048576,33554432; none)\n"
          "  --n      timed round trips for each size (default 2000,300,30)\n"
          "  --cold   time the first K round trips of BYTES on a new client and server\n"
          "           (alone: no other sizes)\n",
          prog);
  exit(2);
}

static inline int floor_list(const char *s, size_t *out, int max) {
  int k = 0;
  while (*s != '\0' && k < max) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s) return -1;
    out[k++] = (size_t)v;
    s = *end == ',' ? end + 1 : end;
    if (*end != ',' && *end != '\0') return -1;
  }
  return k;
}

static inline void floor_parse(int argc, char **argv, floor_opts *o) {
  size_t tmp[FLOOR_MAX_SIZES];
  int nn = -1, sizes_given = 0;
  memset(o, 0, sizeof(*o));
  o->sizes[0] = 3072;
  o->sizes[1] = 1048576;
  o->sizes[2] = 33554432;
  o->n[0] = 2000;
  o->n[1] = 300;
  o->n[2] = 30;
  o->nsizes = 3;
  o->warm = -1;
  o->cold_calls = 3;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (v == NULL) floor_usage(argv[0]);
    if (strcmp(a, "--sizes") == 0) {
      sizes_given = 1;
      o->nsizes = strcmp(v, "none") == 0 ? 0 : floor_list(v, o->sizes, FLOOR_MAX_SIZES);
      if (o->nsizes < 0 || (o->nsizes == 0 && strcmp(v, "none") != 0)) floor_usage(argv[0]);
    } else if (strcmp(a, "--n") == 0) {
      nn = floor_list(v, tmp, FLOOR_MAX_SIZES);
      if (nn <= 0) floor_usage(argv[0]);
      for (int k = 0; k < nn; k++) o->n[k] = (int)tmp[k];
    } else if (strcmp(a, "--warm") == 0) {
      o->warm = atoi(v);
    } else if (strcmp(a, "--cold") == 0) {
      o->cold = (size_t)strtoull(v, NULL, 10);
    } else if (strcmp(a, "--cold-calls") == 0) {
      o->cold_calls = atoi(v);
    } else {
      floor_usage(argv[0]);
    }
    i++;
  }
  if (o->cold > 0 && !sizes_given) o->nsizes = 0; /* --cold alone: only the cold calls */
  /* one --n for several sizes: the same count for each; fewer: the last repeats */
  if (nn > 0) {
    for (int k = nn; k < o->nsizes; k++) o->n[k] = o->n[nn - 1];
  }
  for (int k = 0; k < o->nsizes; k++) {
    if (o->n[k] < 1) o->n[k] = 1;
  }
  if (o->cold_calls < 1) o->cold_calls = 1;
}

static int floor_cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The q-th percentile of sorted values, linear interpolation between the closest
 * ranks (what Python's statistics.quantiles(method="inclusive") gives). */
static inline double floor_pct(const double *v, int n, double q) {
  double pos = q / 100.0 * (double)(n - 1);
  int lo = (int)pos;
  if (lo >= n - 1) return v[n - 1];
  return v[lo] + (v[lo + 1] - v[lo]) * (pos - (double)lo);
}

/* CPU seconds (user + system) of this process, every thread: the client's. */
static inline double floor_cpu(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* `cpu_s`: the client process's CPU time over the n timed calls. */
static inline void floor_report(const char *name, size_t bytes, double *lat_s, int n,
                                double cpu_s) {
  qsort(lat_s, (size_t)n, sizeof(double), floor_cmp);
  printf("{\"bench\": \"%s\", \"bytes\": %zu, \"n\": %d, \"p50_us\": %.2f, \"p99_us\": %.2f, "
         "\"min_us\": %.2f, \"client_cpu_us\": %.2f}\n",
         name, bytes, n, floor_pct(lat_s, n, 50) * 1e6, floor_pct(lat_s, n, 99) * 1e6,
         lat_s[0] * 1e6, cpu_s / n * 1e6);
  fflush(stdout);
}

static inline void floor_report_cold(const char *name, size_t bytes, const double *call_s, int n) {
  printf("{\"bench\": \"%s-cold\", \"bytes\": %zu, \"calls_ms\": [", name, bytes);
  for (int i = 0; i < n; i++) printf("%s%.2f", i ? ", " : "", call_s[i] * 1e3);
  printf("]}\n");
  fflush(stdout);
}

/* The server process. */
typedef struct floor_child {
  pid_t pid;
  int port;
  int keep_fd; /* the parent's end of the pipe whose closing stops the child */
} floor_child;

static void serve(int port_fd); /* defined by each program; runs in the child */

static void *floor_watch_parent(void *arg) {
  char c;
  int fd = (int)(intptr_t)arg;
  while (read(fd, &c, 1) != 0 && errno == EINTR) {
  }
  _exit(0);
  return NULL;
}

/* Fork a server child (before grpc_init in the parent: gRPC does not survive a
 * fork). Returns 0, or -1 with a message on stderr. */
#include <pthread.h>
static inline int floor_spawn(floor_child *ch) {
  int port_pipe[2], keep_pipe[2];
  if (pipe(port_pipe) != 0 || pipe(keep_pipe) != 0) {
    perror("pipe");
    return -1;
  }
  ch->pid = fork();
  if (ch->pid < 0) {
    perror("fork");
    return -1;
  }
  if (ch->pid == 0) {
    pthread_t t;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(port_pipe[0]);
    close(keep_pipe[1]);
    if (pthread_create(&t, NULL, floor_watch_parent, (void *)(intptr_t)keep_pipe[0]) != 0) _exit(1);
    serve(port_pipe[1]);
    _exit(0);
  }
  close(port_pipe[1]);
  close(keep_pipe[0]);
  ch->keep_fd = keep_pipe[1];
  {
    struct pollfd p = {port_pipe[0], POLLIN, 0};
    int port = 0;
    if (poll(&p, 1, 30000) != 1 || read(port_pipe[0], &port, sizeof(port)) != sizeof(port) ||
        port <= 0) {
      fprintf(stderr, "the server child did not start\n");
      close(port_pipe[0]);
      return -1;
    }
    ch->port = port;
  }
  close(port_pipe[0]);
  return 0;
}

static inline void floor_stop(floor_child *ch) {
  int st;
  close(ch->keep_fd);
  waitpid(ch->pid, &st, 0);
}

static inline void floor_fill(unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 131u + 7u);
}

#endif /* FLOOR_COMMON_H */
