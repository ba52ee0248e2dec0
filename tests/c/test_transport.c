/* End-to-end tests of the C core alone: an sl_server with a C compute hook and
 * an sl_client, over real sockets on 127.0.0.1 (port 0). */
#include <grpc/grpc.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "codec.h"
#include "server.h"
#include "sl_test.h"

/* ---- a compute hook: doubles float32, echoes other dtypes, fails on request ---- */

static atomic_int inside, max_inside;

static int double_hook(void *user, const sl_call_info *call, sl_compute_args *a, sl_err *err) {
  int now;
  (void)user;
  if (call->n_metadata > 0) {
    for (size_t i = 0; i < call->n_metadata; i++) {
      if (strcmp(call->metadata[i].key, "fail") == 0) {
        return sl_err_set(err, SL_EUSER, SL_STATUS_INTERNAL, "ValueError: asked to fail");
      }
      if (strcmp(call->metadata[i].key, "sleep-ms") == 0) {
        struct timespec ts = {0, atoi(call->metadata[i].value) * 1000000L};
        now = atomic_fetch_add(&inside, 1) + 1;
        int prev = atomic_load(&max_inside);
        while (now > prev && !atomic_compare_exchange_weak(&max_inside, &prev, now)) {
        }
        nanosleep(&ts, NULL);
        atomic_fetch_sub(&inside, 1);
      }
    }
  }
  if (a->tensor->items[0].desc.dtype == SL_DTYPE_FLOAT32) {
    float *f = a->tensor->items[0].data;
    for (size_t i = 0; i < a->tensor->items[0].nbytes / 4; i++) f[i] *= 2.0f;
  }
  memset(&a->out, 0, sizeof(a->out));
  a->out.items = calloc(1, sizeof(*a->out.items));
  if (a->out.items == NULL) return SL_ENOMEM;
  a->out.n = 1;
  a->out_free = free;
  a->out_owner = a->out.items;
  a->out.items[0].desc = a->tensor->items[0].desc;
  a->out.items[0].nbytes = a->tensor->items[0].nbytes;
  {
    void *data; /* taken: the bytes may be lent by a shared-memory segment */
    sl_tensor_item_take(&a->tensor->items[0], &data, &a->out.items[0].release,
                        &a->out.items[0].owner);
    a->out.items[0].data = data;
  }
  a->compute_time_ms = 1.5f;
  return SL_OK;
}

static int info_hook(void *user, sl_service_info *out, sl_err *err) {
  (void)user;
  (void)err;
  out->service_name = sl_strndup("test", 4);
  out->device = sl_strndup("cpu", 3);
  out->custom = calloc(1, sizeof(*out->custom));
  out->custom[0].key = sl_strndup("k", 1);
  out->custom[0].value = sl_strndup("v", 1);
  out->n_custom = 1;
  return SL_OK;
}

static sl_server *start_server(int workers) {
  sl_server_config cfg = {0};
  cfg.host = "127.0.0.1";
  cfg.max_workers = workers;
  cfg.version = "9.9.9";
  sl_server_hooks hooks = {NULL, NULL, double_hook, info_hook};
  sl_server *s = NULL;
  sl_err err;
  CHECK_EQ_INT(sl_server_create(&cfg, &hooks, NULL, &s, &err), SL_OK);
  CHECK_EQ_INT(sl_server_start(s, &err), SL_OK);
  CHECK(sl_server_port(s) > 0);
  return s;
}

static sl_client *connect_to(sl_server *s) {
  char target[64];
  sl_client *c = NULL;
  sl_err err;
  snprintf(target, sizeof(target), "127.0.0.1:%d", sl_server_port(s));
  CHECK_EQ_INT(sl_client_create(target, NULL, 0, NULL, &c, &err), SL_OK);
  CHECK_EQ_INT(sl_client_connect(c, 10.0, NULL, NULL), SL_OK);
  return c;
}

static int input_released;
static void release_input(void *owner) {
  (void)owner;
  input_released++;
}

