// The gateway's OpenAI-compatible HTTP/1.1 API (Boost.Beast over Asio): POST /v1/chat/completions
// and /v1/completions (JSON or server-sent events), GET /v1/models, /health and /version, beside
// the gRPC API and over the same Generation, nodes, API keys and limits. One event loop serves
// every connection (no thread per stream); a slow reader throttles its own generation; a client
// that disconnects cancels its request.
#ifndef DMOE_GATEWAY_HTTP_FRONT_H_
#define DMOE_GATEWAY_HTTP_FRONT_H_

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/service.h"
#include "gateway/gateway_service.h"

namespace dmoe::gateway {

struct HttpMetrics {
  // One finished HTTP request: its route ("/v1/completions", ..., "other") and status code.
  std::function<void(const std::string& route, int status)> request;
  std::function<void(int delta)> connections;  // open connections
};

struct HttpFrontOptions {
  std::string listen = "127.0.0.1:0";
  std::string tls_cert_pem, tls_key_pem;  // both set: HTTPS only
  int threads = 1;                        // event-loop threads
  size_t max_body_bytes = 8 << 20;        // larger bodies: 413
  size_t max_connections = 10000;         // more are closed at once
  // A request's headers and body must arrive within this; an idle keep-alive connection is
  // closed after it too.
  std::chrono::milliseconds read_timeout{30000};
  // A streaming client that takes no bytes for this long is dropped (its request cancelled).
  std::chrono::milliseconds write_timeout{60000};
  // Bytes of events waiting for a slow client before its generation pauses.
  size_t stream_buffer_bytes = 256 << 10;
  // Browsers: the origin allowed to call the API ("*": any; empty: none, no CORS headers and
  // OPTIONS is 405). Preflight OPTIONS requests are answered 204; responses to that origin carry
  // Access-Control-Allow-Origin.
  std::string cors_origin;
  std::string version;          // GET /version
  std::function<bool()> ready;  // GET /health: 200 while it returns true
  // GET /metrics on the API port (as vLLM serves it): the process's exposition text; unset: 404.
  // No API key asked (as vLLM): the metrics port's series, nothing about requests' contents.
  std::function<std::string()> metrics_text;
  HttpMetrics metrics;
};

// --cors-origin: "*" or one origin, "http(s)://HOST[:PORT]" (it goes into a header verbatim).
absl::Status CheckCorsOrigin(const std::string& origin);

class HttpFront {
 public:
  // `service` (not owned) supplies the nodes, keys, options and the chat template.
  HttpFront(GatewayService* service, HttpFrontOptions options);
  ~HttpFront();
  // Listens and starts the event loop; returns "HOST:PORT".
  absl::StatusOr<std::string> Start();
  // A graceful stop's first step, returning at once: the listener and idle connections close;
  // requests in progress go on, each connection closing after its response ("Connection:
  // close"); GET /health answers 503.
  void BeginDrain();
  // Waits until every connection has closed or `deadline` passes; returns how many are open.
  size_t AwaitDrained(std::chrono::steady_clock::time_point deadline);
  // Closes the listener and every connection (their requests are cancelled); joins the threads.
  void Stop();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// A gateway's graceful stop (on SIGTERM): readiness off (gRPC health of dmoe.v1.Dmoe, GET
// /health), no new requests on either API, and those in progress finish for up to `grace`; what
// is left then is cancelled (and logged). Returns once both fronts have stopped.
void DrainAndStop(HttpFront* front, ServiceMain* svc, std::chrono::seconds grace);

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_HTTP_FRONT_H_
