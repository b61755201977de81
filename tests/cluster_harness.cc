#include "tests/cluster_harness.h"

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "attention_service/local_model.h"
#include "common/cluster_token.h"
#include "common/internal_tls.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe::testing {

using Clock = std::chrono::steady_clock;

absl::Status PrepareWorkload(const std::string& dir, uint64_t seed, const Prompts& prompts,
                             int max_tokens, Prompts* expected, const std::string& preset) {
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_TLS", "tcp,self", 1);
  TinyModelOptions o;
  o.seed = seed;
  auto config = PresetConfig(preset);
  if (!config.ok()) return config.status();
  if (auto st = WriteTinyModel(dir, *config, o); !st.ok()) return st;
  auto local = LocalModel::Load(dir);
  if (!local.ok()) return local.status();
  expected->clear();
  for (const auto& p : prompts) {
    GenerateOptions g;
    g.max_tokens = max_tokens;
    g.ignore_eos = true;
    auto want = Generate((*local)->engine(), p, g);  // the in-process engine, alone
    if (!want.ok()) return want.status();
    expected->push_back(*want);
  }
  return absl::OkStatus();
}

Summary Summarize(const std::vector<Result>& results, const Prompts& expected) {
  Summary s;
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    s.longest_gap = std::max(s.longest_gap, r.longest_gap);
    if (r.hung) {
      ++s.hung;
    } else if (r.status.ok()) {
      ++s.ok;
      s.identical += i < expected.size() && r.tokens == expected[i];
    } else if (r.status.error_code() == grpc::StatusCode::UNAVAILABLE) {
      ++s.unavailable;
    } else {
      ++s.other;
      std::printf("request %zu: %d %s\n", i, r.status.error_code(),
                  r.status.error_message().c_str());
    }
  }
  return s;
}

