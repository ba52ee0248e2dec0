/* echo_floor.c: the floor of any gRPC design on this machine.
 *
 * A unary echo on the raw gRPC C core with no copies: the server (a forked child,
 * one thread) sends back the very byte buffer it received; the client sends a
 * slice that references its own memory (no copy) and drops the reply. No
 * protobuf, no threads beyond gRPC's own. Whatever a transport built on gRPC does
 * on top of this costs more; benchmarks/bench_roundtrip.py runs this first and
 * prints every other row as a ratio to it.
 *
 *   build/bench/echo_floor [--sizes 3072,1048576] [--n 2000,300] [--cold 268435456]
 *
 * Output: JSON lines (floor_common.h), bench "echo_floor".
 */
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "floor_common.h"

static grpc_channel_args *unlimited_args(void) {
  static grpc_arg a[3];
  static grpc_channel_args args = {3, a};
  a[0].type = GRPC_ARG_INTEGER;
  a[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  a[0].value.integer = -1;
  a[1].type = GRPC_ARG_INTEGER;
  a[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
  a[1].value.integer = -1;
  a[2].type = GRPC_ARG_INTEGER;
  a[2].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
  a[2].value.integer = 0;
  return &args;
}

static void wait_tag(grpc_completion_queue *cq, void *tag) {
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_OP_COMPLETE && ev.tag == tag) return;
    if (ev.type == GRPC_QUEUE_SHUTDOWN) _exit(3);
  }
}

static void serve(int port_fd) {
  grpc_completion_queue *cq;
  grpc_server *server;
  grpc_server_credentials *creds;
  int port;
  grpc_init();
  cq = grpc_completion_queue_create_for_next(NULL);
  server = grpc_server_create(unlimited_args(), NULL);
  grpc_server_register_completion_queue(server, cq, NULL);
  creds = grpc_insecure_server_credentials_create();
  port = grpc_server_add_http2_port(server, "127.0.0.1:0", creds);
  grpc_server_credentials_release(creds);
  if (port <= 0) _exit(4);
  grpc_server_start(server);
  if (write(port_fd, &port, sizeof(port)) != sizeof(port)) _exit(5);
  close(port_fd);
  for (;;) {
    grpc_call *call = NULL;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *bb = NULL;
    grpc_op ops[3];
    int cancelled = 0, t_new, t_recv, t_send;
    grpc_call_details_init(&details);
    grpc_metadata_array_init(&md);
    if (grpc_server_request_call(server, &call, &details, &md, cq, cq, &t_new) != GRPC_CALL_OK)
      _exit(6);
    wait_tag(cq, &t_new);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &bb;
    if (grpc_call_start_batch(call, ops, 2, &t_recv, NULL) != GRPC_CALL_OK) _exit(7);
    wait_tag(cq, &t_recv);
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_MESSAGE;
    ops[0].data.send_message.send_message = bb; /* the received slices, not copied */
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = GRPC_STATUS_OK;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &cancelled;
    if (bb != NULL) { /* NULL: the client went away */
      if (grpc_call_start_batch(call, ops, 3, &t_send, NULL) != GRPC_CALL_OK) _exit(8);
      wait_tag(cq, &t_send);
      grpc_byte_buffer_destroy(bb);
    }
    grpc_call_unref(call);
    grpc_call_details_destroy(&details);
    grpc_metadata_array_destroy(&md);
  }
}

static void no_free(void *p) { (void)p; }

/* One round trip of `len` bytes at `buf`; returns the reply's length, -1 on failure. */
static long echo(grpc_channel *ch, grpc_completion_queue *cq, unsigned char *buf, size_t len) {
  grpc_slice method = grpc_slice_from_static_string("/floor.Echo/Echo");
  grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
                                             gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  grpc_slice s = grpc_slice_new(buf, len, no_free); /* references buf: no copy */
  grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&s, 1), *recv = NULL;
  grpc_metadata_array initial, trailing;
  grpc_status_code code = GRPC_STATUS_UNKNOWN;
  grpc_slice details;
  grpc_op ops[6];
  long got = -1;
  int tag;
  grpc_slice_unref(s);
  grpc_metadata_array_init(&initial);
  grpc_metadata_array_init(&trailing);
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &recv;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
  ops[5].data.recv_status_on_client.status = &code;
  ops[5].data.recv_status_on_client.status_details = &details;
  if (grpc_call_start_batch(call, ops, 6, &tag, NULL) == GRPC_CALL_OK) {
    wait_tag(cq, &tag);
    if (code == GRPC_STATUS_OK && recv != NULL) got = (long)grpc_byte_buffer_length(recv);
    grpc_slice_unref(details);
  }
  if (recv != NULL) grpc_byte_buffer_destroy(recv);
  grpc_byte_buffer_destroy(send);
  grpc_metadata_array_destroy(&initial);
  grpc_metadata_array_destroy(&trailing);
  grpc_call_unref(call);
  return got;
}

