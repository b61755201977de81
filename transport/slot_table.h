// A fixed-capacity table of in-flight records addressed by 64-bit ids that carry a generation, so
// that a stale id never finds a reused slot. Nothing is allocated after construction: the data
// plane keeps one record per message in flight without touching the heap.
#ifndef DMOE_TRANSPORT_SLOT_TABLE_H_
#define DMOE_TRANSPORT_SLOT_TABLE_H_

#include <cstdint>
#include <vector>

namespace dmoe::transport {

// Not thread-safe: callers lock. T must have a `uint64_t id` member (0 = free).
template <typename T>
class SlotTable {
 public:
  explicit SlotTable(uint32_t capacity) : slots_(capacity) {
    free_.reserve(capacity);
    for (uint32_t i = capacity; i > 0; --i) free_.push_back(i - 1);
  }
  // A free slot with a fresh id, or nullptr when all are in use.
  T* Allocate() {
    if (free_.empty()) return nullptr;
    const uint32_t index = free_.back();
    free_.pop_back();
    T& s = slots_[index];
    s.id = (++generation_) * slots_.size() + index;
    return &s;
  }
  // The slot of `id`, or nullptr when that id is no longer (or never was) in use.
  T* Find(uint64_t id) {
    if (id == 0) return nullptr;
    T& s = slots_[id % slots_.size()];
    return s.id == id ? &s : nullptr;
  }
  // The slot `id` maps to, whoever holds it now (nullptr for 0): for a lock-free look at
  // fields the caller made atomic; Find, under the caller's lock, says whether it is still id's.
  const T* At(uint64_t id) const { return id == 0 ? nullptr : &slots_[id % slots_.size()]; }
  void Free(T* s) {
    const uint32_t index = static_cast<uint32_t>(s->id % slots_.size());
    s->id = 0;
    free_.push_back(index);
  }
  // Every slot, for the rare walks over all (peer failure).
  std::vector<T>& slots() { return slots_; }

 private:
  std::vector<T> slots_;
  std::vector<uint32_t> free_;
  uint64_t generation_ = 0;
};

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_SLOT_TABLE_H_
