/* core_echo.c: a round trip through splitlearn-comm's C core with no Python.
 *
 * The server is an sl_server (a forked child, max_workers 4) whose compute hook,
 * written in C, returns its input tensor (it takes the received storage and hands
 * it back as the result: no copy in the hook). The client is an sl_client calling
 * sl_client_compute with one float32 tensor in the single form and no retries.
 * So a round trip is what the core costs (framing, one copy per received tensor,
 * the worker threads) above the bare C-core echo (echo_floor.c), and below
 * everything the Python layers add: the first step of the breakdown in
 * benchmarks/results.md.
 *
 *   build/bench/core_echo [--sizes 3072,1048576] [--n 2000,300] [--cold 268435456]
 *
 * Output: JSON lines (floor_common.h), bench "core_echo".
 *
 * Either side alone, for bench_breakdown.py's split of the Python layers:
 *   CORE_ECHO_SERVE_ONLY=1 core_echo   starts the server, prints "PORT p PID pid" and
 *                                      serves until its stdin closes
 *   CORE_ECHO_PORT=p core_echo ...     the client calls the server on 127.0.0.1:p
 *                                      (any splitlearn-comm server) instead of its own
 */
#include "client.h"
#include "server.h"

#include "floor_common.h"

/* Integer gRPC channel arguments for both sides from CORE_ECHO_ARGS
 * ("grpc.http2.bdp_probe=0,grpc.http2.lookahead_bytes=8388608"): for trying
 * transport settings without rebuilding. */
static sl_chan_arg env_args[16];
static size_t n_env_args;
static char env_buf[1024];

static void parse_env_args(void) {
  const char *e = getenv("CORE_ECHO_ARGS");
  char *save = NULL, *tok;
  if (e == NULL) return;
  snprintf(env_buf, sizeof(env_buf), "%s", e);
  for (tok = strtok_r(env_buf, ",", &save); tok != NULL && n_env_args < 16;
       tok = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(tok, '=');
    if (eq == NULL) continue;
    *eq = '\0';
    env_args[n_env_args].key = tok;
    env_args[n_env_args].ival = atoi(eq + 1);
    n_env_args++;
  }
}

/* Called on a worker thread: the result is the request's tensor itself. */
static int identity_hook(void *user, const sl_call_info *call, sl_compute_args *a, sl_err *err) {
  sl_tensor_item *in;
  (void)user;
  (void)call;
  if (a->tensor->n_items != 1) {
    return sl_err_set(err, SL_EINVAL, SL_STATUS_INVALID_ARGUMENT, "one tensor expected");
  }
  in = &a->tensor->items[0];
  memset(&a->out, 0, sizeof(a->out));
  a->out.items = calloc(1, sizeof(*a->out.items));
  if (a->out.items == NULL) return sl_err_set(err, SL_ENOMEM, SL_STATUS_RESOURCE_EXHAUSTED, "oom");
  a->out.n = 1;
  a->out.form = SL_FORM_SINGLE;
  a->out_free = free;
  a->out_owner = a->out.items;
  a->out.items[0].desc = in->desc;
  a->out.items[0].nbytes = in->nbytes;
  {
    void *data;
    sl_tensor_item_take(in, &data, &a->out.items[0].release, &a->out.items[0].owner);
    a->out.items[0].data = data;
  }
  a->compute_time_ms = 0.0f;
  return SL_OK;
}

static void serve(int port_fd) {
  sl_server_config cfg;
  sl_server_hooks hooks;
  sl_server *s = NULL;
  sl_err err;
  int port;
  memset(&cfg, 0, sizeof(cfg));
  memset(&hooks, 0, sizeof(hooks));
  cfg.host = "127.0.0.1";
  cfg.max_workers = getenv("CORE_ECHO_WORKERS") ? atoi(getenv("CORE_ECHO_WORKERS")) : 4; /* for experiments */
  cfg.version = "core_echo";
  cfg.args = env_args;
  cfg.nargs = n_env_args;
  hooks.compute = identity_hook;
  if (sl_server_create(&cfg, &hooks, NULL, &s, &err) != SL_OK || sl_server_start(s, &err) != SL_OK) {
    fprintf(stderr, "core_echo server: %s\n", err.msg);
    _exit(4);
  }
  port = sl_server_port(s);
  if (write(port_fd, &port, sizeof(port)) != sizeof(port)) _exit(5);
  close(port_fd);
  sl_server_wait(s, -1);
  _exit(0);
}

static void no_release(void *owner) { (void)owner; }

