#include "cli/serve.h"

#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "attention_service/attention_node.h"
#include "attention_service/attention_server.h"
#include "attention_service/json_constraint.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"
#include "common/flags.h"
#include "common/grpc_setup.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/service.h"
#include "common/status_macros.h"
#include "gateway/gateway_metrics.h"
#include "gateway/gateway_service.h"
#include "gateway/http_front.h"
#include "gateway/node_pool.h"
#include "model/tokenizer.h"

namespace dmoe::cli {
namespace {

constexpr char kServeHelp[] =
    R"(usage: dmoe serve --model DIR [--grpc-listen H:P] [--kv-cache-mib N]

Everything in one process for the simplest use: the engine with every routed expert in-process,
the paged KV cache and scheduler, and the public APIs as dmoe-gateway serves them: gRPC
(dmoe.v1.Dmoe) and the OpenAI-compatible HTTP API. DIR/tokenizer.json, when present, enables text
prompts, chat and JSON mode (response_format json_object). Prints "gateway: HOST:PORT" and "openai: http://HOST:PORT/v1".

  --model DIR          checkpoint directory (Hugging Face layout)
  --grpc-listen H:P    public address (default 127.0.0.1:0; the chosen one is printed)
  --http-listen H:P    the OpenAI-compatible HTTP API (default 127.0.0.1:0; "off": none)
  --cors-origin ORIGIN let browser pages from ORIGIN ("https://ui.example.com", or "*") call
                       the HTTP API (default: none)
  --metrics-listen H:P Prometheus /metrics (default 127.0.0.1:0): the gateway's series (the
                       HTTP API's port answers GET /metrics too)
  --drain-seconds N    on SIGTERM: no new requests, and those in progress finish for up to N s
                       (default 30, 0-86400; a second signal ends at once)
  --model-id NAME[,ALIAS...]  the model's name in the APIs (default dmoe), and other names it
                       answers to (e.g. deepseek-ai/DeepSeek-V3)
  --reasoning-parser P  deepseek-r1: a chat answer's thinking (up to "</think>") goes to
                       reasoning_content, as vLLM's; none (default): all of it is content
  --chat-template F    a Jinja chat template file used instead of DIR's (e.g.
                       deploy/chat_templates/deepseek_v3_tools.jinja: DeepSeek-V3's, rendering
                       the request's tools too)
  --tool-call-parser P deepseek_v3: chat requests with tools get the model's tool calls as
                       tool_calls (as vLLM's; "required" or a named function starts the answer
                       inside a call); needs a template that renders tools (--chat-template).
                       none (default): tools only with tool_choice "none"
  --generation-config M  auto (default): the OpenAI API's requests that omit temperature, top_p,
                       top_k, min_p or repetition_penalty get DIR/generation_config.json's (as
                       vLLM); none: OpenAI's defaults (temperature 1, top_p 1)
  --api-keys FILE      require "Authorization: Bearer KEY"; FILE has one KEY [LIMIT] per line
  --max-concurrent-per-key N  default per-key limit of requests in flight (default 64)
  --kv-cache-mib N     KV cache size (default 256)
  --block-tokens N     tokens per KV block (default 16)
  --kv-cache-dtype T   f32 (default), bf16, int8 or fp8_e4m3 (see dmoe-attention --help)
  --weight-dtype T     auto (default: as stored; f16 as f32), f32, bf16, int8 or fp8: dense/attention
                       projections
  --expert-dtype T     the same for the routed experts
  --speculative-tokens N  DeepSeek-V3 models: draft up to N tokens per step with the MTP layer
                       (default 0 = off; see dmoe-attention --help)
)";

struct ServeOptions {
  std::string dir;
  int64_t mib = 256, block = 16, speculative = 0, drain = 30;
  cpu::KvDType kv_dtype = cpu::KvDType::kF32;
  LocalModelOptions model;
};

