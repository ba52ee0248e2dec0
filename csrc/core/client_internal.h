/* client_internal.h: internal to the C core (client.c and async_client.c); not a
 * public header. */
#ifndef SL_CLIENT_INTERNAL_H
#define SL_CLIENT_INTERNAL_H

#include <grpc/grpc.h>

#include "client.h"

/* The client's channel (borrowed: valid until sl_client_destroy). */
grpc_channel *sl__client_channel(sl_client *c);

#endif /* SL_CLIENT_INTERNAL_H */
