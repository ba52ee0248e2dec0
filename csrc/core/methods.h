/* methods.h: the method paths of the service, in one place (the server routes on
 * them, the client calls them, the binding exports them to Python). */
#ifndef SL_METHODS_H
#define SL_METHODS_H

#define SL_SERVICE_PATH "/splitlearn.comm.ComputeService/"
#define SL_METHOD_PATH_COMPUTE SL_SERVICE_PATH "Compute"
#define SL_METHOD_PATH_BACKWARD SL_SERVICE_PATH "ComputeBackward"
#define SL_METHOD_PATH_COMPUTE_STREAM SL_SERVICE_PATH "ComputeStream"
#define SL_METHOD_PATH_BACKWARD_STREAM SL_SERVICE_PATH "ComputeBackwardStream"
#define SL_METHOD_PATH_HEALTH SL_SERVICE_PATH "HealthCheck"
#define SL_METHOD_PATH_INFO SL_SERVICE_PATH "GetServiceInfo"
#define SL_METHOD_PATH_STD_HEALTH "/grpc.health.v1.Health/Check"
#define SL_METHOD_PATH_STD_WATCH "/grpc.health.v1.Health/Watch"
#define SL_SERVICE_NAME "splitlearn.comm.ComputeService"

#endif /* SL_METHODS_H */
