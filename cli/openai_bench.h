// `dmoe bench`: a load generator against an OpenAI-compatible endpoint (or dmoe's gRPC API), in
// the style of vLLM's benchmarks/benchmark_serving.py. Prints TTFT / TPOT / ITL / end-to-end
// latency percentiles and throughput; `dmoe bench --help` documents the flags.
#ifndef DMOE_CLI_OPENAI_BENCH_H_
#define DMOE_CLI_OPENAI_BENCH_H_

namespace dmoe::cli {

// `argv` are the flags after the word `bench`. Returns the process exit code: 0 when at least one
// request succeeded, 1 when none did (or the server could not be used), 2 for a bad flag.
int Bench(int argc, char** argv);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_OPENAI_BENCH_H_
