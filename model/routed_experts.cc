#include "model/routed_experts.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/qlinear.h"
#include "kernels/cpu/thread_pool.h"

namespace dmoe {

absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Load(
    const Checkpoint& ck, const ModelConfig& c,
    const std::vector<std::pair<int64_t, int64_t>>& experts, WeightDType dtype) {
  auto store = std::make_unique<ExpertStore>();
  {
    LoadScratchRelease release;  // freed before the collapse below (its peak memory)
    for (const auto& key : experts) {
      auto m = LoadExpertWeights(ck, c, key.first, key.second, dtype);
      if (!m.ok()) return m.status();
      store->experts_[key] = std::make_shared<const MlpWeights>(std::move(m).value());
    }
  }
  // After the whole load: the experts' matrices lie side by side on the heap, so the 2 MiB
  // extents around each are (mostly) other experts' weights.
  for (const auto& [_, m] : store->experts_) {
    for (const LinearWeight* w : {&m->gate, &m->up, &m->down}) w->UseHugePages();
  }
  store->BuildIndex();
  return store;
}

std::function<bool(const std::string&)> ExpertStore::TensorSelector(
    const std::vector<std::pair<int64_t, int64_t>>& experts) {
  std::set<std::string> prefixes;
  for (const auto& [layer, expert] : experts) {
    prefixes.insert(absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, "."));
  }
  return [prefixes = std::move(prefixes)](const std::string& name) {
    const size_t at = name.find(".mlp.experts.");
    if (at == std::string::npos) return false;
    const size_t end = name.find('.', at + 13);
    return end != std::string::npos && prefixes.count(name.substr(0, end + 1)) != 0;
  };
}

std::vector<std::pair<int64_t, int64_t>> ExpertStore::AllExperts(const ModelConfig& c) {
  std::vector<std::pair<int64_t, int64_t>> all;
  for (int64_t l = 0; l < c.num_expert_layers(); ++l) {
    if (!c.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < c.n_routed_experts; ++e) all.emplace_back(l, e);
  }
  return all;
}

void ExpertStore::BuildIndex() {
  int64_t layers = 0;
  index_width_ = 0;
  for (const auto& [key, _] : experts_) {
    assert(key.first >= 0 && key.second >= 0);  // LoadExpertWeights rejects others
    layers = std::max(layers, key.first + 1);
    index_width_ = std::max(index_width_, key.second + 1);
  }
  index_.assign(static_cast<size_t>(layers * index_width_), nullptr);
  for (const auto& [key, m] : experts_) {
    index_[static_cast<size_t>(key.first * index_width_ + key.second)] = m.get();
  }
}

const MlpWeights* ExpertStore::Find(int64_t layer, int64_t expert) const {
  if (layer < 0 || expert < 0 || expert >= index_width_ ||
      layer >= static_cast<int64_t>(index_.size()) / index_width_) {
    return nullptr;
  }
  return index_[static_cast<size_t>(layer * index_width_ + expert)];
}

std::vector<std::pair<int64_t, int64_t>> ExpertStore::Keys() const {
  std::vector<std::pair<int64_t, int64_t>> keys;
  for (const auto& [key, _] : experts_) keys.push_back(key);
  return keys;
}

std::unique_ptr<ExpertStore> ExpertStore::Merge(const std::set<std::pair<int64_t, int64_t>>& keep,
                                                const ExpertStore* added) const {
  auto out = std::make_unique<ExpertStore>();
  for (const auto& [key, w] : experts_) {
    if (keep.count(key)) out->experts_[key] = w;
  }
  if (added != nullptr) {
    for (const auto& [key, w] : added->experts_) out->experts_[key] = w;
  }
  out->BuildIndex();
  return out;
}

uint64_t ExpertStore::bytes() const {
  uint64_t n = 0;
  for (const auto& [_, m] : experts_) {
    n += m->gate.bytes() + m->up.bytes() + m->down.bytes();
  }
  return n;
}