/* One round trip of a float32 tensor of `len` bytes at `buf`: 0, or 1 with a message. */
static int roundtrip(sl_client *c, void *buf, size_t len) {
  sl_call_opts o;
  sl_tensor_out t;
  sl_tensor_msg out;
  sl_compute_extra extra;
  sl_call_status st;
  sl_call_fields fields;
  sl_err err;
  sl_tensor_set set;
  int rc;
  memset(&o, 0, sizeof(o));
  memset(&t, 0, sizeof(t));
  memset(&st, 0, sizeof(st));
  memset(&fields, 0, sizeof(fields));
  memset(&set, 0, sizeof(set));
  fields.training_mode = -1;
  t.desc.dtype = SL_DTYPE_FLOAT32;
  t.desc.ndim = 1;
  t.desc.shape[0] = (int64_t)(len / 4);
  t.data = buf;
  t.nbytes = len / 4 * 4;
  t.release = no_release;
  set.items = &t;
  set.n = 1;
  set.form = SL_FORM_SINGLE;
  rc = sl_client_compute(c, &o, 0, &set, &fields, &out, &extra, &st, &err);
  if (rc != SL_OK) {
    fprintf(stderr, "core_echo: call failed (%d, status %d %s)\n", rc, st.code,
            st.details ? st.details : err.msg);
    sl_call_status_clear(&st);
    return 1;
  }
  rc = out.n_items == 1 && out.items[0].nbytes == len / 4 * 4 ? 0 : 1;
  if (rc) fprintf(stderr, "core_echo: the reply is not the request\n");
  sl_tensor_msg_clear(&out);
  sl_call_status_clear(&st);
  return rc;
}

static sl_client *connect_to(int port) {
  char target[64];
  sl_client *c = NULL;
  sl_err err;
  snprintf(target, sizeof(target), "127.0.0.1:%d", port);
  if (sl_client_create(target, env_args, n_env_args, NULL, &c, &err) != SL_OK ||
      sl_client_connect(c, 30.0, NULL, NULL) != SL_OK) {
    fprintf(stderr, "core_echo: could not connect to %s\n", target);
    exit(1);
  }
  return c;
}

int main(int argc, char **argv) {
  floor_opts o;
  floor_child steady = {0}, cold = {0};
  size_t biggest = 0;
  void *buf = NULL;
  floor_malloc_like_library();
  floor_parse(argc, argv, &o);
  parse_env_args();
  for (int k = 0; k < o.nsizes; k++) biggest = o.sizes[k] > biggest ? o.sizes[k] : biggest;
  biggest = o.cold > biggest ? o.cold : biggest;
  if (getenv("CORE_ECHO_SERVE_ONLY")) {
    char b[16];
    if (floor_spawn(&steady) != 0) return 1;
    printf("PORT %d PID %d\n", steady.port, (int)steady.pid);
    fflush(stdout);
    while (fread(b, 1, sizeof(b), stdin) > 0) {
    }
    floor_stop(&steady);
    return 0;
  }
  if (getenv("CORE_ECHO_PORT")) steady.port = atoi(getenv("CORE_ECHO_PORT"));
  else if (o.nsizes > 0 && floor_spawn(&steady) != 0) return 1;
  if (o.cold > 0 && floor_spawn(&cold) != 0) return 1;
  if (sl_storage_alloc(biggest, &buf) != SL_OK) return 1;
  floor_fill(buf, biggest);
  if (o.cold > 0) {
    sl_client *c = connect_to(cold.port);
    double *t = calloc((size_t)o.cold_calls, sizeof(double));
    for (int i = 0; i < o.cold_calls; i++) {
      double t0 = floor_now();
      if (roundtrip(c, buf, o.cold)) return 1;
      t[i] = floor_now() - t0;
    }
    floor_report_cold("core_echo", o.cold, t, o.cold_calls);
    free(t);
    sl_client_destroy(c);
    floor_stop(&cold);
  }
  if (o.nsizes > 0) {
    sl_client *c = connect_to(steady.port);
    for (int k = 0; k < o.nsizes; k++) {
      int n = o.n[k], warm = o.warm >= 0 ? o.warm : (n / 10 > 3 ? n / 10 : 3);
      double *lat = calloc((size_t)n, sizeof(double));
      for (int i = 0; i < warm; i++) {
        if (roundtrip(c, buf, o.sizes[k])) return 1;
      }
      double cpu0 = floor_cpu();
      for (int i = 0; i < n; i++) {
        double t0 = floor_now();
        int bad = roundtrip(c, buf, o.sizes[k]);
        lat[i] = floor_now() - t0;
        if (bad) return 1;
      }
      floor_report("core_echo", o.sizes[k], lat, n, floor_cpu() - cpu0);
      free(lat);
    }
    sl_client_destroy(c);
    if (!getenv("CORE_ECHO_PORT")) floor_stop(&steady);
  }
  sl_storage_free(buf);
  return 0;
}
