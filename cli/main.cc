// The `dmoe` command: model tools and (later) clients of a running cluster.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "attention_service/device_model.h"
#include "attention_service/local_model.h"
#include "attention_service/remote_flags.h"
#include "cli/gateway_client.h"
#include "cli/local_cluster.h"
#include "cli/npy.h"
#include "cli/openai_bench.h"
#include "cli/serve.h"
#include "common/build_info.h"
#include "common/device_flags.h"
#include "common/flags.h"
#include "common/huge_pages.h"
#include "common/status_macros.h"
#include "model/tiny_model.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace dmoe::cli {
namespace {

constexpr char kUsage[] = R"(dmoe — DeepSeek-V2 MoE serving tools

usage: dmoe <command> [flags]      (dmoe <command> --help for its flags)

commands:
  logits           float32 logits [T, vocab] of one full causal forward, in-process
  generate         prefill + decode through the latent KV cache, in-process; prints token ids
  make-tiny-model  write a random-weight checkpoint in Hugging Face layout (a preset: tiny, small,
                   v2-lite-4l, ...; make-tiny-model --help lists them)
  tokenize         run a tokenizer.json locally over JSON lines (or --decode the reverse)
  chat             chat with a dmoe-gateway (--target), streaming the answer
  serve            the whole stack in one process (experts in-process), serving the public API
  up               start a local cluster (experts, attention, gateway) on 127.0.0.1
  bench            load generator against the OpenAI-compatible API (or gRPC): TTFT, TPOT, ITL
  down             stop the cluster `dmoe up` started
  version          the version and the commit built from (also --version; every dmoe binary
                   takes --version)
)";

constexpr char kChatHelp[] = R"(usage: dmoe chat --target HOST:PORT [--system TEXT] MESSAGE [flags]

Sends one user MESSAGE (after an optional system prompt) through the gateway, which renders the
model's chat template, and streams the answer.

  --target HOST:PORT   the dmoe-gateway
  --system TEXT        a system prompt before the message
  --max-tokens N       tokens to generate (default 16)
  --temperature T      0 (default) is greedy; > 0 samples
  --top-k K, --top-p P, --min-p P, --seed S   sampling, as in dmoe generate
  --stop STRING        the text ends before the first STRING
  --stop-token ID      stop after generating this id
  --ignore-eos         don't stop at the model's end-of-sequence token
  --logprobs N         after the text, each token's logprob and its N most likely alternatives
  --api-key KEY        the gateway's API key (default $DMOE_API_KEY)
  --timeout-ms N       deadline of the whole request
)";

constexpr char kTokenizeHelp[] =
    R"(usage: dmoe tokenize --tokenizer PATH/tokenizer.json --jsonl FILE [--decode]

Each input line is one JSON string; each output line is the JSON array of its token ids (no special
tokens added; special tokens written in the text are recognized). With --decode each input line is
a JSON array of ids and each output line the JSON string of their text. FILE "-" is stdin.
Bytes that are not valid UTF-8 are tokenized byte by byte; JSON output escapes them as text.
)";

constexpr char kLogitsHelp[] = R"(usage: dmoe logits --model DIR --tokens 1,2,3 [--out F.npy]

Runs one full causal forward of the token ids through the model in DIR (config.json +
model.safetensors or a sharded index) in this process, in fp32 (on a GPU, --device cuda: a bf16
checkpoint with bf16 activations).

  --model DIR      checkpoint directory (Hugging Face layout)
  --tokens LIST    comma-separated token ids, each in [0, vocab_size)
  --out F.npy      write the logits as a float32 .npy of shape [T, vocab_size]; without it,
                   print the argmax token and its logit for every position
  --attention FORM auto (default), naive or absorbed: which MLA form to use
%s%s)";

constexpr char kGenerateHelp[] =
    R"(usage: dmoe generate --model DIR --tokens 1,2,3 --max-tokens N [flags]
       dmoe generate --target HOST:PORT (TEXT | --tokens 1,2,3) --max-tokens N [flags]

