// The latent KV cache: per layer and token, kv_lora_rank + qk_rope_head_dim floats (c_kv after
// kv_a_layernorm, then the rotated k_pe) and nothing else (576 values for DeepSeek-V2).
//
// KvSequence is what the engine writes to and attends over. Two implementations:
// SequenceKvCache (one growable buffer per layer; tests and tools) and PagedKvSequence (fixed-size
// blocks from a shared LatentKvCache, per-sequence block tables; the serving path).
#ifndef DMOE_ATTENTION_SERVICE_KV_CACHE_H_
#define DMOE_ATTENTION_SERVICE_KV_CACHE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cpu/mla.h"
#include "model/config.h"

namespace dmoe {

// The rows of one sequence, all layers. Thread-compatible.
class KvSequence {
 public:
  virtual ~KvSequence() = default;
  // Tokens whose rows are committed.
  int64_t length() const { return length_; }
  // Makes room for rows [length, length + n). RESOURCE_EXHAUSTED (nothing changed) when the
  // cache cannot.
  virtual absl::Status Reserve(int64_t n) = 0;
  // The row of (layer, pos) for pos < length + reserved.
  virtual float* Row(int64_t layer, int64_t pos) = 0;
  // The rows of `layer` for the attention kernels (valid until the next Reserve).
  virtual cpu::LatentRows Rows(int64_t layer) = 0;
  // Commits n reserved rows (after a step succeeded).
  void Advance(int64_t n) { length_ += n; }

 protected:
  int64_t length_ = 0;
};

// One growable buffer per layer.
class SequenceKvCache : public KvSequence {
 public:
  explicit SequenceKvCache(const ModelConfig& c)
      : row_(c.latent_dim()),
        layers_(static_cast<size_t>(c.num_hidden_layers)),
        ptrs_(layers_.size()) {}
  absl::Status Reserve(int64_t n) override;
  float* Row(int64_t layer, int64_t pos) override {
    return layers_[static_cast<size_t>(layer)].data() + pos * row_;
  }
  cpu::LatentRows Rows(int64_t layer) override;
  // Bytes of committed rows (all layers).
  uint64_t bytes() const { return static_cast<uint64_t>(length_) * row_ * layers_.size() * 4; }

 private:
  int64_t row_;
  std::vector<std::vector<float>> layers_;
  std::vector<const float*> ptrs_;
};

// A pool of fixed-size blocks shared by many sequences: block b holds, for every layer,
// `block_tokens` rows of `latent_dim` floats. A free list hands blocks out; accounting is exact
// (free + used == total at all times). Thread-compatible.
class LatentKvCache {
 public:
  LatentKvCache(const ModelConfig& c, int64_t block_tokens, int64_t num_blocks);
  // Blocks that fit in `bytes`.
  static int64_t BlocksForBytes(const ModelConfig& c, int64_t block_tokens, uint64_t bytes);

  int64_t block_tokens() const { return block_tokens_; }
  int64_t total_blocks() const { return total_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  uint64_t block_bytes() const { return static_cast<uint64_t>(block_floats_) * 4; }
  // Bytes of cache per token (all layers): layers * latent_dim * 4.
  uint64_t bytes_per_token() const { return static_cast<uint64_t>(layers_) * row_ * 4; }

  // -1 when no block is free.
  int32_t Allocate();
  void Free(int32_t block);
  float* BlockLayer(int32_t block, int64_t layer) {
    return storage_.data() + static_cast<int64_t>(block) * block_floats_ +
           layer * block_tokens_ * row_;
  }
  int64_t row() const { return row_; }

 private:
  int64_t row_, layers_, block_tokens_, total_, block_floats_;
  std::vector<float> storage_;
  std::vector<int32_t> free_;
  std::vector<char> in_use_;
};

// A sequence's block table over a LatentKvCache; returns its blocks when destroyed or Released.
class PagedKvSequence : public KvSequence {
 public:
  explicit PagedKvSequence(LatentKvCache* cache) : cache_(cache) {}
  ~PagedKvSequence() override { Release(); }
  PagedKvSequence(const PagedKvSequence&) = delete;
  PagedKvSequence& operator=(const PagedKvSequence&) = delete;

  absl::Status Reserve(int64_t n) override;
  float* Row(int64_t layer, int64_t pos) override {
    return cache_->BlockLayer(blocks_[static_cast<size_t>(pos / cache_->block_tokens())], layer) +
           (pos % cache_->block_tokens()) * cache_->row();
  }
  cpu::LatentRows Rows(int64_t layer) override;
  // Returns every block to the cache; the sequence is empty afterwards.
  void Release();
  const std::vector<int32_t>& block_table() const { return blocks_; }

 private:
  LatentKvCache* cache_;
  std::vector<int32_t> blocks_;
  std::vector<const float*> ptrs_;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_KV_CACHE_H_
