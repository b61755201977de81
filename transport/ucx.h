// The UCX transport (UCP active messages). All UCX calls of one transport object happen on its own
// progress thread, which sleeps on the worker's event fd (UCP_FEATURE_WAKEUP) instead of
// busy-polling; other threads hand work over through a queue and ucp_worker_signal.
//
// Addresses: "ucx-addr:HEX" connects to a worker address; "HOST:PORT" is a plain TCP port where
// the server answers every connection with that "ucx-addr:HEX\n" and closes it (reading nothing:
// UCX's own sockaddr listener aborts the process on malformed input), and the client then connects
// by worker address. Both work with any UCX_TLS (e.g. sm,self). A server's Listen returns
// "HOST:PORT"; WorkerAddress() gives its "ucx-addr:HEX" form.
// Every client endpoint opens with a hello (kAmHello: the client's worker address, with the
// cluster token as its header).
// Peer failure (UCP_ERR_HANDLING_MODE_PEER) fails that peer's in-flight requests at once; a hung
// peer is caught by the caller's deadline.
#ifndef DMOE_TRANSPORT_UCX_H_
#define DMOE_TRANSPORT_UCX_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "transport/transport.h"

namespace dmoe::transport {

// `cluster_token` (common/cluster_token.h) goes with the hello of every endpoint it opens.
absl::StatusOr<std::unique_ptr<ClientTransport>> NewUcxClient(std::string cluster_token = "");

class UcxServer : public ServerTransport {
 public:
  // "ucx-addr:HEX" of the worker, valid after Listen.
  virtual std::string WorkerAddress() const = 0;
};
// With a `cluster_token`, a client endpoint is served only once its hello carried that token;
// requests on any other endpoint are dropped unanswered and counted (ServerStats::refused_*).
absl::StatusOr<std::unique_ptr<UcxServer>> NewUcxServer(std::string cluster_token = "");

// Whether this process's UCX (its build and UCX_TLS) can send from and receive into CUDA device
// memory (ucp_context_query's memory types): Debian's UCX cannot. OK(false) when it cannot;
// UNAVAILABLE when UCX does not initialize.
absl::StatusOr<bool> UcxSupportsCudaMemory();

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_UCX_H_