// Groups the items by (layer, expert) in place (std::sort allocates nothing);
// FAILED_PRECONDITION when one is not in `store`.
absl::Status ExpertBatcher::SortAndCheck(const ExpertStore& store) {
  std::sort(items_.begin(), items_.end(), [](const Item& a, const Item& b) {
    if (a.layer != b.layer) return a.layer < b.layer;
    if (a.expert != b.expert) return a.expert < b.expert;
    return a.order < b.order;
  });
  for (size_t i = 0; i < items_.size(); ++i) {
    if ((i == 0 || items_[i].expert != items_[i - 1].expert ||
         items_[i].layer != items_[i - 1].layer) &&
        store.Find(items_[i].layer, items_[i].expert) == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("expert ", items_[i].expert, " of layer ",
                                                        items_[i].layer, " is not hosted here"));
    }
  }
  return absl::OkStatus();
}

absl::Status ExpertBatcher::Run(const ExpertStore& store, ExpertAccelerator* accelerator,
                                const std::function<void()>* first,
                                const std::function<void(int)>* tail, int tail_n) {
  if (tail == nullptr) tail_n = 0;
  const auto beside_first = [&] {  // (the accelerator's or an error's order)
    if (first != nullptr) (*first)();
    for (int i = 0; i < tail_n; ++i) (*tail)(i);
  };
  if (absl::Status st = SortAndCheck(store); !st.ok()) {
    beside_first();  // run whatever the experts' outcome
    return st;
  }
  if (accelerator != nullptr) {
    beside_first();
    return RunOn(store, accelerator);
  }
  groups_.clear();
  const size_t cap =
      std::max<size_t>(16, items_.size() / (4 * static_cast<size_t>(cpu::ThePool().size())) + 1);
  for (size_t begin = 0; begin < items_.size();) {
    size_t end = begin + 1;
    while (end < items_.size() && items_[end].layer == items_[begin].layer &&
           items_[end].expert == items_[begin].expert) {
      ++end;
    }
    // A large group is cut into row blocks (rows never interact, so any cut gives the same bits)
    // so that one busy expert does not leave the other cores idle.
    for (size_t b = begin; b < end; b += cap) groups_.emplace_back(b, std::min(end, b + cap));
    ++gemms_;
    rows_ += static_cast<uint64_t>(end - begin);
    begin = end;
  }
  // One expert (or row block) per task over every core of the kernel pool (its products run inline
  // on the thread that took it): the outputs of different experts are different rows, and an
  // expert's rows come out the same whichever thread computes them (batch invariance, DESIGN §6).
  // (the caller's tail after the experts: small pieces that fill the pass's end)
  const int extra = first != nullptr ? 1 : 0;
  const int experts = static_cast<int>(groups_.size()) + extra;
  if (first != nullptr) ++passes_with_first_;
  if (tail_n > 0) ++passes_with_tail_;
  cpu::ThePool().RunEach(experts + tail_n, [&](int g) {
    if (g < extra) {
      (*first)();
      return;
    }
    if (g >= experts) {
      (*tail)(g - experts);
      return;
    }
    const auto [begin, end] = groups_[static_cast<size_t>(g - extra)];
    const MlpWeights* m = store.Find(items_[begin].layer, items_[begin].expert);
    const int64_t n = static_cast<int64_t>(end - begin);
    thread_local std::vector<float> gathered, result, scratch;
    const size_t reserved = static_cast<size_t>(cpu::kThreadScratchRows * hidden_);
    if (gathered.capacity() < reserved) {
      gathered.reserve(reserved);
      result.reserve(reserved);
      scratch.reserve(static_cast<size_t>(2 * cpu::kThreadScratchRows * m->gate.out));
    }
    gathered.resize(static_cast<size_t>(n * hidden_));
    result.resize(static_cast<size_t>(n * hidden_));
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(gathered.data() + i * hidden_, items_[begin + static_cast<size_t>(i)].row,
                  sizeof(float) * static_cast<size_t>(hidden_));
    }
    cpu::SwiGluMlpW(gathered.data(), n, m->gate.ref(), m->up.ref(), m->down.ref(), result.data(),
                    &scratch);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(items_[begin + static_cast<size_t>(i)].out, result.data() + i * hidden_,
                  sizeof(float) * static_cast<size_t>(hidden_));
    }
  });
  return absl::OkStatus();
}

