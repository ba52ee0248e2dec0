/* runtime.h: process-wide set-up of the gRPC core, and where its log goes.
 *
 * The bindings never call gRPC themselves: they call sl_runtime_init() once when
 * the module loads (it takes one gRPC reference for the life of the process, so
 * that dropping the last server or client never runs gRPC's whole shutdown inside
 * some unrelated call) and read the gRPC log through sl_runtime_log_lines().
 *
 * The log: gRPC's messages go to a ring of the latest SL_LOG_LINES lines kept
 * here (guarded by a mutex; any thread), and also to stderr when `echo` was set.
 * A hook set with sl_runtime_set_log_hook() sees every line as well, on gRPC's
 * thread, without any lock of the caller's held.
 *
 * Nothing here allocates on the log path; nothing takes ownership of anything.
 */
#ifndef SL_RUNTIME_H
#define SL_RUNTIME_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SL_LOG_LINES 64
#define SL_LOG_LINE_MAX 256

/* Initialise gRPC (once per process; later calls do nothing) and route its log
 * here. `echo`: also print every line to stderr. */
void sl_runtime_init(int echo);

/* A hook that sees every log line ("E file.cc:12] message"); NULL: none. */
typedef void (*sl_log_hook)(void *user, const char *line);
void sl_runtime_set_log_hook(sl_log_hook hook, void *user);

/* Call `each(user, line)` for the latest lines, oldest first (at most
 * SL_LOG_LINES), with the log's mutex held: `each` must not log. Returns the
 * number of lines. */
size_t sl_runtime_log_lines(void (*each)(void *user, const char *line), void *user);

#ifdef __cplusplus
}
#endif

#endif /* SL_RUNTIME_H */
