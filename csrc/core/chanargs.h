/* chanargs.h: gRPC channel arguments as the splitlearn-comm core takes them.
 * The caller owns the strings; the core copies what it keeps. */
#ifndef SL_CHANARGS_H
#define SL_CHANARGS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sl_chan_arg {
  const char *key;
  int is_string;    /* 0: integer value in ival; 1: string value in sval */
  int ival;
  const char *sval;
} sl_chan_arg;

#ifdef __cplusplus
}
#endif

#endif /* SL_CHANARGS_H */
