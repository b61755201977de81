// The in-process transport: servers register under a name ("inproc:NAME"); clients in the same
// process hand requests over through queues. Used by the embedded mode and unit tests.
#ifndef DMOE_TRANSPORT_INPROC_H_
#define DMOE_TRANSPORT_INPROC_H_

#include <memory>

#include "transport/transport.h"

namespace dmoe::transport {

std::unique_ptr<ServerTransport> NewInprocServer();
std::unique_ptr<ClientTransport> NewInprocClient();

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_INPROC_H_
