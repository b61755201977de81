// A local cluster of real processes for multi-process tests: dmoe-router (or none: static
// shards), dmoe-expert shards that take their experts from it, dmoe-attention nodes that follow
// its placement maps, a dmoe-gateway, over real gRPC and real UCX (tcp); and a streaming workload
// with per-request results (tokens, status, longest gap between streamed tokens, end time). Used by
// tests/router_cluster_test and the fault scenarios in tests/faults/.
#ifndef DMOE_TESTS_CLUSTER_HARNESS_H_
#define DMOE_TESTS_CLUSTER_HARNESS_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "proto/attention.grpc.pb.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"
#include "proto/expert_control.grpc.pb.h"
#include "proto/router.grpc.pb.h"
#include "tests/process_util.h"

namespace dmoe::testing {

using Prompts = std::vector<std::vector<int32_t>>;

// Writes the tiny model (seed `seed`; or another preset) to `dir` and computes each prompt's
// greedy output with the in-process engine, alone (the fault-free reference). Sets UCX to tcp on
// loopback.
absl::Status PrepareWorkload(const std::string& dir, uint64_t seed, const Prompts& prompts,
                             int max_tokens, Prompts* expected, const std::string& preset = "tiny");

struct Result {
  std::vector<int32_t> tokens;
  grpc::Status status;
  bool hung = false;                            // still open when the client's own deadline passed
  std::chrono::steady_clock::time_point ended;  // when the call ended
  double longest_gap = 0;  // seconds between consecutive streamed tokens (or start -> first)
};

struct Summary {
  int ok = 0, identical = 0, unavailable = 0, hung = 0, other = 0;
  double longest_gap = 0;
};
// Counts outcomes; identical: ok and equal to expected[i]. Prints each "other" failure.
Summary Summarize(const std::vector<Result>& results, const Prompts& expected);

class Cluster {
 public:
  Cluster(std::string name, std::string model) : name_(std::move(name)), model_(std::move(model)) {}
  // Stops every process still running with SIGTERM (gateway, attention nodes, shards, router; a
  // process that has not exited 15 s later gets SIGKILL), then fails the test if a process's log
  // holds a sanitizer report (the services built with --config=asan: leaks, memory errors, UB).
  ~Cluster();

  // Every process started from now on gets --cluster-token-file with `token`, and the harness's
  // own calls carry it.
  void UseClusterToken(const std::string& token);
  // Every process started from now on serves and calls the internal APIs over mutual TLS with
  // DIR/ca.pem, DIR/cert.pem, DIR/key.pem (common/internal_tls.h). The harness's own internal
  // calls follow the process's SetInternalTls.
  void UseInternalTls(const std::string& dir);
  // Each Start/Add fails the test (with the process's log) when the process does not come up.
  void StartRouter(std::vector<std::string> extra, const std::string& listen = "127.0.0.1:0");
  // Kills the router (SIGKILL) and starts it again on the same address.
  void RestartRouter();
  // With a router: the shard takes what the router gives it (up to `capacity`). Without one
  // (StartRouter not called): static, `extra` must say --experts SPEC.
  // `prefix`: argv before the binary (e.g. {"/usr/sbin/ip", "netns", "exec", NS, "env", ...}),
  // which must exec it (the child's PID stays the shard's).
  void AddShard(int capacity, std::vector<std::string> extra = {},
                std::vector<std::string> prefix = {});
  // Attention nodes (each registers with the router; without one `extra` must name the shards,
  // --expert-shards LIST); the harness's Run talks to the first, or to the gateway after
  // StartGateway.
  void StartAttention(std::vector<std::string> extra = {}) { AddAttention(std::move(extra)); }
  void AddAttention(std::vector<std::string> extra = {});
  // A dmoe-gateway over the router's attention nodes (a new one each call: the old one must be
  // gone). From now on Run goes through it (dmoe.v1.Dmoe/Generate, token ids).
  void StartGateway(std::vector<std::string> extra = {});

  // The first attention node's GetLoad (counters of its scheduler); an empty reply on error.
  internal::GetLoadReply AttentionLoad();
  // Waits until the router's active map has a version > `above`; 0 on timeout.
  uint64_t WaitForActive(uint64_t above, std::chrono::seconds timeout = std::chrono::seconds(20));
  // (token, expert) pairs each shard has computed so far (0 for one that does not answer).
  std::vector<double> ShardTokens();

  // Runs `prompts` concurrently (greedy, ignore_eos, `max_tokens` each, each with a deadline of
  // `request_deadline`); `during` runs once `trigger_tokens` tokens have streamed.
  std::vector<Result> Run(const Prompts& prompts, int max_tokens, int trigger_tokens,
                          const std::function<void()>& during,
                          std::chrono::seconds request_deadline = std::chrono::seconds(90));

  ChildProcess& shard(int i) { return shards_[static_cast<size_t>(i)]; }
  // A shard's ready-file fields ("grpc", "ucx", "ucx_worker", "pid"), the attention node's gRPC.
  const std::map<std::string, std::string>& shard_info(int i) const {
    return shard_info_[static_cast<size_t>(i)];
  }
  const std::string& attention_address() const { return attention_address_; }
  ChildProcess& attention(int i = 0) { return attentions_[static_cast<size_t>(i)]; }
  ChildProcess& gateway() { return gateway_; }
  ChildProcess& router() { return router_; }
  std::string Path(const std::string& f) const;

 private:
  // --cluster-token-file F when a token is in use, and the TLS flags.
  std::vector<std::string> TokenFlags() const;
  std::string name_;
  std::string model_;
  std::string token_, token_file_;
  std::vector<std::string> tls_flags_;
  std::vector<std::map<std::string, std::string>> shard_info_;
  std::string attention_address_;
  ChildProcess router_;
  int router_starts_ = 0;
  std::vector<std::string> router_extra_;
  std::string router_addr_;
  std::unique_ptr<internal::RouterService::Stub> router_stub_;
  std::vector<ChildProcess> shards_;
  std::vector<std::unique_ptr<internal::ExpertControl::Stub>> shard_stubs_;
  std::vector<ChildProcess> attentions_;
  std::unique_ptr<internal::AttentionService::Stub> stub_;
  ChildProcess gateway_;
  int gateway_starts_ = 0;
  std::unique_ptr<v1::Dmoe::Stub> gateway_stub_;
};

double MaxOverMean(const std::vector<double>& v);
std::vector<double> Delta(const std::vector<double>& after, const std::vector<double>& before);

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CLUSTER_HARNESS_H_