absl::StatusOr<ServeOptions> ParseServe(const Flags& f) {
  ServeOptions o;
  ASSIGN_OR_RETURN(o.dir, f.String("model"));
  ASSIGN_OR_RETURN(o.mib, f.Int("kv-cache-mib", 256));
  ASSIGN_OR_RETURN(o.block, f.Int("block-tokens", 16));
  ASSIGN_OR_RETURN(o.speculative, f.Int("speculative-tokens", 0));
  ASSIGN_OR_RETURN(o.drain, f.Int("drain-seconds", 30));
  if (o.drain < 0 || o.drain > 86400) {
    return absl::InvalidArgumentError("--drain-seconds: must be in [0, 86400]");
  }
  if (o.mib <= 0 || o.block <= 0) {
    return absl::InvalidArgumentError("--kv-cache-mib and --block-tokens must be positive");
  }
  if (o.mib > (int64_t{1} << 30) || o.block > 4096) {
    return absl::InvalidArgumentError(
        "--kv-cache-mib (at most 2^30) or --block-tokens (at most 4096) is over its limit");
  }
  if (!ParseKvDType(f.StringOr("kv-cache-dtype", "f32"), &o.kv_dtype)) {
    return absl::InvalidArgumentError("--kv-cache-dtype: not f32, bf16, int8 or fp8_e4m3");
  }
  o.model.log_progress = true;
  if (!ParseWeightDType(f.StringOr("weight-dtype", "auto"), &o.model.weight_dtype)) {
    return absl::InvalidArgumentError("--weight-dtype: not auto, f32, bf16, int8 or fp8");
  }
  if (!ParseWeightDType(f.StringOr("expert-dtype", "auto"), &o.model.expert_dtype)) {
    return absl::InvalidArgumentError("--expert-dtype: not auto, f32, bf16, int8 or fp8");
  }
  return o;
}

// The public API's text side: DIR's chat template and tokenizer.json (when present).
struct TextParts {
  std::unique_ptr<gateway::ChatTemplate> chat;
  std::unique_ptr<Tokenizer> tok;
};

// `template_file`: --chat-template ("": DIR's own).
absl::StatusOr<TextParts> LoadTextParts(const std::string& dir, const std::string& template_file) {
  TextParts t;
  ASSIGN_OR_RETURN(gateway::ChatTemplate chat, gateway::ChatTemplate::LoadFromModelDir(dir));
  if (!template_file.empty()) {
    auto replaced = chat.WithTemplateFile(template_file);
    if (!replaced.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--chat-template: ", replaced.status().message()));
    }
    chat = *std::move(replaced);
  }
  t.chat = std::make_unique<gateway::ChatTemplate>(std::move(chat));
  if (t.chat->is_builtin_default()) {
    spdlog::info("no chat template in {}: Chat uses the DeepSeek-V2-Chat format", dir);
  }
  if (std::ifstream(dir + "/tokenizer.json")) {
    ASSIGN_OR_RETURN(t.tok, Tokenizer::FromFile(dir + "/tokenizer.json"));
  }
  return t;
}