static grpc_channel *connect_to(int port, grpc_completion_queue *cq) {
  char target[64];
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *ch;
  double until = floor_now() + 30.0;
  int tag;
  snprintf(target, sizeof(target), "127.0.0.1:%d", port);
  ch = grpc_channel_create(target, creds, unlimited_args());
  grpc_channel_credentials_release(creds);
  for (;;) {
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(ch, 1);
    if (st == GRPC_CHANNEL_READY) return ch;
    if (floor_now() > until) {
      fprintf(stderr, "could not connect to %s\n", target);
      exit(1);
    }
    grpc_channel_watch_connectivity_state(
        ch, st, gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(200, GPR_TIMESPAN)),
        cq, &tag);
    wait_tag(cq, &tag);
  }
}

static void drain_and_destroy(grpc_completion_queue *cq) {
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
}

static int check(long got, size_t want) {
  if (got != (long)want) {
    fprintf(stderr, "echo of %zu bytes came back as %ld\n", want, got);
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  floor_opts o;
  floor_child steady = {0}, cold = {0};
  size_t biggest = 0;
  unsigned char *buf;
  floor_malloc_like_library();
  floor_parse(argc, argv, &o);
  for (int k = 0; k < o.nsizes; k++) biggest = o.sizes[k] > biggest ? o.sizes[k] : biggest;
  biggest = o.cold > biggest ? o.cold : biggest;
  /* the servers first: gRPC must not be initialised in a process that forks */
  if (o.nsizes > 0 && floor_spawn(&steady) != 0) return 1;
  if (o.cold > 0 && floor_spawn(&cold) != 0) return 1;
  buf = malloc(biggest ? biggest : 1);
  if (buf == NULL) return 1;
  floor_fill(buf, biggest);
  grpc_init();
  if (o.cold > 0) {
    /* a new channel to a new server: the first K calls, one after the other */
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    grpc_channel *ch = connect_to(cold.port, cq);
    double *t = calloc((size_t)o.cold_calls, sizeof(double));
    for (int i = 0; i < o.cold_calls; i++) {
      double t0 = floor_now();
      if (check(echo(ch, cq, buf, o.cold), o.cold)) return 1;
      t[i] = floor_now() - t0;
    }
    floor_report_cold("echo_floor", o.cold, t, o.cold_calls);
    free(t);
    grpc_channel_destroy(ch);
    drain_and_destroy(cq);
    floor_stop(&cold);
  }
  if (o.nsizes > 0) {
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    grpc_channel *ch = connect_to(steady.port, cq);
    for (int k = 0; k < o.nsizes; k++) {
      int n = o.n[k], warm = o.warm >= 0 ? o.warm : (n / 10 > 3 ? n / 10 : 3);
      double *lat = calloc((size_t)n, sizeof(double));
      for (int i = 0; i < warm; i++) {
        if (check(echo(ch, cq, buf, o.sizes[k]), o.sizes[k])) return 1;
      }
      double cpu0 = floor_cpu();
      for (int i = 0; i < n; i++) {
        double t0 = floor_now();
        long got = echo(ch, cq, buf, o.sizes[k]);
        lat[i] = floor_now() - t0;
        if (check(got, o.sizes[k])) return 1;
      }
      floor_report("echo_floor", o.sizes[k], lat, n, floor_cpu() - cpu0);
      free(lat);
    }
    grpc_channel_destroy(ch);
    drain_and_destroy(cq);
    floor_stop(&steady);
  }
  free(buf);
  grpc_shutdown();
  return 0;
}