/* Send n floats 0..n-1 with metadata; returns the status code. */
static int roundtrip_with(sl_client *c, const sl_codec *codec, size_t n, const sl_kv *md,
                          size_t nmd, float **result, sl_call_status *st) {
  float *in = malloc(n * sizeof(float) + 1);
  sl_tensor_desc d = {SL_DTYPE_FLOAT32, 1, {(int64_t)n}};
  sl_call_opts o = {10.0, md, nmd, 0, NULL, NULL, NULL};
  sl_tensor_msg out;
  sl_compute_extra eout;
  sl_call_fields fields = {0};
  sl_tensor_out t = {0};
  sl_err err;
  int rc;
  for (size_t i = 0; i < n; i++) in[i] = (float)i;
  memset(st, 0, sizeof(*st));
  t.desc = d;
  t.data = in;
  t.nbytes = n * sizeof(float);
  t.release = release_input;
  t.codec = codec;
  fields.training_mode = -1;
  fields.has_request_id = 1;
  fields.request_id = 5;
  {
    sl_tensor_set set = {&t, 1, SL_FORM_SINGLE, NULL, 0, 0};
    rc = sl_client_compute(c, &o, 0, &set, &fields, &out, &eout, st, &err);
  }
  *result = NULL;
  if (rc == SL_OK) {
    CHECK_EQ_INT(out.items[0].nbytes, n * sizeof(float));
    CHECK_EQ_INT(eout.has_request_id, 1);
    CHECK_EQ_INT(eout.request_id, 5);
    CHECK(eout.has_compute_time_ms && eout.compute_time_ms == 1.5f);
    *result = malloc(out.items[0].nbytes + 1);
    memcpy(*result, out.items[0].data, out.items[0].nbytes);
    sl_tensor_msg_clear(&out);
  }
  free(in);
  return rc == SL_OK ? SL_STATUS_OK : st->code;
}

static int roundtrip(sl_client *c, size_t n, const sl_kv *md, size_t nmd, float **result,
                     sl_call_status *st) {
  return roundtrip_with(c, NULL, n, md, nmd, result, st);
}

static void test_roundtrip_sizes(void) {
  sl_server *s = start_server(2);
  sl_client *c = connect_to(s);
  size_t sizes[] = {0, 1, 1000, 1 << 20, 3 << 20};
  input_released = 0;
  for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
    float *r;
    sl_call_status st;
    CHECK_EQ_INT(roundtrip(c, sizes[k], NULL, 0, &r, &st), SL_STATUS_OK);
    for (size_t i = 0; r && i < sizes[k]; i++) {
      if (r[i] != 2.0f * (float)i) {
        CHECK(r[i] == 2.0f * (float)i);
        break;
      }
    }
    free(r);
    sl_call_status_clear(&st);
  }
  sl_client_destroy(c);
  sl_server_destroy(s);
  CHECK_EQ_INT(input_released, 5); /* every input given back exactly once */
}

static void test_builtin_codecs_end_to_end(void) {
  /* the client encodes in C, the server decodes in C, answers with the same codec */
  static const sl_codec_spec specs[] = {
      {.kind = SL_CODEC_KIND_FLOAT16},
      {.kind = SL_CODEC_KIND_BFLOAT16},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZSTD, .level = 3},
      {.kind = SL_CODEC_KIND_COMPRESSED, .algorithm = SL_COMPRESS_ZLIB, .level = 6},
      {.kind = SL_CODEC_KIND_SPARSE_COO},
  };
  sl_server *s = start_server(2);
  sl_client *c = connect_to(s);
  for (size_t k = 0; k < sizeof(specs) / sizeof(specs[0]); k++) {
    sl_codec *codec = NULL;
    sl_err err;
    float *r = NULL;
    sl_call_status st;
    CHECK_EQ_INT(sl_codec_create(&specs[k], &codec, &err), SL_OK);
    CHECK_EQ_INT(roundtrip_with(c, codec, 4096, NULL, 0, &r, &st), SL_STATUS_OK);
    /* small integers are exact in every one of these codecs */
    for (size_t i = 0; r && i < 256; i++) CHECK(r[i] == 2.0f * (float)i);
    free(r);
    sl_call_status_clear(&st);
    sl_codec_destroy(codec);
  }
  sl_client_destroy(c);
  sl_server_destroy(s);
}