// The gateway's two public APIs over the private attention port, until SIGTERM/SIGINT.
absl::Status ServeFronts(const Flags& flags, const std::string& inner_addr, const ModelConfig& c,
                         const TextParts& text, std::chrono::seconds drain, ServiceMain* outer) {
  gateway::NodePool pool({inner_addr});
  auto keys = std::make_unique<gateway::ApiKeys>();
  if (flags.Has("api-keys")) {
    ASSIGN_OR_RETURN(int64_t limit, flags.Int("max-concurrent-per-key", 64));
    ASSIGN_OR_RETURN(keys, gateway::ApiKeys::Load(flags.StringOr("api-keys", ""), limit));
  }
  gateway::GatewayOptions go;
  go.tokenizer = text.tok.get();
  go.chat_template = text.chat.get();
  go.vocab_size = c.vocab_size;
  go.max_position_embeddings = c.max_position_embeddings;
  RETURN_IF_ERROR(go.SetModelNames(flags.StringOr("model-id", "dmoe")));
  RETURN_IF_ERROR(
      go.SetSamplingDefaults(flags.StringOr("generation-config", "auto"), c.sampling_defaults));
  RETURN_IF_ERROR(go.SetReasoningParser(flags.StringOr("reasoning-parser", "none")));
  RETURN_IF_ERROR(go.SetToolCallParser(flags.StringOr("tool-call-parser", "none")));
  gateway::HttpFrontOptions ho;
  ho.listen = flags.StringOr("http-listen", "127.0.0.1:0");
  ho.cors_origin = flags.StringOr("cors-origin", "");
  if (flags.Has("cors-origin")) RETURN_IF_ERROR(gateway::CheckCorsOrigin(ho.cors_origin));
  ho.version = "dmoe serve (OpenAI-compatible API v1)";
  Metrics metrics;
  ASSIGN_OR_RETURN(std::string metrics_addr,
                   metrics.Serve(flags.StringOr("metrics-listen", "127.0.0.1:0")));
  gateway::GatewayMetricSet set(&metrics, go.model_id, &go, &ho.metrics);
  gateway::GatewayService service(&pool, keys.get(), go);
  ho.metrics_text = [&metrics] { return metrics.Text(); };
  gateway::HttpFront front(&service, ho);
  std::string http = "off";
  if (ho.listen != "off") {
    ASSIGN_OR_RETURN(std::string a, front.Start());
    http = absl::StrCat("http://", a, "/v1");
  }
  auto addr =
      outer->StartGrpc("grpc-listen", flags.StringOr("grpc-listen", "127.0.0.1:0"), {&service});
  if (addr.ok()) {
    SetReadiness(outer->server(), "dmoe.v1.Dmoe", true);
    std::printf("gateway: %s\nopenai: %s\nmetrics: http://%s/metrics\n", addr->c_str(),
                http.c_str(), metrics_addr.c_str());
    std::fflush(stdout);
    std::atomic<bool> done{false};
    std::thread refresh([&] {  // the Inference Extension gauges, from the node's load
      while (!done) {
        set.Refresh(pool);
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
    const int sig = outer->WaitForStop();
    spdlog::info("signal {}: draining, up to {} s (--drain-seconds)", sig, drain.count());
    done = true;
    refresh.join();
  }
  gateway::DrainAndStop(&front, outer, addr.ok() ? drain : std::chrono::seconds(0));
  return addr.status();
}

}  // namespace

int Serve(int argc, char** argv) {
  ServiceMain outer("dmoe serve");
  auto flags = Flags::Parse(
      argc, argv,
      {"model", "grpc-listen", "http-listen", "cors-origin", "kv-cache-mib", "block-tokens",
       "metrics-listen", "model-id", "generation-config", "reasoning-parser", "chat-template",
       "tool-call-parser", "api-keys", "max-concurrent-per-key", "kv-cache-dtype", "weight-dtype",
       "expert-dtype", "speculative-tokens", "drain-seconds"},
      {});
  if (!flags.ok()) return outer.Fail(flags.status());
  if (flags->help()) {
    std::fputs(kServeHelp, stdout);
    return 0;
  }
  auto o = ParseServe(*flags);
  if (!o.ok()) return outer.Fail(o.status());
  // The chat template and tokenizer first: a mistyped file is found before the weights load.
  auto text = LoadTextParts(o->dir, flags->StringOr("chat-template", ""));
  if (!text.ok()) return outer.Fail(text.status());
  auto model = LocalModel::Load(o->dir, o->model);
  if (!model.ok()) return outer.Fail(model.status());
  const ModelConfig& c = (*model)->config();
  KvCacheOptions ko;
  ko.mib = o->mib;
  ko.block_tokens = o->block;
  ko.dtype = o->kv_dtype;
  auto cache = MakeKvCache(c, ko);
  if (!cache.ok()) return outer.Fail(cache.status());
  if (auto st = CheckSpeculativeTokens(c, o->speculative); !st.ok()) return outer.Fail(st);
  SchedulerOptions so;
  so.speculative_tokens = o->speculative;
  // JSON mode checks tokens against their text (the tokenizer loaded above, if any).
  std::vector<std::string> token_texts;
  if (text->tok != nullptr) {
    auto texts = TokenTextsFromDir(o->dir, c.vocab_size);
    if (texts.ok()) {
      token_texts = *std::move(texts);
      so.token_bytes = &token_texts;
    }
  }
  auto made = AttentionNode::Create(model->get(), std::move(*cache), so);
  if (!made.ok()) return outer.Fail(made.status());
  AttentionNode& node = **made;
  node.Start();
  // The attention service on a private loopback port; the public API in front of it.
  std::unique_ptr<grpc::Server> inner;
  auto inner_addr = StartGrpcServer("the private attention port", "127.0.0.1:0", {node.service()},
                                    nullptr, &inner);
  absl::Status st = inner_addr.status();
  if (st.ok())
    st = ServeFronts(*flags, *inner_addr, c, *text, std::chrono::seconds(o->drain), &outer);
  if (inner != nullptr) inner->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  node.Stop();
  return st.ok() ? 0 : outer.Fail(st);
}

}  // namespace dmoe::cli
