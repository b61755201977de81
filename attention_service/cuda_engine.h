// The layer loop of Engine (engine.h) on a CUDA device: the dense weights in device memory (fp32,
// or bf16 as a bf16 checkpoint holds them), the latent KV cache as a device block pool with
// LatentKvCache's accounting (the same block ids, prefix keys and RESOURCE_EXHAUSTED as the CPU
// cache), attention in the absorbed form over the paged pool for prompt and decode rows alike
// (cuda::MlaDecodeAbsorbed; the naive form is the opt-in naive_prefill), every product through
// the batch-invariant GEMM (kernels/cuda/gemm.cu; cuBLAS is the opt-in cublas_gemms). A
// sequence's logits are thus the same bits whatever else is in the step and however its prompt
// was cut into chunks. Routed experts go through a RoutedExperts backend on
// the host (in-process CPU experts or remote shards: hidden rows cross through host memory), so a
// GPU attention node works with any expert shard.
//
// A DeepSeek-V3 checkpoint runs without its MTP layer (has_mtp() is false: no speculative
// decoding on the GPU yet).
//
// Built twice: against //kernels/cuda (the GPU) and against //kernels/cuda:host (the same kernel
// API run on the host), so that its own logic is tested on machines without a GPU.
#ifndef DMOE_ATTENTION_SERVICE_CUDA_ENGINE_H_
#define DMOE_ATTENTION_SERVICE_CUDA_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_service/engine.h"
#include "attention_service/kv_cache.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_ffn.h"
#include "model/config.h"
#include "model/routed_experts.h"
#include "model/weights.h"

namespace dmoe {

struct CudaEngineOptions {
  int device = 0;             // the CUDA device (--gpu)
  int64_t block_tokens = 16;  // KV pool: tokens per block
  int64_t kv_blocks = 256;    // KV pool: blocks (all layers' rows of block_tokens tokens each)
  cpu::KvDType kv_dtype = cpu::KvDType::kF32;
  // Projections, lm_head and the embedding held as bf16 on the host (a bf16 checkpoint) stay bf16
  // on the device: half the memory; their products round the activations to bf16 (compare with
  // the CPU within 1e-2, not 1e-4). false: fp32 everywhere.
  bool keep_bf16 = true;
  // Prompt rows attend in the absorbed form, each a query over its own position's cached rows, as
  // decode rows do (and as the CPU engine does): a position's bits never depend on how the
  // scheduler cut the prompt into chunks, which the other sequences' share of a step decides.
  // true: multi-token chunks take the naive form instead (K/V
  // expanded through kv_b; less work for long prompts), whose bits differ from the absorbed
  // form's, so a position's result then depends on its chunk.
  bool naive_prefill = false;
  // The naive form expands K/V and computes the scores of as many heads at once as fit in this
  // many floats (at least one head); the absorbed form takes as many query rows at once as
  // their partial sums fit in.
  int64_t prefill_score_floats = int64_t{1} << 26;  // 256 MiB
  // Every product through cuBLAS instead of the batch-invariant GEMM (cuda::Blas::set_cublas):
  // faster for large batches, but a sequence's logits then change with the batch around it.
  bool cublas_gemms = false;
};

// Thread-compatible: one Step at a time.
class CudaEngine : public StepEngine {
 public:
  // Uploads the weights (any held format: converted to fp32 on the way) and allocates the pool.
  // UNAVAILABLE without a usable device (the reason from cuda::Probe).
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(const ModelConfig& c,
                                                            const DenseWeights& w,
                                                            RoutedExperts* experts,
                                                            const CudaEngineOptions& options);
  ~CudaEngine() override;
  const ModelConfig& config() const override { return config_; }
  // The pool's accounting: sequences are PagedKvSequence over it.
  LatentKvCache& cache() { return *cache_; }
  // Device bytes held by weights and by the KV pool.
  uint64_t weight_bytes() const { return weight_bytes_; }
  uint64_t kv_bytes() const { return pool_.bytes(); }

  // As Engine::Step. Every cache must be a PagedKvSequence over cache() (FAILED_PRECONDITION
  // otherwise); SequenceStep::hidden is not supported (UNIMPLEMENTED).
  absl::Status Step(std::vector<SequenceStep>& batch,
                    std::vector<std::vector<float>>* logits) override;
  // One causal forward of `tokens` from an empty sequence: logits [T, V].
  absl::StatusOr<std::vector<float>> Forward(const std::vector<int32_t>& tokens) override;
  // A PagedKvSequence over cache().
  std::unique_ptr<KvSequence> NewSequence() override;
  uint64_t expert_tokens(int64_t layer, int64_t expert) const override {
    return expert_tokens_[static_cast<size_t>(layer * config_.n_routed_experts + expert)].load(
        std::memory_order_relaxed);
  }

 private:
  struct DeviceLayer;
  struct Plan;
  CudaEngine() = default;
  absl::Status Upload(const DenseWeights& w);
  absl::Status Prepare(std::vector<SequenceStep>& batch, int64_t n, Plan* plan);
  absl::Status Layer(int64_t l, const Plan& plan);
  absl::Status Attention(int64_t l, const Plan& plan);
  absl::Status Prefill(const cpu::MlaParams& p, const cuda::LatentPool& pool, const Plan& plan,
                       size_t seq);
  absl::Status Mlp(const DeviceLayer& dl, bool shared, int64_t n, float* out);
  absl::Status Moe(int64_t l, const Plan& plan);
  absl::Status Logits(std::vector<SequenceStep>& batch, const Plan& plan,
                      std::vector<std::vector<float>>* logits);
  cpu::MlaParams MlaParamsOf(int64_t l) const;
  cuda::LatentPool PoolOf(int64_t l) const;
  // A device scratch buffer of at least `floats` floats (grown, never shrunk).
  absl::StatusOr<float*> Scratch(cuda::DeviceBuffer& b, int64_t floats);

  ModelConfig config_;
  RoutedExperts* experts_ = nullptr;
  CudaEngineOptions options_;
  cpu::GateParams gate_;
  cuda::Blas blas_;
  cuda::RopeTable rope_;
  std::vector<cuda::DeviceBuffer> weights_;  // every uploaded tensor
  std::vector<DeviceLayer> layers_;
  cuda::DeviceWeight embed_, lm_head_;
  const float* final_norm_ = nullptr;
  uint64_t weight_bytes_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> expert_tokens_;
  std::unique_ptr<LatentKvCache> cache_;
  cuda::DeviceBuffer pool_;
  // Per-step device scratch.
  cuda::DeviceBuffer ints_, h_, x_, tmp_, q_, qa_, kva_, attn_, lat_, kv_, scores_, router_,
      gate_w_, mlp_, mla_scratch_, final_, logits_;
  // Per-step page-locked host scratch: the rows to and from the routed experts.
  cuda::PinnedBuffer staging_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_CUDA_ENGINE_H_