With --model: prefills the prompt (whole, or in chunks) and decodes token by token through the
latent KV cache, in this process, and prints the generated token ids, comma-separated, on one line.
With --target: a client of a dmoe-gateway; streams the text (or prints the ids at the end with
--print-token-ids). Generation stops at the model's eos_token_id (config.json, or
generation_config.json when present) with finish reason "stop", unless --ignore-eos.

  --model DIR          checkpoint directory (Hugging Face layout)
  --target HOST:PORT   a dmoe-gateway instead of --model; the prompt is TEXT or --tokens
  --tokens LIST        comma-separated prompt token ids, each in [0, vocab_size)
  --max-tokens N       tokens to generate (prompt + N must fit max_position_embeddings)
  --temperature T      0 (default) is greedy, ties going to the lowest id; > 0 samples
  --top-k K            sample among the K most likely tokens (0 = off)
  --top-p P            sample among the most likely tokens holding probability P, in (0, 1]
  --min-p P            drop tokens below P times the most likely one's probability
  --seed S             random seed for sampling (default 0)
  --prefill-chunk C    prefill C prompt tokens per step (default: all at once; --model only)
  --stop-token ID      stop after generating this id
  --ignore-eos         don't stop at the model's end-of-sequence token
  --print-token-ids    print only the ids, comma-separated (no timing line on stderr);
                       with --target they are printed as they arrive
  --stop STRING        (--target) the text ends before the first STRING
  --logprobs N         (--target) after the text, each token's logprob and its N most likely
                       alternatives (0..20)
  --api-key KEY        (--target) the gateway's API key (default $DMOE_API_KEY)
  --timeout-ms N       (--target) deadline of the whole request
%s%s)";

constexpr char kMakeTinyHelp[] =
    R"(usage: dmoe make-tiny-model OUT [--preset tiny] [--seed 0] [--dtype f32] [--shards 1]

Writes config.json and random weights (MODEL_SPEC.md presets and weight scales) to OUT, exactly in
Hugging Face layout: model.safetensors, or model-0000i-of-0000N.safetensors plus
model.safetensors.index.json when --shards N > 1.

  --preset NAME   tiny (default), tiny-lite, tiny-v3 (DeepSeek-V3 gating and an MTP layer),
                  tiny-demo (vocabulary of the DeepSeek tokenizer), small, small-v3, or
                  v2-lite-4l (DeepSeek-V2-Lite's layer shapes in 4 layers: 3.9 GB in bf16)
  --vocab-size N  override the preset's vocabulary size
  --seed N        seed of the weight draws (default 0); a tensor depends only on (seed, name)
  --dtype T       f32 (default), bf16 (round-to-nearest-even of the same f32 draws) or fp8
                  (every *_proj.weight in fp8 e4m3 with 128x128 "_scale_inv" block scales, as
                  DeepSeek-V3 checkpoints ship; the rest bf16)
  --shards N      number of safetensors files (default 1)
)";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
  return 2;
}

absl::StatusOr<AttentionForm> ParseForm(const std::string& s) {
  if (s == "auto") return AttentionForm::kAuto;
  if (s == "naive") return AttentionForm::kNaive;
  if (s == "absorbed") return AttentionForm::kAbsorbed;
  return absl::InvalidArgumentError(
      absl::StrCat("--attention: \"", s, "\" is not auto, naive or absorbed"));
}

// A GPU engine's KV pool for one sequence of up to `tokens` tokens.
CudaEngineOptions PoolFor(size_t tokens) {
  CudaEngineOptions o;
  o.kv_blocks = static_cast<int64_t>(tokens) / o.block_tokens + 2;
  return o;
}

// --model DIR and --tokens LIST of a local run (no positional arguments).
absl::Status ModelAndTokens(const Flags& f, std::string* dir, std::vector<int32_t>* tokens) {
  if (!f.positional().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected argument \"", f.positional()[0], "\""));
  }
  ASSIGN_OR_RETURN(*dir, f.String("model"));
  ASSIGN_OR_RETURN(std::string list, f.String("tokens"));
  ASSIGN_OR_RETURN(*tokens, ParseTokenList("tokens", list));
  return absl::OkStatus();
}

