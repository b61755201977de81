// The latent KV cache: per layer and token, kv_lora_rank + qk_rope_head_dim values (c_kv after
// kv_a_layernorm, then the rotated k_pe) and nothing else (576 values for DeepSeek-V2); in fp32,
// bf16, or 8-bit (cpu::KvDType: c_kv in int8 / fp8 with a scale per 128 values, k_pe in bf16).
//
// KvSequence is what the engine writes to and attends over. Two implementations:
// SequenceKvCache (one growable buffer per layer; tests and tools) and PagedKvSequence (fixed-size
// blocks from a shared LatentKvCache, per-sequence block tables; the serving path).
#ifndef DMOE_ATTENTION_SERVICE_KV_CACHE_H_
#define DMOE_ATTENTION_SERVICE_KV_CACHE_H_

#include <algorithm>
#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cpu/mla.h"
#include "model/config.h"

namespace dmoe {

// "f32", "bf16", "int8", "fp8_e4m3" (or "fp8"); false for anything else.
bool ParseKvDType(const std::string& s, cpu::KvDType* out);

// The rows of one sequence, all layers. Thread-compatible.
class KvSequence {
 public:
  virtual ~KvSequence() = default;
  // Tokens whose rows are committed.
  int64_t length() const { return length_; }
  // Makes room for rows [length, length + n). RESOURCE_EXHAUSTED (nothing changed) when the
  // cache cannot.
  virtual absl::Status Reserve(int64_t n) = 0;
  // Stores the row of (layer, pos) for pos < length + reserved (rounding it if the cache is bf16
  // or 8-bit).
  virtual void WriteRow(int64_t layer, int64_t pos, const float* row) = 0;
  // The rows of `layer` for the attention kernels (valid until the next Reserve).
  virtual cpu::LatentRows Rows(int64_t layer) = 0;
  // Commits n reserved rows (after a step succeeded).
  void Advance(int64_t n) { length_ += n; }
  // Drops the committed rows from position n on (speculative decoding: the rows of rejected
  // drafts). n <= length(). Paged: whole blocks past n go back to the cache.
  virtual void Truncate(int64_t n) { length_ = std::min(length_, n); }
  // False when the rows live in device memory (a LatentKvCache without host storage, whose rows
  // only the GPU engine reads and writes): WriteRow and Rows must not be called then.
  virtual bool on_host() const { return true; }

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
  float* Row(int64_t layer, int64_t pos) {
    return layers_[static_cast<size_t>(layer)].data() + pos * row_;
  }
  void WriteRow(int64_t layer, int64_t pos, const float* row) override {
    std::copy(row, row + row_, Row(layer, pos));
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
// `block_tokens` rows of `latent_dim` floats. Blocks are reference-counted: a full block can be
// shared by every sequence whose tokens up to and including it are the same (prefix caching;
// blocks are keyed by a hash chained over all tokens up to them). A block nobody references stays
// cached (evictable, least recently used first) until its space is needed. Accounting is exact:
// every block is free, cached (evictable) or referenced. Thread-compatible.
class LatentKvCache {
 public:
  // host_storage false: only the accounting, for a pool whose rows are elsewhere (the GPU
  // engine's device memory, laid out as BlockLayer describes); BlockLayer is then null.
  LatentKvCache(const ModelConfig& c, int64_t block_tokens, int64_t num_blocks,
                cpu::KvDType dtype = cpu::KvDType::kF32, bool host_storage = true);
  // Blocks that fit in `bytes`.
  static int64_t BlocksForBytes(const ModelConfig& c, int64_t block_tokens, uint64_t bytes,
                                cpu::KvDType dtype = cpu::KvDType::kF32);

  int64_t block_tokens() const { return block_tokens_; }
  int64_t total_blocks() const { return total_; }
  // Blocks available to Allocate: free plus cached-but-unreferenced.
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  // Unreferenced blocks kept for their prefix.
  int64_t cached_blocks() const { return static_cast<int64_t>(lru_.size()); }
  uint64_t block_bytes() const { return static_cast<uint64_t>(block_bytes_); }
  // Bytes of cache per token (all layers): layers * cpu::KvRowBytes (fp32: latent_dim * 4).
  uint64_t bytes_per_token() const { return static_cast<uint64_t>(layers_) * row_bytes_; }
  cpu::KvDType dtype() const { return dtype_; }

  // A block with one reference (evicting the least recently used cached block if no block is
  // free); -1 when every block is referenced.
  int32_t Allocate();
  // Adds a reference to a block (found by Lookup).
  void Share(int32_t block);
  // Drops a reference; an unreferenced block stays cached if it holds a registered prefix.
  void Free(int32_t block);

  // The key of a full block: hash of its tokens chained onto the key of the block before it
  // (0 for the first block).
  static uint64_t ChainHash(uint64_t parent, const int32_t* tokens, int64_t n);
  // The cached block holding exactly these tokens under this key, or -1.
  int32_t Lookup(uint64_t key, const int32_t* tokens) const;
  // Makes a full, computed block findable by Lookup (no-op if the key is already taken).
  void Register(int32_t block, uint64_t key, const int32_t* tokens);

  // The rows of (block, layer): block_tokens rows of row_bytes() each, at this offset of the
  // storage (block_bytes() per block).
  int64_t LayerOffset(int32_t block, int64_t layer) const {
    return static_cast<int64_t>(block) * block_bytes_ + layer * block_tokens_ * row_bytes_;
  }
  uint8_t* BlockLayer(int32_t block, int64_t layer) {
    return storage_.empty() ? nullptr : storage_.data() + LayerOffset(block, layer);
  }
  bool host_storage() const { return !storage_.empty() || total_ == 0; }
  int64_t row() const { return row_; }  // values per row (r + dr)
  int64_t latent_rank() const { return r_; }
  int64_t row_bytes() const { return row_bytes_; }

 private:
  struct Meta {
    int32_t refs = 0;
    bool registered = false;
    uint64_t key = 0;
    std::list<int32_t>::iterator lru;  // valid when refs == 0 && registered
  };
  void Unregister(int32_t block);

  int64_t row_, r_, layers_, block_tokens_, total_;
  cpu::KvDType dtype_;
  int64_t row_bytes_, block_bytes_;
  std::vector<uint8_t> storage_;
  std::vector<int32_t> free_;
  std::vector<Meta> meta_;
  std::list<int32_t> lru_;  // unreferenced registered blocks, least recently used first
  std::unordered_map<uint64_t, int32_t> by_key_;
  std::vector<int32_t> block_tokens_ids_;  // [total, block_tokens]: the tokens of registered blocks
};

// A sequence's block table over a LatentKvCache; returns its blocks when destroyed or Released.
class PagedKvSequence : public KvSequence {
 public:
  explicit PagedKvSequence(LatentKvCache* cache) : cache_(cache) {}
  ~PagedKvSequence() override { Release(); }
  PagedKvSequence(const PagedKvSequence&) = delete;
  PagedKvSequence& operator=(const PagedKvSequence&) = delete;

  absl::Status Reserve(int64_t n) override;
  void Truncate(int64_t n) override;
  void WriteRow(int64_t layer, int64_t pos, const float* row) override {
    uint8_t* dst =
        cache_->BlockLayer(blocks_[static_cast<size_t>(pos / cache_->block_tokens())], layer) +
        (pos % cache_->block_tokens()) * cache_->row_bytes();
    cpu::QuantizeKvRow(cache_->dtype(), row, cache_->latent_rank(),
                       cache_->row() - cache_->latent_rank(), dst);
  }
  cpu::LatentRows Rows(int64_t layer) override;
  bool on_host() const override { return cache_->host_storage(); }
  LatentKvCache* cache() const { return cache_; }
  // Returns every block to the cache; the sequence is empty afterwards.
  void Release();
  const std::vector<int32_t>& block_table() const { return blocks_; }

  // On an empty sequence: attaches the cached blocks that hold the longest prefix of `tokens`
  // in whole blocks, always leaving at least one token to compute, and at most `max_tokens`.
  // Returns the tokens attached (the new length).
  int64_t AttachPrefix(const int32_t* tokens, int64_t n, int64_t max_tokens = INT64_MAX);
  int64_t AttachPrefix(const std::vector<int32_t>& tokens) {
    return AttachPrefix(tokens.data(), static_cast<int64_t>(tokens.size()));
  }
  // Registers every block that is full of committed rows of `tokens` (the sequence's tokens;
  // at least length() of them) for later AttachPrefix calls.
  void RegisterFullBlocks(const int32_t* tokens);
  void RegisterFullBlocks(const std::vector<int32_t>& tokens) { RegisterFullBlocks(tokens.data()); }
  // The key the block chain starts from (default 0). A cache whose rows depend on more than the
  // tokens the blocks are keyed by (the MTP layer's: the token before them) seeds it with that.
  // Only on an empty sequence; Release keeps it.
  void set_chain_seed(uint64_t seed) { chain_key_ = chain_seed_ = seed; }

 private:
  LatentKvCache* cache_;
  std::vector<int32_t> blocks_;
  std::vector<const float*> ptrs_;
  std::vector<const uint8_t*> qptrs_;
  int64_t registered_ = 0;  // leading blocks already registered (or attached)
  uint64_t chain_key_ = 0;  // key of block registered_ - 1
  uint64_t chain_seed_ = 0;
};

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_KV_CACHE_H_