static void test_hook_error_keeps_serving(void) {
  sl_server *s = start_server(1);
  sl_client *c = connect_to(s);
  sl_kv fail = {"fail", "1", 1};
  float *r;
  sl_call_status st;
  CHECK_EQ_INT(roundtrip(c, 4, &fail, 1, &r, &st), SL_STATUS_INTERNAL);
  CHECK(st.details != NULL);
  if (st.details) CHECK_CONTAINS(st.details, "ValueError: asked to fail");
  sl_call_status_clear(&st);
  CHECK_EQ_INT(roundtrip(c, 4, NULL, 0, &r, &st), SL_STATUS_OK);
  free(r);
  sl_call_status_clear(&st);
  sl_client_destroy(c);
  sl_server_destroy(s);
}

static void test_health_and_info(void) {
  sl_server *s = start_server(1);
  sl_client *c = connect_to(s);
  sl_call_opts o = {5.0, NULL, 0, 0, NULL, NULL, NULL};
  sl_health h;
  sl_info_result info;
  sl_call_status st = {0};
  sl_err err;
  int serving = 0;
  CHECK_EQ_INT(sl_client_health(c, &o, &h, &st, &err), SL_OK);
  CHECK(strcmp(h.status, "ok") == 0 && strcmp(h.version, "9.9.9") == 0);
  sl_health_clear(&h);
  sl_call_status_clear(&st);
  CHECK_EQ_INT(sl_client_service_info(c, &o, &info, &st, &err), SL_OK);
  CHECK(strcmp(info.service_name, "test") == 0);
  CHECK_EQ_INT(info.n_custom, 1);
  sl_info_result_clear(&info);
  sl_call_status_clear(&st);
  CHECK_EQ_INT(sl_client_std_health(c, &o, "", &serving, &st, &err), SL_OK);
  CHECK_EQ_INT(serving, 1);
  sl_call_status_clear(&st);
  CHECK_EQ_INT(sl_client_std_health(c, &o, "no.such.Service", &serving, &st, &err), SL_ESTATUS);
  CHECK_EQ_INT(st.code, SL_STATUS_NOT_FOUND);
  sl_call_status_clear(&st);
  sl_client_destroy(c);
  sl_server_destroy(s);
}

typedef struct par_arg {
  sl_client *c;
  int code;
} par_arg;

static void *par_call(void *p) {
  par_arg *a = p;
  sl_kv sleep_md = {"sleep-ms", "300", 3};
  float *r;
  sl_call_status st;
  a->code = roundtrip(a->c, 16, &sleep_md, 1, &r, &st);
  free(r);
  sl_call_status_clear(&st);
  return NULL;
}

static void test_workers_run_concurrently(void) {
  sl_server *s = start_server(4);
  sl_client *c = connect_to(s);
  pthread_t th[6];
  par_arg args[6];
  atomic_store(&max_inside, 0);
  for (int i = 0; i < 6; i++) {
    args[i].c = c;
    pthread_create(&th[i], NULL, par_call, &args[i]);
  }
  for (int i = 0; i < 6; i++) {
    pthread_join(th[i], NULL);
    CHECK_EQ_INT(args[i].code, SL_STATUS_OK);
  }
  CHECK_EQ_INT(atomic_load(&max_inside), 4); /* exactly max_workers at once */
  sl_client_destroy(c);
  sl_server_destroy(s);
}

/* Streamed requests from several threads at once, with small calls among them:
 * while a worker moves a stream the idle workers wait outside gRPC and the calls
 * that arrive meanwhile are handed to them (server.c, "Moving a stream alone");
 * every call completes, and stopping the server leaves nothing behind (leak
 * detection is on for the C tests). */
typedef struct mix_arg {
  sl_client *c;
  size_t n;  /* floats per call */
  int calls;
  int failed;
} mix_arg;

static void *mix_calls(void *p) {
  mix_arg *a = p;
  for (int k = 0; k < a->calls; k++) {
    float *r = NULL;
    sl_call_status st;
    if (roundtrip(a->c, a->n, NULL, 0, &r, &st) != SL_STATUS_OK ||
        (a->n > 0 && r[a->n - 1] != 2.0f * (float)(a->n - 1))) {
      a->failed++;
    }
    free(r);
    sl_call_status_clear(&st);
  }
  return NULL;
}