int Logits(int argc, char** argv) {
  auto flags = Flags::Parse(
      argc, argv, WithRemote({"model", "tokens", "out", "attention", "device", "gpu"}), {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::printf(kLogitsHelp, kRemoteHelp, DeviceHelp(19).c_str());
    return 0;
  }
  std::string dir;
  std::vector<int32_t> tokens;
  if (auto st = ModelAndTokens(*flags, &dir, &tokens); !st.ok()) return Fail(st);
  auto form = ParseForm(flags->StringOr("attention", "auto"));
  if (!form.ok()) return Fail(form.status());
  LocalModelOptions options;
  options.engine.attention_form = *form;
  options.log_progress = true;
  if (auto s = RemoteOptions(*flags, &options); !s.ok()) return Fail(s);
  auto device = ParseDevice(*flags);
  if (!device.ok()) return Fail(device.status());
  if (device->cuda && flags->Has("attention")) {
    return Fail(absl::InvalidArgumentError(
        "--attention: the GPU engine has one form per phase (absorbed decode, naive prefill)"));
  }
  auto model = DeviceModel::Load(dir, options, *device, PoolFor(tokens.size()));
  if (!model.ok()) return Fail(model.status());
  auto logits = (*model)->engine().Forward(tokens);
  if (!logits.ok()) return Fail(logits.status());
  const int64_t v = (*model)->engine().config().vocab_size;
  const int64_t t = static_cast<int64_t>(tokens.size());
  if (flags->Has("out")) {
    const std::string out = flags->StringOr("out", "");
    if (auto s = WriteNpyFloat32(out, {t, v}, logits->data()); !s.ok()) return Fail(s);
    std::printf("wrote logits [%lld, %lld] to %s\n", static_cast<long long>(t),
                static_cast<long long>(v), out.c_str());
    return 0;
  }
  std::printf("position token argmax logit\n");
  for (int64_t i = 0; i < t; ++i) {
    const float* row = logits->data() + i * v;
    const int32_t best = ArgMax(row, v);
    std::printf("%8lld %5d %6d %.6f\n", static_cast<long long>(i), tokens[static_cast<size_t>(i)],
                best, row[best]);
  }
  return 0;
}

// The sampling and length flags of `dmoe generate --model`.
absl::StatusOr<GenerateOptions> ParseGenerateOptions(const Flags& f) {
  GenerateOptions g;
  ASSIGN_OR_RETURN(g.max_tokens, f.Int("max-tokens", 16));
  ASSIGN_OR_RETURN(g.temperature, f.Double("temperature", 0.0));
  ASSIGN_OR_RETURN(int64_t seed, f.Int("seed", 0));
  ASSIGN_OR_RETURN(g.prefill_chunk, f.Int("prefill-chunk", 0));
  ASSIGN_OR_RETURN(int64_t stop, f.Int("stop-token", -1));
  ASSIGN_OR_RETURN(g.top_k, f.Int("top-k", 0));
  ASSIGN_OR_RETURN(g.top_p, f.Double("top-p", 1.0));
  ASSIGN_OR_RETURN(g.min_p, f.Double("min-p", 0.0));
  if (g.max_tokens <= 0) return absl::InvalidArgumentError("--max-tokens: must be positive");
  if (g.temperature < 0) return absl::InvalidArgumentError("--temperature: must be >= 0");
  if (g.prefill_chunk < 0) return absl::InvalidArgumentError("--prefill-chunk: must be >= 0");
  g.seed = static_cast<uint64_t>(seed);
  g.stop_token = static_cast<int32_t>(stop);
  g.ignore_eos = f.Bool("ignore-eos");
  return g;
}

int GenerateCmd(int argc, char** argv) {
  auto flags =
      Flags::Parse(argc, argv,
                   WithRemote({"model", "tokens", "max-tokens", "temperature", "seed",
                               "prefill-chunk", "stop-token", "top-k", "top-p", "min-p", "target",
                               "api-key", "timeout-ms", "stop", "logprobs", "device", "gpu"}),
                   {"print-token-ids", "ignore-eos"});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::printf(kGenerateHelp, kRemoteHelp, DeviceHelp(23).c_str());
    return 0;
  }
  if (flags->Has("target")) {
    if (flags->Has("device") || flags->Has("gpu")) {
      return Fail(absl::InvalidArgumentError("--device and --gpu need --model (a local run)"));
    }
    // A client of a dmoe-gateway: TEXT as a positional argument, or --tokens.
    if (flags->Has("tokens")) {
      auto ids = ParseTokenList("tokens", flags->StringOr("tokens", ""));
      if (!ids.ok()) return Fail(ids.status());
      return GenerateViaGateway(*flags, "", &*ids);
    }
    if (flags->positional().size() != 1) {
      return Fail(absl::InvalidArgumentError("with --target give the prompt TEXT or --tokens"));
    }
    return GenerateViaGateway(*flags, flags->positional()[0], nullptr);
  }
  std::string dir;
  std::vector<int32_t> tokens;
  if (auto st = ModelAndTokens(*flags, &dir, &tokens); !st.ok()) return Fail(st);
  auto g = ParseGenerateOptions(*flags);
  if (!g.ok()) return Fail(g.status());
  if (flags->Has("logprobs") || flags->Has("stop") || flags->Has("api-key") ||
      flags->Has("timeout-ms")) {
    return Fail(absl::InvalidArgumentError(
        "--logprobs, --stop, --api-key and --timeout-ms need --target (a gateway)"));
  }
  const bool quiet = flags->Bool("print-token-ids");
  LocalModelOptions options;
  options.log_progress = !quiet;
  if (auto s = RemoteOptions(*flags, &options); !s.ok()) return Fail(s);
  auto device = ParseDevice(*flags);
  if (!device.ok()) return Fail(device.status());
  auto model = DeviceModel::Load(dir, options, *device,
                                 PoolFor(tokens.size() + static_cast<size_t>(g->max_tokens)));
  if (!model.ok()) return Fail(model.status());
  const auto start = std::chrono::steady_clock::now();
  auto out = Generate((*model)->engine(), tokens, *g);
  if (!out.ok()) return Fail(out.status());
  std::printf("%s\n", absl::StrJoin(*out, ",").c_str());
  if (!quiet) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "generated %zu tokens in %.3f s\n", out->size(), s);
  }
  return 0;
}

