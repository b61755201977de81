// Routed experts on a CUDA device: an ExpertAccelerator (routed_experts.h) holding each expert's
// weights in device memory (bf16 as a bf16 checkpoint holds them, else fp32), copied from the
// ExpertStore by Preload or the first time the expert is used (and freed once the store no
// longer has it),
// and computing each group of rows with cuda::ExpertFfn (cuBLAS). Rows cross from and to host
// memory. Used by LocalRoutedExperts (in-process experts of a GPU run) and by an expert shard's
// batcher (dmoe-expert --device cuda).
//
// Built twice: against //kernels/cuda (the GPU) and //kernels/cuda:host (the same kernel API on
// the host), so that its logic is tested on machines without a GPU.
#ifndef DMOE_MODEL_CUDA_EXPERTS_H_
#define DMOE_MODEL_CUDA_EXPERTS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_ffn.h"
#include "model/config.h"
#include "model/routed_experts.h"
#include "model/weights.h"

namespace dmoe {

// A linear weight in device memory, row-major [out, in]: bf16 bits when it is held as bf16 and
// `keep_bf16` (*bf16 = true), else fp32 (8-bit weights dequantized). Host memory holds one
// matrix's conversion at a time.
absl::StatusOr<cuda::DeviceBuffer> UploadLinear(const LinearWeight& w, bool keep_bf16, bool* bf16);

class CudaExperts : public ExpertAccelerator {
 public:
  // UNAVAILABLE without a usable device (cuda::Probe's reason); INVALID_ARGUMENT for a device
  // number it does not have. `keep_bf16`: bf16 experts stay bf16 on the device (half the memory;
  // their products round the activations to bf16), else everything is fp32 there.
  static absl::StatusOr<std::unique_ptr<CudaExperts>> Create(const ModelConfig& c, int device,
                                                             bool keep_bf16 = true);
  absl::Status Run(const ExpertStore& store, const std::vector<ExpertGroup>& groups, const float* x,
                   int64_t rows, float* y) override;
  std::string name() const override { return name_; }
  // Copies every expert `store` holds to the device now instead of at its first use (then the
  // first requests run at speed, and a device too small fails at start, naming the expert);
  // with `log_progress`, LoadProgress lines on stderr. Experts the store gains later are still
  // copied on first use.
  absl::Status Preload(const ExpertStore& store, bool log_progress = false);
  // Experts held on the device, and their bytes.
  size_t experts() const { return on_device_.size(); }
  uint64_t device_bytes() const { return device_bytes_; }

 private:
  struct Held {
    cuda::DeviceBuffer gate, up, down;
    bool bf16 = false;
  };
  CudaExperts() = default;
  // The device copy of (layer, expert), made from the store's weights on first use.
  absl::StatusOr<cuda::ExpertWeights> Weights(const ExpertStore& store, int64_t layer,
                                              int64_t expert);
  void Forget(const ExpertStore& store);

  int64_t hidden_ = 0, width_ = 0;
  int device_ = 0;
  bool keep_bf16_ = true;
  std::string name_;
  cuda::Blas blas_;
  std::map<std::pair<int64_t, int64_t>, Held> on_device_;
  const ExpertStore* last_store_ = nullptr;  // the store on_device_ was checked against
  uint64_t device_bytes_ = 0;
  cuda::DeviceBuffer x_, y_, scratch_;
};

}  // namespace dmoe

#endif  // DMOE_MODEL_CUDA_EXPERTS_H_