static void test_streams_and_small_calls_together(void) {
  for (int workers = 2; workers <= 4; workers += 2) {
    sl_server *s = start_server(workers);
    sl_client *c = connect_to(s);
    pthread_t th[4];
    mix_arg args[4] = {{c, (size_t)3 << 20, 4, 0}, {c, (size_t)3 << 20, 4, 0},
                       {c, 16, 200, 0}, {c, 1000, 200, 0}};
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, mix_calls, &args[i]);
    for (int i = 0; i < 4; i++) {
      pthread_join(th[i], NULL);
      CHECK_EQ_INT(args[i].failed, 0);
    }
    sl_client_destroy(c);
    sl_server_destroy(s);
  }
}

/* Stopping a server while streams move and small calls arrive: the workers that
 * wait in gRPC, parked or handed a call, all end (a hang here is what the watchdog
 * in main catches), and nothing is left behind. */
typedef struct stop_arg {
  sl_client *c;
  size_t n;
  atomic_int *stop;
} stop_arg;

static void *calls_until_stopped(void *p) {
  stop_arg *a = p;
  while (!atomic_load(a->stop)) {
    float *r = NULL;
    sl_call_status st;
    (void)roundtrip(a->c, a->n, NULL, 0, &r, &st); /* fails once the server stops */
    free(r);
    sl_call_status_clear(&st);
  }
  return NULL;
}

static void test_stop_while_streams_move(void) {
  for (int round = 0; round < 12; round++) {
    sl_server *s = start_server(10);
    sl_client *c = connect_to(s);
    atomic_int stop;
    pthread_t th[5];
    stop_arg args[5] = {{c, (size_t)2 << 20, &stop}, {c, (size_t)2 << 20, &stop},
                        {c, (size_t)2 << 20, &stop}, {c, 16, &stop}, {c, 16, &stop}};
    struct timespec ts = {0, (long)(20 + 10 * (round % 5)) * 1000000L};
    atomic_init(&stop, 0);
    for (int i = 0; i < 5; i++) pthread_create(&th[i], NULL, calls_until_stopped, &args[i]);
    nanosleep(&ts, NULL); /* calls in flight, some of them streams */
    sl_server_stop(s, 0);
    atomic_store(&stop, 1);
    for (int i = 0; i < 5; i++) pthread_join(th[i], NULL);
    sl_client_destroy(c);
    sl_server_destroy(s);
  }
  /* and right after a streamed call, while its worker may still be finishing the
   * reply with the others parked */
  for (int round = 0; round < 40; round++) {
    sl_server *s = start_server(10);
    sl_client *c = connect_to(s);
    float *r = NULL;
    sl_call_status st;
    CHECK_EQ_INT(roundtrip(c, (size_t)2 << 20, NULL, 0, &r, &st), SL_STATUS_OK);
    free(r);
    sl_call_status_clear(&st);
    sl_server_stop(s, 0);
    sl_client_destroy(c);
    sl_server_destroy(s);
  }
}

static void test_unavailable_fails_fast(void) {
  sl_client *c = NULL;
  sl_err err;
  float *r;
  sl_call_status st;
  double t0 = sl_now();
  /* port 1 on loopback: nothing listens there */
  CHECK_EQ_INT(sl_client_create("127.0.0.1:1", NULL, 0, NULL, &c, &err), SL_OK);
  CHECK_EQ_INT(roundtrip(c, 4, NULL, 0, &r, &st), SL_STATUS_UNAVAILABLE);
  CHECK(sl_now() - t0 < 5.0);
  sl_call_status_clear(&st);
  sl_client_destroy(c);
}

static void test_busy_port_is_an_error(void) {
  sl_server *s = start_server(1);
  sl_server_config cfg = {0};
  cfg.host = "127.0.0.1";
  cfg.port = sl_server_port(s);
  cfg.max_workers = 1;
  cfg.version = "";
  sl_server_hooks hooks = {NULL, NULL, double_hook, NULL};
  sl_server *t = NULL;
  sl_err err;
  CHECK_EQ_INT(sl_server_create(&cfg, &hooks, NULL, &t, &err), SL_OK);
  CHECK_EQ_INT(sl_server_start(t, &err), SL_EINVAL);
  CHECK_CONTAINS(err.msg, "could not bind");
  sl_server_destroy(t);
  sl_server_destroy(s);
}

