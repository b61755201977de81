// Speculative decoding benchmark (MTP drafts): prints figures, passes/fails nothing.
//
// With random weights the MTP layer's drafts are almost never right, so the acceptance rate
// means nothing; this measures the mechanics instead. Decode tokens/s through the scheduler at
// batch sizes 1 and 16 (say --batches), with speculation forced to accept 100 %, 50 % and 0 % of
// the drafts (SchedulerOptions::force_accept, a benchmark-only switch) and without speculation,
// all in one run, interleaved over --rounds rounds (the best round of each is reported): the
// speedup at 100 % and the cost at 0 % are the figures.
//
//   bazel run -c opt //bench:speculative_bench -- [--presets tiny-v3,small-v3] [--batches 1,16]
//       [--tokens 48] [--context 64] [--speculative-tokens 1] [--rounds 3] [--dtype bf16]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "attention_service/kv_cache.h"
#include "attention_service/local_model.h"
#include "attention_service/scheduler.h"
#include "common/dtype.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::vector<std::string> presets = {"tiny-v3", "small-v3"};
  std::vector<int> batches = {1, 16};
  int tokens = 48;   // generated per request
  int context = 64;  // prompt tokens
  int speculative = 1;
  int rounds = 3;
  std::string dtype = "bf16";
};

struct Mode {
  const char* name;
  int64_t speculative;  // 0: off
  double force;         // < 0: the rule
};

struct Figure {
  double tokens_per_s = 0;
  double tokens_per_step = 0;  // generated per verifying sequence-step (1 without speculation)
};