Cluster::~Cluster() {
  // In waves, each stopped together: the front, the router, the shards (which then leave at once:
  // with the router up, each would wait for a map without it, and together they wait out 30 s).
  std::vector<std::vector<ChildProcess*>> waves(3);
  waves[0].push_back(&gateway_);
  for (auto& a : attentions_) waves[0].push_back(&a);
  waves[1].push_back(&router_);
  for (auto& s : shards_) waves[2].push_back(&s);
  std::vector<ChildProcess*> order;
  for (const auto& wave : waves) {
    for (ChildProcess* p : wave) {
      if (p->pid() > 0) ::kill(p->pid(), SIGTERM);
    }
    const auto t0 = Clock::now();
    for (ChildProcess* p : wave) {
      if (p->pid() > 0 && p->Wait(std::chrono::seconds(15)) == -1) {
        std::printf("%s: no exit 15 s after SIGTERM; SIGKILL\n", p->log_path().c_str());
        p->Kill(SIGKILL);
      }
      order.push_back(p);
    }
    std::printf("stopped %zu processes in %.2f s\n", wave.size(),
                std::chrono::duration<double>(Clock::now() - t0).count());
  }
  for (ChildProcess* p : order) {
    if (p->log_path().empty()) continue;
    const std::string log = p->Log();
    for (const char* report :
         {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"}) {
      const size_t at = log.find(report);
      if (at != std::string::npos) {
        ADD_FAILURE() << p->log_path() << ": " << log.substr(at, 2000);
      }
    }
  }
}

std::string Cluster::Path(const std::string& f) const { return TmpDir() + "/" + name_ + "_" + f; }

void Cluster::UseClusterToken(const std::string& token) {
  token_ = token;
  token_file_ = Path("cluster_token");
  std::ofstream(token_file_) << token << "\n";
}

std::vector<std::string> Cluster::TokenFlags() const {
  std::vector<std::string> f = tls_flags_;
  if (!token_.empty()) f.insert(f.end(), {"--cluster-token-file", token_file_});
  return f;
}

void Cluster::UseInternalTls(const std::string& dir) {
  tls_flags_ = {"--internal-tls-ca", dir + "/ca.pem",      "--internal-tls-cert",
                dir + "/cert.pem",   "--internal-tls-key", dir + "/key.pem"};
}

void Cluster::StartRouter(std::vector<std::string> extra, const std::string& listen) {
  const std::string ready = Path("router" + std::to_string(router_starts_) + ".json");
  std::vector<std::string> argv = {Runfile("router/dmoe-router"),
                                   "--model",
                                   model_,
                                   "--grpc-listen",
                                   listen,
                                   "--ready-file",
                                   ready,
                                   "--lease-ms",
                                   "1500"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  router_extra_ = extra;
  for (const std::string& a : TokenFlags()) argv.push_back(a);
  router_ = ChildProcess(argv, Path("router" + std::to_string(router_starts_++) + ".log"));
  auto info = WaitForReadyFile(ready, std::chrono::seconds(30));
  ASSERT_FALSE(info.empty()) << router_.Log();
  router_addr_ = info["grpc"];
  router_stub_ = internal::RouterService::NewStub(InternalChannel(router_addr_));
}

void Cluster::RestartRouter() {
  router_.Kill(SIGKILL);
  std::vector<std::string> extra = router_extra_;
  StartRouter(extra, router_addr_);
}

void Cluster::AddShard(int capacity, std::vector<std::string> extra,
                       std::vector<std::string> prefix) {
  const int i = static_cast<int>(shards_.size());
  const std::string ready = Path("shard" + std::to_string(i) + ".json");
  std::vector<std::string> argv = std::move(prefix);
  std::vector<std::string> own = {Runfile("expert_service/dmoe-expert"),
                                  "--model",
                                  model_,
                                  "--node-id",
                                  "shard-" + std::to_string(i),
                                  "--drain-ms",
                                  "500",
                                  "--ready-file",
                                  ready};
  if (!router_addr_.empty()) {
    own.insert(own.end(), {"--router", router_addr_, "--capacity", std::to_string(capacity)});
  }
  argv.insert(argv.end(), own.begin(), own.end());
  argv.insert(argv.end(), extra.begin(), extra.end());
  for (const std::string& a : TokenFlags()) argv.push_back(a);
  shards_.emplace_back(argv, Path("shard" + std::to_string(i) + ".log"));
  auto info = WaitForReadyFile(ready, std::chrono::seconds(30));
  ASSERT_FALSE(info.empty()) << shards_.back().Log();
  shard_info_.push_back(info);
  shard_stubs_.push_back(internal::ExpertControl::NewStub(InternalChannel(info["grpc"])));
}

void Cluster::AddAttention(std::vector<std::string> extra) {
  const std::string n = std::to_string(attentions_.size());
  const std::string ready = Path("attention" + n + ".json");
  std::vector<std::string> argv = {Runfile("attention_service/dmoe-attention"),
                                   "--model",
                                   model_,
                                   "--kv-blocks",
                                   "1024",
                                   "--block-tokens",
                                   "8",
                                   "--wire-dtype",
                                   "f32",
                                   "--expert-deadline-ms",
                                   "2000",
                                   "--ready-file",
                                   ready};
  // With a router, streams wait up to 15 s for experts to move; static, they fail at once.
  if (!router_addr_.empty()) {
    argv.insert(argv.end(), {"--router", router_addr_, "--expert-wait-ms", "15000"});
  }
  argv.insert(argv.end(), extra.begin(), extra.end());
  for (const std::string& a : TokenFlags()) argv.push_back(a);
  attentions_.emplace_back(argv, Path("attention" + n + ".log"));
  auto info = WaitForReadyFile(ready, std::chrono::seconds(60));
  ASSERT_FALSE(info.empty()) << attentions_.back().Log();
  if (attentions_.size() > 1) return;
  attention_address_ = info["grpc"];
  stub_ = internal::AttentionService::NewStub(InternalChannel(info["grpc"]));
}

void Cluster::StartGateway(std::vector<std::string> extra) {
  const std::string n = std::to_string(gateway_starts_++);
  const std::string ready = Path("gateway" + n + ".json");
  std::vector<std::string> argv = {Runfile("gateway/dmoe-gateway"),
                                   "--router",
                                   router_addr_,
                                   "--model",
                                   model_,
                                   "--http-listen",
                                   "off",
                                   "--ready-file",
                                   ready};
  argv.insert(argv.end(), extra.begin(), extra.end());
  for (const std::string& a : TokenFlags()) argv.push_back(a);
  gateway_ = ChildProcess(argv, Path("gateway" + n + ".log"));
  auto info = WaitForReadyFile(ready, std::chrono::seconds(30));
  ASSERT_FALSE(info.empty()) << gateway_.Log();
  gateway_stub_ =
      v1::Dmoe::NewStub(grpc::CreateChannel(info["grpc"], grpc::InsecureChannelCredentials()));
}

uint64_t Cluster::WaitForActive(uint64_t above, std::chrono::seconds timeout) {
  const auto until = Clock::now() + timeout;
  while (Clock::now() < until) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
    AddClusterToken(&ctx, token_);
    internal::ListNodesReply reply;
    if (router_stub_->ListNodes(&ctx, internal::ListNodesRequest(), &reply).ok() &&
        reply.placement_version() > above) {
      return reply.placement_version();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

internal::GetLoadReply Cluster::AttentionLoad() {
  internal::GetLoadReply reply;
  if (stub_ == nullptr) return reply;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  AddClusterToken(&ctx, token_);
  if (!stub_->GetLoad(&ctx, internal::GetLoadRequest(), &reply).ok()) reply.Clear();
  return reply;
}

std::vector<double> Cluster::ShardTokens() {
  std::vector<double> out;
  for (auto& stub : shard_stubs_) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    AddClusterToken(&ctx, token_);
    internal::GetStatsReply s;
    out.push_back(stub->GetStats(&ctx, internal::GetStatsRequest(), &s).ok()
                      ? static_cast<double>(s.pairs())
                      : 0.0);
  }
  return out;
}

namespace {

void Stream(internal::AttentionService::Stub* stub, const std::string& token,
            const std::vector<int32_t>& prompt, int max_tokens, std::chrono::seconds deadline,
            std::atomic<int>* streamed, Result* result) {
  internal::GenerateRequest req;
  for (int32_t t : prompt) req.add_prompt_token_ids(t);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_ignore_eos(true);
  const auto start = Clock::now();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  AddClusterToken(&ctx, token);
  auto reader = stub->Generate(&ctx, req);
  internal::GenerateResponse r;
  auto last = Clock::now();
  while (reader->Read(&r)) {
    if (r.tokens_size() == 0) continue;
    const auto now = Clock::now();
    result->longest_gap =
        std::max(result->longest_gap, std::chrono::duration<double>(now - last).count());
    last = now;
    for (const auto& t : r.tokens()) result->tokens.push_back(t.token_id());
    *streamed += r.tokens_size();
  }
  result->status = reader->Finish();
  result->ended = Clock::now();
  // The client's own deadline ended it (a server's DEADLINE_EXCEEDED comes sooner).
  result->hung = result->status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
                 result->ended - start >= deadline - std::chrono::seconds(1);
}

// The same through the gateway's public API.
void StreamViaGateway(v1::Dmoe::Stub* stub, const std::vector<int32_t>& prompt, int max_tokens,
                      std::chrono::seconds deadline, std::atomic<int>* streamed, Result* result) {
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_ignore_eos(true);
  const auto start = Clock::now();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + deadline);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse r;
  auto last = Clock::now();
  while (reader->Read(&r)) {
    if (r.token_ids_size() == 0) continue;
    const auto now = Clock::now();
    result->longest_gap =
        std::max(result->longest_gap, std::chrono::duration<double>(now - last).count());
    last = now;
    for (int32_t t : r.token_ids()) result->tokens.push_back(t);
    *streamed += r.token_ids_size();
  }
  result->status = reader->Finish();
  result->ended = Clock::now();
  // The client's own deadline ended it (a server's DEADLINE_EXCEEDED comes sooner).
  result->hung = result->status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
                 result->ended - start >= deadline - std::chrono::seconds(1);
}

}  // namespace

std::vector<Result> Cluster::Run(const Prompts& prompts, int max_tokens, int trigger_tokens,
                                 const std::function<void()>& during,
                                 std::chrono::seconds request_deadline) {
  std::vector<Result> results(prompts.size());
  std::atomic<int> streamed{0}, finished{0};
  std::vector<std::thread> clients;
  for (size_t i = 0; i < prompts.size(); ++i) {
    clients.emplace_back([&, i] {
      if (gateway_stub_) {
        StreamViaGateway(gateway_stub_.get(), prompts[i], max_tokens, request_deadline, &streamed,
                         &results[i]);
      } else {
        Stream(stub_.get(), token_, prompts[i], max_tokens, request_deadline, &streamed,
               &results[i]);
      }
      ++finished;
    });
  }
  if (during) {
    const auto until = Clock::now() + std::chrono::seconds(60);
    while (streamed < trigger_tokens && finished < static_cast<int>(prompts.size()) &&
           Clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    // The fault must land mid-flight: after the trigger and with requests still streaming.
    const int in_flight = static_cast<int>(prompts.size()) - finished.load();
    EXPECT_GE(streamed.load(), trigger_tokens) << "the trigger was never reached";
    EXPECT_GT(in_flight, 0) << "the fault came after every request had finished";
    std::printf("fault after %d streamed tokens, %d of %zu requests in flight\n", streamed.load(),
                in_flight, prompts.size());
    during();
  }
  for (auto& t : clients) t.join();
  return results;
}

double MaxOverMean(const std::vector<double>& v) {
  double sum = 0, mx = 0;
  for (double x : v) {
    sum += x;
    mx = std::max(mx, x);
  }
  return sum > 0 ? mx / (sum / static_cast<double>(v.size())) : 0;
}

std::vector<double> Delta(const std::vector<double>& after, const std::vector<double>& before) {
  std::vector<double> d(after.size());
  for (size_t i = 0; i < after.size(); ++i) {
    d[i] = after[i] - (i < before.size() ? before[i] : 0.0);
  }
  return d;
}

}  // namespace dmoe::testing