int MakeTinyModel(int argc, char** argv) {
  auto flags = Flags::Parse(argc, argv, {"preset", "seed", "dtype", "shards", "vocab-size"}, {});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kMakeTinyHelp, stdout);
    return 0;
  }
  if (flags->positional().size() != 1) {
    return Fail(absl::InvalidArgumentError("expected exactly one output directory (OUT)"));
  }
  auto config = PresetConfig(flags->StringOr("preset", "tiny"));
  if (!config.ok()) return Fail(config.status());
  auto vocab = flags->Int("vocab-size", config->vocab_size);
  if (!vocab.ok()) return Fail(vocab.status());
  if (*vocab <= 0 || *vocab > (1 << 24)) {
    return Fail(absl::InvalidArgumentError("--vocab-size: must be in [1, 16777216]"));
  }
  config->vocab_size = *vocab;
  TinyModelOptions o;
  auto seed = flags->Int("seed", 0);
  if (!seed.ok()) return Fail(seed.status());
  o.seed = static_cast<uint64_t>(*seed);
  const std::string dtype = flags->StringOr("dtype", "f32");
  if (dtype == "f32") {
    o.dtype = DType::kF32;
  } else if (dtype == "bf16") {
    o.dtype = DType::kBF16;
  } else if (dtype == "fp8") {
    o.dtype = DType::kF8E4M3;
  } else {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--dtype: \"", dtype, "\" is not f32, bf16 or fp8")));
  }
  auto shards = flags->Int("shards", 1);
  if (!shards.ok()) return Fail(shards.status());
  if (*shards < 1 || *shards > 99999) {
    return Fail(absl::InvalidArgumentError("--shards: must be in [1, 99999]"));
  }
  o.shards = static_cast<int>(*shards);
  const std::string out = flags->positional()[0];
  if (auto s = WriteTinyModel(out, *config, o); !s.ok()) return Fail(s);
  std::printf("wrote %s model (%s, seed %llu, %d file(s)) to %s\n",
              flags->StringOr("preset", "tiny").c_str(), dtype.c_str(),
              static_cast<unsigned long long>(o.seed), o.shards, out.c_str());
  return 0;
}

