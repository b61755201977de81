// Computing the routed experts of one MoE layer for a batch of tokens. The engine calls this
// interface; the in-process implementation here computes locally, and remote implementations
// (dispatch/combine over a transport) plug in behind the same interface.
#ifndef DMOE_MODEL_ROUTED_EXPERTS_H_
#define DMOE_MODEL_ROUTED_EXPERTS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace dmoe {

// Thread-compatible: one caller at a time. A call is split in two so that the caller can work
// (the shared experts) while remote experts compute: Begin hands the tokens over, Finish waits.
class RoutedExperts {
 public:
  virtual ~RoutedExperts() = default;
  // Starts out[t, D] = sum_j w[t, j] * Expert_{ids[t, j]}(x[t]) for MoE layer `layer`.
  // x [t, D], ids and w [t, k] must stay valid until Finish.
  virtual absl::Status Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids,
                             const float* w, int64_t k) = 0;
  // Adds the result of the last Begin into out [t, D] (out += routed output), through
  // CombineRanked. On error out is unchanged.
  virtual absl::Status Finish(float* out) = 0;
  // Finish after `beside`: the caller's own work that writes the `out` Finish adds to (the shared
  // experts), worth `beside_experts` routed experts' products. The default runs it, then Finish;
  // in-process experts may run it as one more task of their pass over the kernel pool (on a small
  // machine the layer's expert part then hands off to the pool once instead of three times).
  virtual absl::Status FinishAfter(const std::function<void()>& beside, double beside_experts,
                                   float* out) {
    (void)beside_experts;
    beside();
    return Finish(out);
  }
  // True when Finish computes on this process's kernel pool (in-process experts on the CPU): the
  // caller may then hand its own work to FinishWithTail.
  virtual bool RunsOnKernelPool() const { return false; }
  // Finish, with tail(i) for i < n (the caller's work that writes `out` before the routed sum, as
  // FinishAfter's beside) as the last tasks of the experts' pass over the kernel pool: small
  // pieces that fill the pass's end. The default runs them first, then Finish.
  virtual absl::Status FinishWithTail(const std::function<void(int)>& tail, int n, float* out) {
    for (int i = 0; i < n; ++i) tail(i);
    return Finish(out);
  }
};

// out[i] = fma(w[i, k-1], rows[i, k-1], ... fma(w[i, 0], rows[i, 0], out[i])): the routed experts'
// unweighted outputs rows[t, k, D] summed in top-k rank order onto out[t, D]. The one place
// routed outputs are combined, in-process and remote alike, so the sum never depends on which
// shard or replica computed a row or when it arrived (batch invariance, DESIGN §6).
void CombineRanked(const float* rows, const float* w, int64_t t, int64_t k, int64_t d, float* out);

// The experts one process hosts (fp32 or 8-bit), keyed by (layer, expert).
class ExpertStore {
 public:
  // Loads exactly the listed (layer, expert) pairs from the checkpoint (no other expert tensor),
  // held as `dtype` (int8 / fp8: quantized at load unless the checkpoint already is).
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Load(
      const Checkpoint& ck, const ModelConfig& c,
      const std::vector<std::pair<int64_t, int64_t>>& experts,
      WeightDType dtype = WeightDType::kAuto);
  // Every routed expert of every MoE layer.
  static std::vector<std::pair<int64_t, int64_t>> AllExperts(const ModelConfig& c);
  // Accepts the checkpoint tensor names of the listed experts
  // ("model.layers.L.mlp.experts.E.*"), for the totals of a LoadProgress.
  static std::function<bool(const std::string&)> TensorSelector(
      const std::vector<std::pair<int64_t, int64_t>>& experts);

  const MlpWeights* Find(int64_t layer, int64_t expert) const;
  size_t size() const { return experts_.size(); }
  // Bytes of expert weights held.
  uint64_t bytes() const;
  std::vector<std::pair<int64_t, int64_t>> Keys() const;
  // A store of the experts of `this` listed in `keep` plus every expert of `added`, sharing
  // their weights (nothing is copied). For changing what a shard hosts while it serves.
  std::unique_ptr<ExpertStore> Merge(const std::set<std::pair<int64_t, int64_t>>& keep,
                                     const ExpertStore* added) const;

 private:
  // index_[layer * index_width_ + expert]: Find without the map's pointer chase (a decode step
  // looks up every routed expert it runs, on nodes the streamed weights have evicted from cache).
  // Built once the store is complete (Load, Merge).
  void BuildIndex();

  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const MlpWeights>> experts_;
  std::vector<const MlpWeights*> index_;
  int64_t index_width_ = 0;
};

// One group of rows for one expert: rows [first, first + rows) of a gathered batch go through
// expert `expert` of MoE layer `layer`.
struct ExpertGroup {
  int64_t layer = 0, expert = 0, first = 0, rows = 0;
};

// Computes ExpertBatcher's groups somewhere else than the CPU cores (model/cuda_experts.h: a
// GPU). Thread-compatible.
class ExpertAccelerator {
 public:
  virtual ~ExpertAccelerator() = default;
  // y[first .. first + rows) = Expert_{layer, expert}(x[first .. first + rows)), unweighted, for
  // every group; x and y [total rows, D] in host memory. `store` holds the weights of every
  // expert named (an accelerator copies those it does not hold yet).
  virtual absl::Status Run(const ExpertStore& store, const std::vector<ExpertGroup>& groups,
                           const float* x, int64_t rows, float* y) = 0;
  // Where it computes, for logs ("cuda:0 (NVIDIA H200 ...)").
  virtual std::string name() const = 0;
};

