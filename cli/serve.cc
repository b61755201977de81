#include "cli/serve.h"

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <cstdio>
#include <fstream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "attention_service/attention_server.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "gateway/gateway_service.h"
#include "gateway/node_pool.h"
#include "model/tokenizer.h"

namespace dmoe::cli {
namespace {

constexpr char kServeHelp[] =
    R"(usage: dmoe serve --model DIR [--grpc-listen H:P] [--kv-cache-mib N]

Everything in one process for the simplest use: the engine with every routed expert in-process,
the paged KV cache and scheduler, and the public API (dmoe.v1.Dmoe, as dmoe-gateway serves it).
DIR/tokenizer.json, when present, enables text prompts and Chat.

  --model DIR          checkpoint directory (Hugging Face layout)
  --grpc-listen H:P    public address (default 127.0.0.1:0; the chosen one is printed)
  --kv-cache-mib N     KV cache size (default 256)
  --block-tokens N     tokens per KV block (default 16)
  --kv-cache-dtype T   f32 (default), int8 or fp8_e4m3 (see dmoe-attention --help)
  --weight-dtype T     auto (default), f32, int8 or fp8: dense/attention projections
  --expert-dtype T     auto (default), f32, int8 or fp8: routed experts
)";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 2;
}

}  // namespace

int Serve(int argc, char** argv) {
  auto flags =
      Flags::Parse(argc, argv,
                   {"model", "grpc-listen", "kv-cache-mib", "block-tokens", "kv-cache-dtype",
                    "weight-dtype", "expert-dtype"},
                   {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kServeHelp, stdout);
    return 0;
  }
  auto dir = flags->String("model");
  if (!dir.ok()) return Fail(dir.status());
  auto mib = flags->Int("kv-cache-mib", 256);
  auto block = flags->Int("block-tokens", 16);
  if (!mib.ok()) return Fail(mib.status());
  if (!block.ok()) return Fail(block.status());
  if (*mib <= 0 || *block <= 0)
    return Fail(absl::InvalidArgumentError("--kv-cache-mib and --block-tokens must be positive"));
  cpu::KvDType kv_dtype = cpu::KvDType::kF32;
  if (!ParseKvDType(flags->StringOr("kv-cache-dtype", "f32"), &kv_dtype)) {
    return Fail(absl::InvalidArgumentError("--kv-cache-dtype: not f32, int8 or fp8_e4m3"));
  }
  LocalModelOptions lo;
  lo.log_progress = true;
  if (!ParseWeightDType(flags->StringOr("weight-dtype", "auto"), &lo.weight_dtype)) {
    return Fail(absl::InvalidArgumentError("--weight-dtype: not auto, f32, int8 or fp8"));
  }
  if (!ParseWeightDType(flags->StringOr("expert-dtype", "auto"), &lo.expert_dtype)) {
    return Fail(absl::InvalidArgumentError("--expert-dtype: not auto, f32, int8 or fp8"));
  }
  auto model = LocalModel::Load(*dir, lo);
  if (!model.ok()) return Fail(model.status());
  const ModelConfig& c = (*model)->config();
  const int64_t blocks =
      LatentKvCache::BlocksForBytes(c, *block, static_cast<uint64_t>(*mib) << 20, kv_dtype);
  if (blocks <= 0)
    return Fail(absl::InvalidArgumentError("--kv-cache-mib: too small for one block"));
  LatentKvCache cache(c, *block, blocks, kv_dtype);
  Scheduler scheduler(&(*model)->engine(), &cache, SchedulerOptions());
  auto chat = gateway::ChatTemplate::LoadFromModelDir(*dir);
  if (!chat.ok()) return Fail(chat.status());
  if (chat->is_builtin_default()) {
    std::fprintf(stderr, "no chat template in %s: Chat uses the DeepSeek-V2-Chat format\n",
                 dir->c_str());
  }
  std::unique_ptr<Tokenizer> tok;
  if (std::ifstream(*dir + "/tokenizer.json")) {
    auto t = Tokenizer::FromFile(*dir + "/tokenizer.json");
    if (!t.ok()) return Fail(t.status());
    tok = std::move(t).value();
  }
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  SchedulerLoop loop(&scheduler);
  loop.Start();
  // The attention service on a private loopback port; the public API in front of it.
  EnableHealthAndReflection();
  AttentionServiceImpl attention(&scheduler);
  grpc::ServerBuilder inner;
  int inner_port = 0;
  inner.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &inner_port);
  inner.RegisterService(&attention);
  auto inner_server = inner.BuildAndStart();
  if (inner_server == nullptr)
    return Fail(absl::UnavailableError("cannot start the attention service"));
  gateway::NodePool pool({absl::StrCat("127.0.0.1:", inner_port)});
  gateway::ApiKeys keys;
  gateway::GatewayOptions o;
  o.tokenizer = tok.get();
  o.chat_template = &*chat;
  o.vocab_size = c.vocab_size;
  o.max_position_embeddings = c.max_position_embeddings;
  gateway::GatewayService service(&pool, &keys, o);
  grpc::ServerBuilder outer;
  int port = 0;
  const std::string listen = flags->StringOr("grpc-listen", "127.0.0.1:0");
  outer.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  outer.RegisterService(&service);
  auto server = outer.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::UnavailableError(absl::StrCat("--grpc-listen: cannot listen on ", listen)));
  }
  SetReadiness(server.get(), "dmoe.v1.Dmoe", true);
  std::printf("gateway: %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  inner_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  loop.Stop();
  return 0;
}

}  // namespace dmoe::cli
