// Test helper: a UCX server process that accepts requests and never answers them, so that a test
// can kill it with requests in flight. Prints its address (listener "HOST:PORT", or the worker
// address with --worker-address) on one line of stdout, then waits to be killed.
// Usage: silent_server [--worker-address]   (UCX_TLS etc. from the environment)
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "transport/ucx.h"

int main(int argc, char** argv) {
  const bool worker = argc > 1 && std::strcmp(argv[1], "--worker-address") == 0;
  auto server = dmoe::transport::NewUcxServer();
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  auto listen = (*server)->Listen("127.0.0.1:0");
  if (!listen.ok()) {
    std::fprintf(stderr, "%s\n", std::string(listen.status().message()).c_str());
    return 1;
  }
  std::printf("%s\n", worker ? (*server)->WorkerAddress().c_str() : listen->c_str());
  std::fflush(stdout);
  for (;;) {  // take requests in (so they are in flight at the server), answer none
    std::vector<dmoe::transport::ServerRequest> batch;
    (*server)->Receive(std::chrono::milliseconds(100), &batch);
  }
}