// The sorted items' rows gathered into one host batch, every (layer, expert) a group, through the
// accelerator, and scattered back.
absl::Status ExpertBatcher::RunOn(const ExpertStore& store, ExpertAccelerator* accelerator) {
  const size_t d = static_cast<size_t>(hidden_);
  accel_groups_.clear();
  accel_x_.resize(items_.size() * d);
  accel_y_.resize(items_.size() * d);
  for (size_t i = 0; i < items_.size(); ++i) {
    std::memcpy(accel_x_.data() + i * d, items_[i].row, sizeof(float) * d);
    if (i == 0 || items_[i].layer != items_[i - 1].layer ||
        items_[i].expert != items_[i - 1].expert) {
      accel_groups_.push_back(
          ExpertGroup{items_[i].layer, items_[i].expert, static_cast<int64_t>(i), 0});
      ++gemms_;
    }
    ++accel_groups_.back().rows;
  }
  rows_ += items_.size();
  if (items_.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(accelerator->Run(store, accel_groups_, accel_x_.data(),
                                   static_cast<int64_t>(items_.size()), accel_y_.data()));
  for (size_t i = 0; i < items_.size(); ++i) {
    std::memcpy(items_[i].out, accel_y_.data() + i * d, sizeof(float) * d);
  }
  return absl::OkStatus();
}

absl::Status LocalRoutedExperts::Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids,
                                       const float* w, int64_t k) {
  call_ = Call{layer, t, k, x, ids, w};
  return absl::OkStatus();
}

absl::Status LocalRoutedExperts::Finish(float* out) { return Run(nullptr, out); }

absl::Status LocalRoutedExperts::FinishWithTail(const std::function<void(int)>& tail, int n,
                                                float* out) {
  return Run(nullptr, out, &tail, n);
}

absl::Status LocalRoutedExperts::Run(const std::function<void()>* first, float* out,
                                     const std::function<void(int)>* tail, int tail_n) {
  const Call& c = call_;
  batcher_.Clear();
  rows_.resize(static_cast<size_t>(c.t * c.k * hidden_));
  for (int64_t p = 0; p < c.t * c.k; ++p) {
    batcher_.Add(c.layer, c.ids[p], c.x + (p / c.k) * hidden_, rows_.data() + p * hidden_);
  }
  if (absl::Status st = batcher_.Run(*store_, accelerator_, first, tail, tail_n); !st.ok()) {
    return st;
  }
  CombineRanked(rows_.data(), c.w, c.t, c.k, hidden_, out);
  return absl::OkStatus();
}

absl::Status LocalRoutedExperts::FinishAfter(const std::function<void()>& beside,
                                             double beside_experts, float* out) {
  const Call& c = call_;
  const double cores = cpu::ThePool().size();
  // Its products run inline on one core: beside the routed ones only when that is no more than a
  // core's share of the pass (each of the t * k rows an expert's products of its own).
  if (accelerator_ != nullptr || c.t > cores ||
      beside_experts * cores > static_cast<double>(c.t * c.k) + beside_experts) {
    beside();
    return Finish(out);
  }
  return Run(&beside, out);
}

void CombineRanked(const float* rows, const float* w, int64_t t, int64_t k, int64_t d, float* out) {
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      cpu::Axpy(d, w[i * k + j], rows + (i * k + j) * d, out + i * d);
    }
  }
}

}  // namespace dmoe