// Groups (input row, weight, output row) triples by (layer, expert), then runs each group through
// its expert as one GEMM (the groups spread over the kernel pool's threads) and writes Expert(row),
// unweighted, to each output row. Used for one engine step and, on an expert shard, for every
// request that arrived together. Thread-compatible.
class ExpertBatcher {
 public:
  // `width` (moe_intermediate_size) is taken from each expert's weights.
  ExpertBatcher(int64_t hidden, int64_t /*width*/) : hidden_(hidden) {}
  // Queues out_row[D] = Expert_{layer, expert}(row[D]) (unweighted; overwritten by Run).
  void Add(int64_t layer, int64_t expert, const float* row, float* out_row) {
    items_.push_back(Item{layer, expert, static_cast<uint32_t>(items_.size()), row, out_row});
  }
  // FAILED_PRECONDITION (nothing is added anywhere) when an expert is not in `store`. With an
  // accelerator every group runs there instead of on the kernel pool.
  // `first`, when given, runs as one more task of the pass over the kernel pool (the first one),
  // and tail(i) for i < tail_n as its last tasks; with an accelerator both run before it. They
  // run on the error return too.
  absl::Status Run(const ExpertStore& store, ExpertAccelerator* accelerator = nullptr,
                   const std::function<void()>* first = nullptr,
                   const std::function<void(int)>* tail = nullptr, int tail_n = 0);
  // Keeps capacity: a steady stream of batches allocates nothing.
  void Clear() { items_.clear(); }
  // GEMM calls made and rows pushed through them by Run, since construction.
  uint64_t gemms() const { return gemms_; }
  uint64_t rows() const { return rows_; }
  // Passes over the kernel pool that ran a `first` task / tail tasks beside the experts.
  uint64_t passes_with_first() const { return passes_with_first_; }
  uint64_t passes_with_tail() const { return passes_with_tail_; }

 private:
  struct Item {
    int64_t layer;
    int64_t expert;
    uint32_t order;  // insertion order, so that groups keep their rows' order
    const float* row;
    float* out;
  };
  int64_t hidden_;
  std::vector<Item> items_;
  absl::Status SortAndCheck(const ExpertStore& store);
  absl::Status RunOn(const ExpertStore& store, ExpertAccelerator* accelerator);
  std::vector<std::pair<size_t, size_t>> groups_;  // [begin, end) of items_ per task
  uint64_t passes_with_first_ = 0, passes_with_tail_ = 0;
  std::vector<ExpertGroup> accel_groups_;
  std::vector<float> accel_x_, accel_y_;
  uint64_t gemms_ = 0, rows_ = 0;
};

// Computes routed experts in this process (all of them hosted in `store`).
class LocalRoutedExperts : public RoutedExperts {
 public:
  // With an accelerator (not owned) the experts compute there (ExpertBatcher::Run).
  LocalRoutedExperts(const ModelConfig& c, const ExpertStore* store,
                     ExpertAccelerator* accelerator = nullptr)
      : hidden_(c.hidden_size),
        store_(store),
        accelerator_(accelerator),
        batcher_(c.hidden_size, c.moe_intermediate_size) {}
  absl::Status Begin(int64_t layer, const float* x, int64_t t, const int32_t* ids, const float* w,
                     int64_t k) override;
  absl::Status Finish(float* out) override;
  // `beside` as the first task of the experts' pass when that balances: at most a row per core
  // and beside_experts * (cores - 1) <= rows * k (its products run inline on one core: no more
  // than a core's share of the pass; V2 at batch 1: up to 4 cores); else before them. It runs on
  // the error return too.
  absl::Status FinishAfter(const std::function<void()>& beside, double beside_experts,
                           float* out) override;
  bool RunsOnKernelPool() const override { return accelerator_ == nullptr; }
  absl::Status FinishWithTail(const std::function<void(int)>& tail, int n, float* out) override;
  // FinishAfter calls that ran `beside` in the experts' pass, FinishWithTail calls that ran the
  // tail there (tests).
  uint64_t beside_in_pass() const { return batcher_.passes_with_first(); }
  uint64_t tail_in_pass() const { return batcher_.passes_with_tail(); }

 private:
  // The experts of the last Begin (with *first and tail, when given, as ExpertBatcher::Run runs
  // them).
  absl::Status Run(const std::function<void()>* first, float* out,
                   const std::function<void(int)>* tail = nullptr, int tail_n = 0);
  struct Call {
    int64_t layer = 0, t = 0, k = 0;
    const float* x = nullptr;
    const int32_t* ids = nullptr;
    const float* w = nullptr;
  };
  int64_t hidden_;
  const ExpertStore* store_;
  ExpertAccelerator* accelerator_;
  ExpertBatcher batcher_;
  Call call_;
  std::vector<float> rows_;  // [t, k, D] unweighted expert outputs
};

}  // namespace dmoe

#endif  // DMOE_MODEL_ROUTED_EXPERTS_H_
