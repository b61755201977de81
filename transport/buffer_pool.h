// Recycled byte buffers, so that the steady state of the data plane allocates nothing per message.
#ifndef DMOE_TRANSPORT_BUFFER_POOL_H_
#define DMOE_TRANSPORT_BUFFER_POOL_H_

#include <cstdint>
#include <mutex>
#include <vector>

namespace dmoe::transport {

// For a pool its owner guards with a lock of its own (one lock per message instead of two).
struct NoLock {
  void lock() {}
  void unlock() {}
};

// Thread-safe with Mutex = std::mutex (BufferPool); with NoLock the caller serializes all calls.
template <typename Mutex>
class BasicBufferPool {
 public:
  // The free list's own storage is reserved up front, so that holding more buffers than ever
  // before does not allocate on the data path.
  explicit BasicBufferPool(size_t max_buffers = 256) : max_(max_buffers) { free_.reserve(max_); }
  // The largest recycled buffer, with its old size and contents (empty if none): writers resize
  // or assign over it. The largest, because the message it will hold is not known yet and a
  // buffer that has to grow is a fresh allocation (a multi-MiB one page-faults on every page:
  // with mixed message sizes that cost 2.6 MiB round trips 2-3x their time). Not cleared,
  // because a clear() + resize(n) would zero-fill all n bytes before the encoder overwrites them.
  std::vector<uint8_t> Acquire() {
    std::lock_guard<Mutex> l(mu_);
    if (free_.empty()) {
      AddSpare();
      return {};
    }
    // From the back: among equals the most recently released, whose bytes are still in cache.
    size_t pick = free_.size() - 1;
    for (size_t i = pick; i-- > 0;) {
      if (free_[i].capacity() > free_[pick].capacity()) pick = i;
    }
    return Take(pick);
  }
  // A buffer of exactly n bytes to be overwritten whole (a receive): the smallest recycled one
  // that holds n bytes without reallocating (else the largest, which grows). Only bytes beyond
  // its old size are zero-filled: a multi-MiB receive does not first write the whole buffer.
  // A buffer that must grow grows to the largest size this pool has seen, not just to n: then
  // every buffer ends up able to hold any message, and which one a receive happens to find free
  // (a timing matter) no longer decides whether it allocates (hot_path_alloc_test under load
  // saw 1 allocation in 300 round trips in 3 of 20 runs before).
  std::vector<uint8_t> AcquireSized(size_t n) {
    std::vector<uint8_t> b;
    size_t grow_to;
    {
      std::lock_guard<Mutex> l(mu_);
      if (!free_.empty()) {
        size_t fit = free_.size(), largest = free_.size() - 1;
        for (size_t i = free_.size(); i-- > 0;) {  // ties: the most recently released
          const size_t c = free_[i].capacity();
          if (c >= n && (fit == free_.size() || c < free_[fit].capacity())) fit = i;
          if (c > free_[largest].capacity()) largest = i;
        }
        b = Take(fit < free_.size() ? fit : largest);
      } else {
        AddSpare();
      }
      if (n > largest_) largest_ = n;
      grow_to = largest_;
    }
    if (b.capacity() < n) b.reserve(grow_to);
    b.resize(n);
    return b;
  }
  void Release(std::vector<uint8_t> b) {
    if (b.capacity() == 0) return;
    std::lock_guard<Mutex> l(mu_);
    if (b.size() > largest_) largest_ = b.size();
    if (free_.size() < max_) free_.push_back(std::move(b));
  }

 private:
  // The pool ran dry: more buffers are in use at once than ever before (a new interleaving of
  // sends, replies and callers). One buffer is made for the caller and one more is kept, so that
  // the next step up in concurrency — which a busy machine reaches now and then long after
  // warm-up — finds it here instead of allocating on the data path. With mu_ held.
  void AddSpare() {
    if (largest_ == 0 || free_.size() >= max_) return;
    std::vector<uint8_t> spare;
    spare.reserve(largest_);
    free_.push_back(std::move(spare));
  }
  // Keeps the others in release order (the back is the most recent), so that the data plane
  // reuses the buffers it just used, whose bytes are still in cache, instead of rotating through
  // every buffer the pool ever grew to (as swap-with-last did): a working set of a few buffers,
  // not all of them.
  std::vector<uint8_t> Take(size_t i) {  // with mu_ held
    std::vector<uint8_t> b = std::move(free_[i]);
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
    return b;
  }

  const size_t max_;
  size_t largest_ = 0;  // the largest message size seen (guarded by mu_)
  Mutex mu_;
  std::vector<std::vector<uint8_t>> free_;
};

using BufferPool = BasicBufferPool<std::mutex>;
using UnlockedBufferPool = BasicBufferPool<NoLock>;

}  // namespace dmoe::transport

#endif  // DMOE_TRANSPORT_BUFFER_POOL_H_
