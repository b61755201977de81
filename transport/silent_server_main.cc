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
  // The test reads the address line and closes the pipe: whatever UCX prints (its warnings go to
  // stdout, from any of its threads) goes to stderr, the test's log, instead of killing this
  // process with SIGPIPE. Only the address goes to the pipe.
  const int address_fd = dup(1);
  dup2(2, 1);
  FILE* address_out = fdopen(address_fd, "w");
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
  std::fprintf(address_out, "%s\n", worker ? (*server)->WorkerAddress().c_str() : listen->c_str());
  std::fclose(address_out);
  for (;;) {  // take requests in (so they are in flight at the server), answer none
    std::vector<dmoe::transport::ServerRequest> batch;
    (*server)->Receive(std::chrono::milliseconds(100), &batch);
  }
}
