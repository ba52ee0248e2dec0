/* runtime.c: see runtime.h. */
#include "runtime.h"

#include <grpc/grpc.h>
#include <grpc/support/log.h>
#include <pthread.h>
#include <stdio.h>

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static char ring[SL_LOG_LINES][SL_LOG_LINE_MAX];
static size_t written; /* lines written so far */
static int echo_stderr;
static sl_log_hook hook;
static void *hook_user;

static void sink(gpr_log_func_args *args) {
  static const char sev[] = {'D', 'I', 'E'};
  char line[SL_LOG_LINE_MAX];
  sl_log_hook h;
  void *u;
  snprintf(line, sizeof(line), "%c %s:%d] %s", sev[args->severity % 3], args->file, args->line,
           args->message);
  pthread_mutex_lock(&log_mu);
  snprintf(ring[written % SL_LOG_LINES], SL_LOG_LINE_MAX, "%s", line);
  written++;
  h = hook;
  u = hook_user;
  pthread_mutex_unlock(&log_mu);
  if (echo_stderr) fprintf(stderr, "%s\n", line);
  if (h != NULL) h(u, line);
}

static void init_once(void) {
  gpr_set_log_function(sink);
  grpc_init();
}

void sl_runtime_init(int echo) {
  pthread_mutex_lock(&log_mu);
  echo_stderr = echo != 0;
  pthread_mutex_unlock(&log_mu);
  pthread_once(&once, init_once);
}

void sl_runtime_set_log_hook(sl_log_hook h, void *user) {
  pthread_mutex_lock(&log_mu);
  hook = h;
  hook_user = user;
  pthread_mutex_unlock(&log_mu);
}

size_t sl_runtime_log_lines(void (*each)(void *user, const char *line), void *user) {
  size_t first, last;
  pthread_mutex_lock(&log_mu);
  last = written;
  first = last > SL_LOG_LINES ? last - SL_LOG_LINES : 0;
  for (size_t i = first; i < last; i++) each(user, ring[i % SL_LOG_LINES]);
  pthread_mutex_unlock(&log_mu);
  return last - first;
}