// Decode tokens/s of `batch` requests after their prompts are in the cache.
Figure Decode(LocalModel& m, const Options& o, int batch, const Mode& mode) {
  const ModelConfig& c = m.config();
  SchedulerOptions so;
  so.max_running = batch;
  so.step_token_budget = 4096;
  so.prefill_chunk = 4096;
  so.speculative_tokens = mode.speculative;
  so.force_accept = mode.force;
  LatentKvCache cache(c, 16, 64 * batch + 64);
  LatentKvCache mtp_cache(Engine::MtpCacheConfig(c), 16, MtpCacheBlocks(64 * batch + 64, 16, so));
  so.mtp_cache = &mtp_cache;
  Scheduler s(&m.engine(), &cache, so);
  SamplingParams p;
  p.max_tokens = o.tokens;
  p.ignore_eos = true;
  for (int b = 0; b < batch; ++b) {
    std::vector<int32_t> prompt;
    for (int i = 0; i < o.context; ++i) {
      prompt.push_back(static_cast<int32_t>((b * 131 + i * 17 + 3) % c.vocab_size));
    }
    if (!s.Submit(prompt, p, RequestCallbacks()).ok()) std::abort();
  }
  // The first step prefills every prompt (and samples their first tokens): not timed.
  if (!s.Step().ok()) std::abort();
  const uint64_t generated0 = s.stats().generated_tokens;
  const auto t0 = Clock::now();
  for (;;) {
    auto more = s.Step();
    if (!more.ok()) std::abort();
    if (!*more) break;
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const SchedulerStats st = s.stats();
  Figure f;
  f.tokens_per_s = static_cast<double>(st.generated_tokens - generated0) / secs;
  f.tokens_per_step = st.speculative_steps > 0 ? 1.0 + static_cast<double>(st.accepted_tokens) /
                                                           static_cast<double>(st.speculative_steps)
                                               : 1.0;
  return f;
}

// Milliseconds per engine call at batch `batch` over a context of o.context tokens: a main step
// of `tokens` tokens per sequence, or an MTP step of `tokens` positions per sequence.
double StepMs(LocalModel& m, const Options& o, int batch, int tokens, bool mtp) {
  const ModelConfig& c = m.config();
  std::vector<std::unique_ptr<SequenceKvCache>> caches;
  std::vector<SequenceStep> steps(static_cast<size_t>(batch));
  std::vector<std::vector<float>> logits;
  const ModelConfig cache_config = mtp ? Engine::MtpCacheConfig(c) : c;
  for (int b = 0; b < batch; ++b) {
    caches.push_back(std::make_unique<SequenceKvCache>(cache_config));
    steps[static_cast<size_t>(b)].cache = caches.back().get();
    for (int i = 0; i < o.context; ++i) {
      steps[static_cast<size_t>(b)].tokens.push_back(static_cast<int32_t>((b * 7 + i) % 500));
    }
  }
  // Distinct tokens and hidden rows: identical ones would route to the same experts and read
  // fewer expert weights than real decoding does.
  std::vector<float> hidden(
      static_cast<size_t>(batch * std::max(o.context, tokens) * c.hidden_size));
  for (size_t i = 0; i < hidden.size(); ++i) {
    hidden[i] = static_cast<float>(((i * 2654435761u) >> 7) % 2001) / 1000.0f - 1.0f;
  }
  auto run = [&] {
    auto st =
        mtp ? m.engine().StepMtp(steps, hidden.data(), &logits) : m.engine().Step(steps, &logits);
    if (!st.ok()) std::abort();
  };
  run();  // the context
  int next = 1;
  for (auto& s : steps) {
    s.tokens.clear();
    for (int t = 0; t < tokens; ++t) s.tokens.push_back((next++ * 131 + 17) % 500);
    s.all_logits = tokens > 1;
  }
  double best = 1e30;
  for (int r = 0; r < 8; ++r) {
    const auto t0 = Clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best * 1e3;
}

void Breakdown(LocalModel& m, const Options& o) {
  std::printf("%-6s %16s %16s %16s %16s\n", "batch", "main 1 tok (ms)", "main 2 tok (ms)",
              "MTP 1 pos (ms)", "MTP 2 pos (ms)");
  for (int batch : o.batches) {
    std::printf("%-6d %16.2f %16.2f %16.2f %16.2f\n", batch, StepMs(m, o, batch, 1, false),
                StepMs(m, o, batch, 2, false), StepMs(m, o, batch, 1, true),
                StepMs(m, o, batch, 2, true));
  }
}

void RunPreset(const std::string& preset, const Options& o) {
  auto config = PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    std::exit(2);
  }
  const char* tmp = std::getenv("TMPDIR");
  const std::string dir =
      std::string(tmp ? tmp : "/tmp") + "/dmoe_speculative_bench_" + preset + "_" + o.dtype;
  TinyModelOptions to;
  to.dtype = o.dtype == "f32" ? DType::kF32 : DType::kBF16;
  std::fprintf(stderr, "writing %s to %s\n", preset.c_str(), dir.c_str());
  if (auto st = WriteTinyModel(dir, *config, to); !st.ok()) std::abort();
  auto m = LocalModel::Load(dir);
  if (!m.ok()) std::abort();
  const int n = o.speculative;
  const std::vector<Mode> modes = {{"no speculation", 0, -1},
                                   {"forced 100% accepted", n, 1.0},
                                   {"forced 50% accepted", n, 0.5},
                                   {"forced 0% accepted", n, 0.0}};
  std::printf(
      "\n%s (%s weights), %d prompt tokens, %d generated per request, %d drafted per "
      "step; best of %d interleaved rounds\n",
      preset.c_str(), o.dtype.c_str(), o.context, o.tokens, n, o.rounds);
  Breakdown(**m, o);
  std::printf("%-6s %-22s %12s %14s %10s\n", "batch", "mode", "decode tok/s", "tokens/verify",
              "vs none");
  for (int batch : o.batches) {
    std::map<std::string, Figure> best;
    for (int r = 0; r < o.rounds; ++r) {
      for (const Mode& mode : modes) {
        const Figure f = Decode(**m, o, batch, mode);
        Figure& b = best[mode.name];
        if (f.tokens_per_s > b.tokens_per_s) b = f;
      }
    }
    const double none = best[modes[0].name].tokens_per_s;
    for (const Mode& mode : modes) {
      const Figure& f = best[mode.name];
      std::printf("%-6d %-22s %12.1f %14.2f %9.2fx\n", batch, mode.name, f.tokens_per_s,
                  f.tokens_per_step, f.tokens_per_s / none);
    }
  }
}

int Main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    auto ints = [&](std::vector<int>* out) {
      out->clear();
      for (absl::string_view x : absl::StrSplit(v, ',')) {
        int n = 0;
        if (!absl::SimpleAtoi(x, &n) || n <= 0) {
          std::fprintf(stderr, "%s: bad list \"%s\"\n", a.c_str(), v);
          std::exit(2);
        }
        out->push_back(n);
      }
      ++i;
    };
    auto one = [&](int* out) {
      std::vector<int> l;
      ints(&l);
      *out = l[0];
    };
    if (a == "--presets") {
      o.presets = absl::StrSplit(v, ',');
      ++i;
    } else if (a == "--batches") {
      ints(&o.batches);
    } else if (a == "--tokens") {
      one(&o.tokens);
    } else if (a == "--context") {
      one(&o.context);
    } else if (a == "--speculative-tokens") {
      one(&o.speculative);
    } else if (a == "--rounds") {
      one(&o.rounds);
    } else if (a == "--dtype" && (std::string(v) == "f32" || std::string(v) == "bf16")) {
      o.dtype = v;
      ++i;
    } else {
      std::fprintf(stderr,
                   "usage: speculative_bench [--presets tiny-v3,small-v3] [--batches 1,16] "
                   "[--tokens 48] [--context 64] [--speculative-tokens 1] [--rounds 3] "
                   "[--dtype bf16|f32]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  for (const std::string& p : o.presets) RunPreset(p, o);
  return 0;
}

}  // namespace
}  // namespace dmoe

int main(int argc, char** argv) { return dmoe::Main(argc, argv); }
