// Random-weight checkpoints in the exact Hugging Face layout, for tests, benchmarks and the demo.
// Presets and the weight scale rule are MODEL_SPEC.md's "Test presets".
#ifndef DMOE_MODEL_TINY_MODEL_H_
#define DMOE_MODEL_TINY_MODEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "model/config.h"

namespace dmoe {

// "tiny", "tiny-lite", "tiny-v3" (V3 gating and an MTP layer), "tiny-demo" (tiny with the
// DeepSeek-V3 vocabulary size), "small" or "small-v3" (small with tiny-v3's changes: the
// speculative-decoding benchmark's model), or "v2-lite-4l" (for benchmarks: DeepSeek-V2-Lite's
// layer shapes (hidden 2048, 16 heads, no q LoRA, latent 512, 64 experts of 1408 + 2 shared,
// greedy top-6, dense layer 0 of 10944) in 4 layers with a 32000 vocabulary; 2.0 B parameters).
absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset);

struct TinyModelOptions {
  uint64_t seed = 0;
  // kF32, kBF16, or kF8E4M3: *_proj.weight tensors in fp8 with 128x128 block scales
  // ("<name>_scale_inv", F32) as DeepSeek-V3 ships them, the other tensors in BF16.
  DType dtype = DType::kF32;
  int shards = 1;  // > 1 writes model-0000i-of-0000N.safetensors + index
};

// Writes config.json and the safetensors file(s) into `out_dir` (created if missing). Each tensor's
// values depend only on (seed, tensor name), so every dtype/sharding of one seed holds the same
// draws (bf16 = round-to-nearest-even of the f32 draw).
absl::Status WriteTinyModel(const std::string& out_dir, const ModelConfig& config,
                            const TinyModelOptions& options);

// The tensors of a full checkpoint for `config`, in file order, with their shapes.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> CheckpointTensors(const ModelConfig& config);

}  // namespace dmoe

#endif  // DMOE_MODEL_TINY_MODEL_H_
