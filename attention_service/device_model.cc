#include "attention_service/device_model.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "transport/ucx.h"

namespace dmoe {

absl::StatusOr<std::unique_ptr<DeviceModel>> DeviceModel::Load(const std::string& dir,
                                                               LocalModelOptions options,
                                                               const DeviceChoice& device,
                                                               CudaEngineOptions kv) {
  std::unique_ptr<DeviceModel> m(new DeviceModel());
  const bool remote = !options.expert_shards.empty() || !options.shard_client.router.empty();
  if (device.cuda) {
    // Before loading gigabytes: fail fast without a device.
    const cuda::DeviceProbe probe = cuda::Probe();
    if (probe.count == 0)
      return absl::UnavailableError(absl::StrCat("--device cuda: ", probe.reason));
    if (!remote) {
      ASSIGN_OR_RETURN(ModelConfig c, LoadModelConfig(dir));
      ASSIGN_OR_RETURN(m->gpu_experts_, CudaExperts::Create(c, device.gpu));
      options.expert_accelerator = m->gpu_experts_.get();
    }
  }
  ASSIGN_OR_RETURN(m->model_, LocalModel::Load(dir, options));
  if (m->gpu_experts_ != nullptr) {  // in-process experts: on the GPU before the first request
    RETURN_IF_ERROR(m->gpu_experts_->Preload(m->model_->experts(), /*log_progress=*/true));
  }
  if (device.cuda) {
    kv.device = device.gpu;
    ASSIGN_OR_RETURN(m->gpu_, CudaEngine::Create(m->model_->config(), m->model_->dense(),
                                                 m->model_->routed_experts(), kv));
    // (Probe names device 0.)
    const std::string name = device.gpu == 0 ? " " + cuda::Probe().name : "";
    std::fprintf(stderr,
                 "device: cuda:%d%s; weights %.1f MiB and KV pool %.1f MiB on it; experts %s\n",
                 device.gpu, name.c_str(), m->gpu_->weight_bytes() / 1048576.0,
                 m->gpu_->kv_bytes() / 1048576.0, remote ? "on the shards" : "on the same GPU");
    if (remote) {
      auto cuda_memory = transport::UcxSupportsCudaMemory();
      std::fprintf(stderr,
                   "hidden rows to the shards: through page-locked host buffers (UCX CUDA "
                   "memory: %s)\n",
                   !cuda_memory.ok() ? std::string(cuda_memory.status().message()).c_str()
                   : *cuda_memory    ? "supported by this UCX, not used yet"
                                     : "not supported by this UCX build");
    }
  }
  return m;
}

}  // namespace dmoe
