// A model loaded for one device: the LocalModel (checkpoint, weights on the host, routed experts
// in-process or on shards) and the engine that runs it — its CPU Engine, or with --device cuda a
// CudaEngine over the same dense weights and routed experts, the in-process experts computing on
// the same GPU (CudaExperts). What `dmoe logits/generate` and dmoe-attention run.
#ifndef DMOE_ATTENTION_SERVICE_DEVICE_MODEL_H_
#define DMOE_ATTENTION_SERVICE_DEVICE_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "attention_service/cuda_engine.h"
#include "attention_service/local_model.h"
#include "common/device_flags.h"
#include "model/cuda_experts.h"

namespace dmoe {

class DeviceModel {
 public:
  // `kv` sizes the GPU engine's KV pool (unused on the CPU, where caches are the caller's).
  // Logs one line naming the device when it is a GPU.
  static absl::StatusOr<std::unique_ptr<DeviceModel>> Load(const std::string& dir,
                                                           LocalModelOptions options,
                                                           const DeviceChoice& device,
                                                           CudaEngineOptions kv = {});
  LocalModel& model() { return *model_; }
  StepEngine& engine() { return gpu_ ? static_cast<StepEngine&>(*gpu_) : model_->engine(); }
  // The GPU engine, or null on the CPU.
  CudaEngine* gpu() { return gpu_.get(); }

 private:
  DeviceModel() = default;
  std::unique_ptr<CudaExperts> gpu_experts_;  // outlives model_ (its experts point here)
  std::unique_ptr<LocalModel> model_;
  std::unique_ptr<CudaEngine> gpu_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_DEVICE_MODEL_H_