int Chat(int argc, char** argv) {
  auto flags =
      Flags::Parse(argc, argv,
                   {"target", "system", "max-tokens", "temperature", "seed", "top-k", "top-p",
                    "min-p", "stop", "stop-token", "api-key", "timeout-ms", "logprobs"},
                   {"ignore-eos"});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kChatHelp, stdout);
    return 0;
  }
  auto target = flags->String("target");
  if (!target.ok()) return Fail(target.status());
  if (flags->positional().size() != 1) {
    return Fail(absl::InvalidArgumentError("expected one MESSAGE"));
  }
  std::vector<std::pair<std::string, std::string>> turns;
  if (flags->Has("system")) turns.emplace_back("system", flags->StringOr("system", ""));
  turns.emplace_back("user", flags->positional()[0]);
  return ChatViaGateway(*flags, turns);
}

int Tokenize(int argc, char** argv) {
  auto flags = Flags::Parse(argc, argv, {"tokenizer", "jsonl"}, {"decode"});
  if (!flags.ok()) return Fail(flags.status());
  if (flags->help()) {
    std::fputs(kTokenizeHelp, stdout);
    return 0;
  }
  auto path = flags->String("tokenizer");
  if (!path.ok()) return Fail(path.status());
  auto input = flags->String("jsonl");
  if (!input.ok()) return Fail(input.status());
  auto tok = Tokenizer::FromFile(*path);
  if (!tok.ok()) return Fail(tok.status());
  std::ifstream file;
  if (*input != "-") {
    file.open(*input, std::ios::binary);
    if (!file) return Fail(absl::NotFoundError(absl::StrCat("--jsonl: cannot open ", *input)));
  }
  std::istream& in = *input == "-" ? std::cin : file;
  const bool decode = flags->Bool("decode");
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (decode) {
      if (j.is_discarded() || !j.is_array()) {
        return Fail(
            absl::InvalidArgumentError(absl::StrCat("--jsonl line ", n, ": not a JSON array")));
      }
      std::vector<int32_t> ids;
      for (const auto& v : j) {
        if (!v.is_number_integer()) {
          return Fail(absl::InvalidArgumentError(absl::StrCat("--jsonl line ", n, ": not an id")));
        }
        ids.push_back(v.get<int32_t>());
      }
      const std::string text = (*tok)->Decode(ids);
      std::printf("%s\n", nlohmann::json(text)
                              .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                              .c_str());
    } else {
      if (j.is_discarded() || !j.is_string()) {
        return Fail(
            absl::InvalidArgumentError(absl::StrCat("--jsonl line ", n, ": not a JSON string")));
      }
      std::printf("%s\n", nlohmann::json((*tok)->Encode(j.get<std::string>())).dump().c_str());
    }
  }
  return 0;
}

}  // namespace
}  // namespace dmoe::cli

int main(int argc, char** argv) {
  using namespace dmoe::cli;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "version") return dmoe::PrintVersion("dmoe");
  // The subcommands that load weights in this process (common/huge_pages.h); `up` / `serve`
  // start dmoe-expert and dmoe-attention, which do it themselves (router and gateway do not).
  if (cmd == "logits" || cmd == "generate") dmoe::ReexecForHugePageMalloc(argv);
  if (cmd == "logits") return Logits(argc - 2, argv + 2);
  if (cmd == "generate") return GenerateCmd(argc - 2, argv + 2);
  if (cmd == "make-tiny-model") return MakeTinyModel(argc - 2, argv + 2);
  if (cmd == "tokenize") return Tokenize(argc - 2, argv + 2);
  if (cmd == "chat") return Chat(argc - 2, argv + 2);
  if (cmd == "up") return Up(argc - 2, argv + 2);
  if (cmd == "serve") return Serve(argc - 2, argv + 2);
  if (cmd == "bench") return Bench(argc - 2, argv + 2);
  if (cmd == "down") return Down(argc - 2, argv + 2);
  std::fprintf(stderr, "error: unknown command \"%s\"\n\n%s", cmd.c_str(), kUsage);
  return 2;
}
