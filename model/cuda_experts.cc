#include "model/cuda_experts.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "model/load_progress.h"

namespace dmoe {

absl::StatusOr<cuda::DeviceBuffer> UploadLinear(const LinearWeight& w, bool keep_bf16, bool* bf16) {
  LinearWeight f = w;  // row-major fp32 (unpacked, dequantized)
  f.ConvertTo(cpu::WeightFormat::kF32);
  *bf16 = keep_bf16 && w.format == cpu::WeightFormat::kBf16;
  if (*bf16) {
    std::vector<uint16_t> h(f.w.size());
    FloatToBf16N(f.w.data(), f.w.size(), h.data());  // exact: the values came from bf16
    ASSIGN_OR_RETURN(cuda::DeviceBuffer b, cuda::DeviceBuffer::Alloc(h.size() * 2));
    RETURN_IF_ERROR(b.Upload(h.data(), h.size() * 2));
    return b;
  }
  ASSIGN_OR_RETURN(cuda::DeviceBuffer b, cuda::DeviceBuffer::Alloc(f.w.size() * 4));
  RETURN_IF_ERROR(b.Upload(f.w.data(), f.w.size() * 4));
  return b;
}

absl::StatusOr<std::unique_ptr<CudaExperts>> CudaExperts::Create(const ModelConfig& c, int device,
                                                                 bool keep_bf16) {
  const cuda::DeviceProbe probe = cuda::Probe();
  if (probe.count == 0) return absl::UnavailableError(probe.reason);
  if (device < 0 || device >= probe.count) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu ", device, ": ", probe.count, " usable CUDA device(s)"));
  }
  RETURN_IF_ERROR(cuda::SetDevice(device));
  std::unique_ptr<CudaExperts> e(new CudaExperts());
  e->hidden_ = c.hidden_size;
  e->width_ = c.moe_intermediate_size;
  e->device_ = device;
  e->keep_bf16_ = keep_bf16;
  e->name_ = device == 0 ? absl::StrCat("cuda:0 (", probe.name, ")")  // Probe names device 0
                         : absl::StrCat("cuda:", device);
  ASSIGN_OR_RETURN(e->blas_, cuda::Blas::Create(nullptr));
  return e;
}

absl::StatusOr<cuda::ExpertWeights> CudaExperts::Weights(const ExpertStore& store, int64_t layer,
                                                         int64_t expert) {
  auto it = on_device_.find({layer, expert});
  if (it == on_device_.end()) {
    const MlpWeights* m = store.Find(layer, expert);
    if (m == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("expert ", expert, " of layer ", layer, " is not hosted here"));
    }
    Held held;
    uint64_t bytes = 0;  // counted once all three are on the device
    for (auto [src, dst] :
         {std::pair<const LinearWeight*, cuda::DeviceBuffer*>{&m->gate, &held.gate},
          {&m->up, &held.up},
          {&m->down, &held.down}}) {
      ASSIGN_OR_RETURN(*dst, UploadLinear(*src, keep_bf16_, &held.bf16));
      bytes += dst->bytes();
    }
    device_bytes_ += bytes;
    it = on_device_.emplace(std::make_pair(layer, expert), std::move(held)).first;
  }
  cuda::ExpertWeights w;
  w.gate = it->second.gate.get();
  w.up = it->second.up.get();
  w.down = it->second.down.get();
  w.bf16 = it->second.bf16;
  return w;
}

// A shard's store changes with its placement: the device copies of experts it no longer hosts
// are freed.
void CudaExperts::Forget(const ExpertStore& store) {
  for (auto it = on_device_.begin(); it != on_device_.end();) {
    if (store.Find(it->first.first, it->first.second) != nullptr) {
      ++it;
      continue;
    }
    device_bytes_ -= it->second.gate.bytes() + it->second.up.bytes() + it->second.down.bytes();
    it = on_device_.erase(it);
  }
  last_store_ = &store;
}

absl::Status CudaExperts::Preload(const ExpertStore& store, bool log_progress) {
  RETURN_IF_ERROR(cuda::SetDevice(device_));
  if (&store != last_store_) Forget(store);
  const std::vector<std::pair<int64_t, int64_t>> keys = store.Keys();
  std::optional<LoadProgress> progress;  // counts the experts' bytes as the store holds them
  if (log_progress) {
    progress.emplace(absl::StrCat("experts to ", name_), keys.size(), store.bytes());
  }
  for (const auto& [layer, expert] : keys) {
    if (auto w = Weights(store, layer, expert); !w.ok()) {
      return absl::Status(w.status().code(),
                          absl::StrCat("copying expert ", expert, " of layer ", layer, " to ",
                                       name_, ": ", w.status().message()));
    }
    if (progress) {
      const MlpWeights* m = store.Find(layer, expert);
      progress->Add(m->gate.bytes() + m->up.bytes() + m->down.bytes());
    }
  }
  if (progress) progress->Done();
  return absl::OkStatus();
}

absl::Status CudaExperts::Run(const ExpertStore& store, const std::vector<ExpertGroup>& groups,
                              const float* x, int64_t rows, float* y) {
  if (rows <= 0) return absl::OkStatus();
  RETURN_IF_ERROR(cuda::SetDevice(device_));
  if (&store != last_store_) Forget(store);
  std::vector<cuda::ExpertWeights> weights;
  std::vector<int64_t> offsets;
  for (const ExpertGroup& g : groups) {
    if (!offsets.empty() && g.first != offsets.back()) {
      return absl::InvalidArgumentError("CudaExperts::Run: groups must cover the rows in order");
    }
    ASSIGN_OR_RETURN(cuda::ExpertWeights w, Weights(store, g.layer, g.expert));
    weights.push_back(w);
    if (offsets.empty()) offsets.push_back(g.first);
    offsets.push_back(g.first + g.rows);
  }
  if (offsets.empty() || offsets.front() != 0 || offsets.back() != rows) {
    return absl::InvalidArgumentError("CudaExperts::Run: groups must cover the rows in order");
  }
  const size_t bytes = static_cast<size_t>(rows * hidden_) * sizeof(float);
  RETURN_IF_ERROR(x_.Reserve(bytes));
  RETURN_IF_ERROR(y_.Reserve(bytes));
  RETURN_IF_ERROR(scratch_.Reserve(static_cast<size_t>(2 * rows * width_) * sizeof(float)));
  RETURN_IF_ERROR(x_.Upload(x, bytes));
  RETURN_IF_ERROR(cuda::ExpertFfn(blas_, weights, offsets, hidden_, width_, x_.as<float>(),
                                  y_.as<float>(), scratch_.as<float>()));
  RETURN_IF_ERROR(cuda::Synchronize());
  return y_.Download(y, bytes);
}

}  // namespace dmoe
