// JSON mode's cost per sequence and token (Google Benchmark): JsonMask over a real vocabulary
// (DeepSeek-V3's 129280 tokens), at the states an answer passes through, on the scheduler's one
// thread, beside which a decode step of the model runs. Inside a string most tokens are plain
// text, taken without being read (JsonVocab). The tokenizer: $DMOE_TOKENIZER_DIR (a
// folder with tokenizer.json; default: the copy scripts/fetch_tokenizer.sh puts in
// .cache/npm/package/models).
//   bazel run -c opt //bench:json_mask_bench
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention_service/json_constraint.h"

namespace dmoe {
namespace {

const std::vector<std::string>& Texts() {
  static const std::vector<std::string>* texts = [] {
    const char* env = std::getenv("DMOE_TOKENIZER_DIR");
    const char* ws = std::getenv("BUILD_WORKSPACE_DIRECTORY");
    const std::string dir =
        env != nullptr ? env : std::string(ws != nullptr ? ws : ".") + "/.cache/npm/package/models";
    auto t = TokenTextsFromDir(dir, 129280);
    if (!t.ok()) {
      std::fprintf(stderr, "%s (run scripts/fetch_tokenizer.sh or set DMOE_TOKENIZER_DIR)\n",
                   t.status().ToString().c_str());
      std::exit(2);
    }
    return new std::vector<std::string>(*std::move(t));
  }();
  return *texts;
}

void BM_JsonMask(benchmark::State& state, const char* prefix) {
  const JsonVocab texts(&Texts());
  JsonState s;
  if (!s.Feed(prefix)) state.SkipWithError("the prefix is not JSON");
  std::vector<uint8_t> allowed;
  int64_t n = 0;
  for (auto _ : state) {
    JsonMask(s, texts, {1}, &allowed);
    benchmark::DoNotOptimize(allowed.data());
  }
  for (uint8_t a : allowed) n += a;
  state.counters["allowed"] = static_cast<double>(n);
}

BENCHMARK_CAPTURE(BM_JsonMask, start, "")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_JsonMask, key, "{\"na")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_JsonMask, value, "{\"name\": ")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_JsonMask, number, "{\"n\": 12")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_JsonMask, after_value, "{\"n\": [1, \"x\"]")->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace dmoe

BENCHMARK_MAIN();