static void test_stop_twice_and_wait(void) {
  sl_server *s = start_server(2);
  CHECK_EQ_INT(sl_server_wait(s, 0.05), SL_ETIMEDOUT);
  sl_server_stop(s, 1.0);
  sl_server_stop(s, 1.0);
  CHECK_EQ_INT(sl_server_wait(s, 0), SL_OK);
  CHECK_EQ_INT(sl_server_is_serving(s), 0);
  sl_server_destroy(s);
}

/* ---- grpc.health.v1.Health/Watch, over a raw gRPC call ----------------------- */

typedef struct watch_call {
  grpc_completion_queue *cq;
  grpc_call *call;
  grpc_metadata_array initial, trailing;
  grpc_status_code code;
  grpc_slice details;
} watch_call;

static int watch_wait(watch_call *w, void *tag) {
  grpc_event ev = grpc_completion_queue_next(w->cq, gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                                                                gpr_time_from_seconds(10, GPR_TIMESPAN)),
                                             NULL);
  return ev.type == GRPC_OP_COMPLETE && ev.tag == tag && ev.success;
}

/* Open a Watch stream for `service` (request bytes: field 1 = service). */
static void watch_open(grpc_channel *ch, const char *service, watch_call *w) {
  grpc_op ops[4];
  char req[64];
  size_t n = strlen(service), len = 0;
  grpc_slice s;
  grpc_byte_buffer *bb;
  int tag;
  memset(w, 0, sizeof(*w));
  w->cq = grpc_completion_queue_create_for_next(NULL);
  w->call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, w->cq,
                                     grpc_slice_from_static_string("/grpc.health.v1.Health/Watch"),
                                     NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  if (n > 0) {
    req[0] = 0x0a;
    req[1] = (char)n;
    memcpy(req + 2, service, n);
    len = n + 2;
  }
  s = grpc_slice_from_copied_buffer(req, len);
  bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  grpc_metadata_array_init(&w->initial);
  grpc_metadata_array_init(&w->trailing);
  memset(ops, 0, sizeof(ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = bb;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &w->initial;
  CHECK_EQ_INT(grpc_call_start_batch(w->call, ops, 4, &tag, NULL), GRPC_CALL_OK);
  CHECK(watch_wait(w, &tag));
  grpc_byte_buffer_destroy(bb);
}

/* The next status on the stream (1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN), or
 * -1 when the stream ended. */
static int watch_next(watch_call *w) {
  grpc_byte_buffer *bb = NULL;
  grpc_byte_buffer_reader r;
  grpc_slice all;
  grpc_op op;
  int tag, status = -1;
  memset(&op, 0, sizeof(op));
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &bb;
  CHECK_EQ_INT(grpc_call_start_batch(w->call, &op, 1, &tag, NULL), GRPC_CALL_OK);
  CHECK(watch_wait(w, &tag));
  if (bb == NULL) return -1;
  CHECK(grpc_byte_buffer_reader_init(&r, bb));
  all = grpc_byte_buffer_reader_readall(&r);
  if (GRPC_SLICE_LENGTH(all) == 2 && GRPC_SLICE_START_PTR(all)[0] == 0x08) {
    status = GRPC_SLICE_START_PTR(all)[1];
  }
  grpc_slice_unref(all);
  grpc_byte_buffer_reader_destroy(&r);
  grpc_byte_buffer_destroy(bb);
  return status;
}

/* End the call: read its status (cancelling it first when `cancel`). */
static grpc_status_code watch_close(watch_call *w, int cancel) {
  grpc_op op;
  int tag;
  const char *error_string = NULL;
  if (cancel) grpc_call_cancel(w->call, NULL);
  memset(&op, 0, sizeof(op));
  op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op.data.recv_status_on_client.trailing_metadata = &w->trailing;
  op.data.recv_status_on_client.status = &w->code;
  op.data.recv_status_on_client.status_details = &w->details;
  op.data.recv_status_on_client.error_string = &error_string;
  CHECK_EQ_INT(grpc_call_start_batch(w->call, &op, 1, &tag, NULL), GRPC_CALL_OK);
  CHECK(watch_wait(w, &tag));
  if (error_string != NULL) gpr_free((void *)error_string);
  grpc_slice_unref(w->details);
  grpc_metadata_array_destroy(&w->initial);
  grpc_metadata_array_destroy(&w->trailing);
  grpc_call_unref(w->call);
  grpc_completion_queue_shutdown(w->cq);
  while (grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(w->cq);
  return w->code;
}

static void test_health_watch(void) {
  sl_server *s = start_server(1);
  sl_client *c = connect_to(s);
  sl_call_opts o = {5.0, NULL, 0, 0, NULL, NULL, NULL};
  sl_call_status st = {0};
  sl_err err;
  char target[64];
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *ch;
  watch_call whole, live, unknown, gone;
  int serving = 0;

  snprintf(target, sizeof(target), "127.0.0.1:%d", sl_server_port(s));
  ch = grpc_channel_create(target, creds, NULL);
  grpc_channel_credentials_release(creds);
  watch_open(ch, "", &whole);
  watch_open(ch, "liveness", &live);
  watch_open(ch, "no.such.Service", &unknown);
  watch_open(ch, "", &gone);
  CHECK_EQ_INT(watch_next(&whole), 1);
  CHECK_EQ_INT(watch_next(&live), 1);
  CHECK_EQ_INT(watch_next(&unknown), 3);
  CHECK_EQ_INT(watch_next(&gone), 1);
  CHECK_EQ_INT(sl_server_health_watchers(s), 4);
  CHECK_EQ_INT(watch_close(&gone, 1), GRPC_STATUS_CANCELLED); /* the server frees it */

  CHECK_EQ_INT(sl_server_set_health(s, 0), SL_OK);
  CHECK_EQ_INT(sl_server_health(s), 0);
  CHECK_EQ_INT(watch_next(&whole), 2);
  CHECK_EQ_INT(sl_client_std_health(c, &o, "", &serving, &st, &err), SL_OK);
  CHECK_EQ_INT(serving, 2);
  sl_call_status_clear(&st);
  CHECK_EQ_INT(sl_client_std_health(c, &o, "liveness", &serving, &st, &err), SL_OK);
  CHECK_EQ_INT(serving, 1);
  sl_call_status_clear(&st);
  CHECK_EQ_INT(sl_server_set_health(s, 1), SL_OK);
  CHECK_EQ_INT(watch_next(&whole), 1);

  sl_server_stop(s, 5.0);
  CHECK_EQ_INT(watch_next(&whole), 2);   /* NOT_SERVING, then the end */
  CHECK_EQ_INT(watch_next(&whole), -1);
  CHECK_EQ_INT(watch_close(&whole, 0), GRPC_STATUS_UNAVAILABLE);
  CHECK_EQ_INT(watch_next(&live), -1);
  CHECK_EQ_INT(watch_close(&live, 0), GRPC_STATUS_UNAVAILABLE);
  CHECK_EQ_INT(watch_next(&unknown), -1);
  CHECK_EQ_INT(watch_close(&unknown, 0), GRPC_STATUS_UNAVAILABLE);
  CHECK_EQ_INT(sl_server_health_watchers(s), 0);
  CHECK_EQ_INT(sl_server_set_health(s, 1), SL_ESTATE);
  grpc_channel_destroy(ch);
  sl_client_destroy(c);
  sl_server_destroy(s);
}

int main(void) {
  alarm(600); /* a hang (a server that cannot stop) fails the test instead */
  grpc_init();
  RUN(test_roundtrip_sizes);
  RUN(test_builtin_codecs_end_to_end);
  RUN(test_hook_error_keeps_serving);
  RUN(test_health_and_info);
  RUN(test_workers_run_concurrently);
  RUN(test_streams_and_small_calls_together);
  RUN(test_stop_while_streams_move);
  RUN(test_unavailable_fails_fast);
  RUN(test_busy_port_is_an_error);
  RUN(test_stop_twice_and_wait);
  RUN(test_health_watch);
  grpc_shutdown_blocking();
  return sl_test_done("test_transport");
}
