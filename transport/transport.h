// The expert data plane: request -> reply exchanges between attention nodes (clients) and expert
// shards (servers), shaped like NIXL: prepare a buffer, post it, then poll or wait for completion.
// Implementations: inproc (same process) and ucx (UCP active messages over RDMA, TCP or shm).
// Transports move bytes; they never look inside messages (transport/wire.h does).
#ifndef DMOE_TRANSPORT_TRANSPORT_H_
#define DMOE_TRANSPORT_TRANSPORT_H_

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::transport {

using Clock = std::chrono::steady_clock;

// The largest message a transport takes in: a wire message's largest payload (2 GiB,
// wire::kMaxPayloadBytes) and its header, with room to spare. A peer announcing more is not read
// and nothing is allocated for it (the server counts a peer error; the client drops the reply):
// an unbounded length made the receive allocate it, and a failed allocation inside UCX's callback
// ends the process.
inline constexpr size_t kMaxMessageBytes = (size_t{1} << 31) + (size_t{1} << 16);

// Client side. Thread-safe: any thread may Connect, Post and Wait.
class ClientTransport {
 public:
  virtual ~ClientTransport() = default;
  // Connects to a server address; returns the peer index used by Post.
  virtual absl::StatusOr<int> Connect(const std::string& address) = 0;
  // Ends `peer`: its requests in flight end UNAVAILABLE, later Posts to it fail UNAVAILABLE, and
  // its connection is closed (its pending sends with it). For a peer replaced by a new Connect to
  // the same server: a server that hangs keeps the old connection's requests (and their slots)
  // otherwise. Unknown or already failed peers: nothing happens.
  virtual void Disconnect(int peer) = 0;
  // Hands `request` (moved; its storage returns to the transport's pool) to `peer`. Returns the id
  // that Poll/Wait complete. UNAVAILABLE when the peer is known to have failed.
  virtual absl::StatusOr<uint64_t> Post(int peer, std::vector<uint8_t> request) = 0;
  // True once `id` has completed (reply, failure or abandonment); Wait then returns at once.
  virtual bool Poll(uint64_t id) = 0;
  // Blocks until the reply of `id` arrives (OK, `*reply` holds it), the peer fails (UNAVAILABLE),
  // or `deadline` passes (DEADLINE_EXCEEDED: the request is abandoned; a late reply is dropped).
  // Each id is waited for once.
  virtual absl::Status Wait(uint64_t id, Clock::time_point deadline,
                            std::vector<uint8_t>* reply) = 0;
  // Blocks until one of ids[0..n) has completed (Poll would say true) or `until` passes; returns
  // the index of a completed one, or -1. Abandons nothing: each id still gets its one Wait.
  // This version polls with sleeps growing to 200 us; transports with a completion signal
  // override it.
  virtual int WaitAny(const uint64_t* ids, size_t n, Clock::time_point until) {
    std::chrono::microseconds nap(10);
    for (;;) {
      for (size_t i = 0; i < n; ++i) {
        if (Poll(ids[i])) return static_cast<int>(i);
      }
      const Clock::time_point now = Clock::now();
      if (now >= until) return -1;
      std::this_thread::sleep_for(std::min<Clock::duration>(nap, until - now));
      nap = std::min(nap * 2, std::chrono::microseconds(200));
    }
  }
  // A buffer from the pool for building a request: its size and contents are left over from an
  // earlier message (wire encoders resize it; do not append to it).
  virtual std::vector<uint8_t> AcquireBuffer() = 0;
  // Returns a reply buffer to the pool.
  virtual void ReleaseBuffer(std::vector<uint8_t> buffer) = 0;
};

struct ServerRequest {
  uint64_t token = 0;  // pass to Reply
  std::vector<uint8_t> bytes;
};

struct ServerStats {
  uint64_t requests = 0;
  uint64_t replies = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t dropped_replies = 0;  // the client had gone
  uint64_t peer_errors = 0;
  // With a cluster token: client endpoints whose hello did not carry it, and the requests that
  // came on endpoints that had not presented it (dropped unanswered).
  uint64_t refused_peers = 0;
  uint64_t refused_requests = 0;
};

// Server side. Receive is for one consumer thread; Reply is thread-safe.
class ServerTransport {
 public:
  virtual ~ServerTransport() = default;
  // Starts serving; returns the address clients connect to.
  virtual absl::StatusOr<std::string> Listen(const std::string& address) = 0;
  // Waits up to `timeout` for requests and moves every one that has arrived into `*out`.
  virtual void Receive(std::chrono::milliseconds timeout, std::vector<ServerRequest>* out) = 0;
  // Sends the reply of one request (exactly once per request). Dropped if the client has gone.
  virtual void Reply(uint64_t token, std::vector<uint8_t> reply) = 0;
  virtual std::vector<uint8_t> AcquireBuffer() = 0;
  virtual void ReleaseBuffer(std::vector<uint8_t> buffer) = 0;
  virtual ServerStats stats() const = 0;
  // Stops serving; pending requests are dropped and clients see their peer fail.
  virtual void Shutdown() = 0;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_TRANSPORT_H_
