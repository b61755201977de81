#include "attention_service/kv_cache.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/huge_pages.h"

namespace dmoe {

bool ParseKvDType(const std::string& s, cpu::KvDType* out) {
  if (s == "f32") {
    *out = cpu::KvDType::kF32;
  } else if (s == "int8") {
    *out = cpu::KvDType::kInt8;
  } else if (s == "fp8_e4m3" || s == "fp8") {
    *out = cpu::KvDType::kFp8;
  } else if (s == "bf16") {
    *out = cpu::KvDType::kBf16;
  } else {
    return false;
  }
  return true;
}

absl::Status SequenceKvCache::Reserve(int64_t n) {
  for (auto& layer : layers_) {
    const size_t need = static_cast<size_t>((length_ + n) * row_);
    if (layer.size() < need) layer.resize(need);
  }
  return absl::OkStatus();
}

cpu::LatentRows SequenceKvCache::Rows(int64_t layer) {
  ptrs_[static_cast<size_t>(layer)] = layers_[static_cast<size_t>(layer)].data();
  return cpu::LatentRows{&ptrs_[static_cast<size_t>(layer)], INT64_MAX / 2};
}

LatentKvCache::LatentKvCache(const ModelConfig& c, int64_t block_tokens, int64_t num_blocks,
                             cpu::KvDType dtype, bool host_storage)
    : row_(c.latent_dim()),
      r_(c.kv_lora_rank),
      layers_(c.num_hidden_layers),
      block_tokens_(block_tokens),
      total_(num_blocks),
      dtype_(dtype),
      row_bytes_(cpu::KvRowBytes(dtype, c.kv_lora_rank, c.qk_rope_head_dim)),
      block_bytes_(c.num_hidden_layers * block_tokens * row_bytes_),
      meta_(static_cast<size_t>(num_blocks)),
      block_tokens_ids_(static_cast<size_t>(num_blocks * block_tokens)) {
  if (host_storage) {  // in 2 MiB pages: a sequence's blocks of one layer lie a block apart
    const size_t n = static_cast<size_t>(num_blocks * block_bytes_);
    ReserveHugePages(&storage_, n);
    storage_.resize(n);
  }
  free_.reserve(static_cast<size_t>(num_blocks));
  // Lowest block ids first out.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t LatentKvCache::BlocksForBytes(const ModelConfig& c, int64_t block_tokens, uint64_t bytes,
                                      cpu::KvDType dtype) {
  const uint64_t per_block = static_cast<uint64_t>(c.num_hidden_layers) * block_tokens *
                             cpu::KvRowBytes(dtype, c.kv_lora_rank, c.qk_rope_head_dim);
  return static_cast<int64_t>(bytes / per_block);
}

namespace {
[[noreturn]] void Broken(const char* what, int32_t block) {
  // A refcount error would let two sequences write one block: an invariant broken inside dmoe.
  std::fprintf(stderr, "LatentKvCache: %s (block %d)\n", what, block);
  std::abort();
}
}  // namespace

int32_t LatentKvCache::Allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    Unregister(b);
  } else {
    return -1;
  }
  meta_[static_cast<size_t>(b)].refs = 1;
  return b;
}

void LatentKvCache::Share(int32_t block) {
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.refs == 0) {
    if (!m.registered) Broken("sharing a free block", block);
    lru_.erase(m.lru);
  }
  ++m.refs;
}

void LatentKvCache::Free(int32_t block) {
  if (block < 0 || block >= total_) Broken("freeing a block out of range", block);
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.refs <= 0) Broken("freeing a block that is not in use", block);
  if (--m.refs > 0) return;
  if (m.registered) {
    m.lru = lru_.insert(lru_.end(), block);
  } else {
    free_.push_back(block);
  }
}

uint64_t LatentKvCache::ChainHash(uint64_t parent, const int32_t* tokens, int64_t n) {
  uint64_t h = parent ^ 0x9e3779b97f4a7c15ull;
  for (int64_t i = 0; i < n; ++i) {
    h ^= static_cast<uint32_t>(tokens[i]);
    h *= 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h == 0 ? 1 : h;
}

int32_t LatentKvCache::Lookup(uint64_t key, const int32_t* tokens) const {
  auto it = by_key_.find(key);
  if (it == by_key_.end()) return -1;
  const int32_t* have = block_tokens_ids_.data() + static_cast<int64_t>(it->second) * block_tokens_;
  for (int64_t i = 0; i < block_tokens_; ++i) {
    if (have[i] != tokens[i]) return -1;  // a hash collision: treat as a miss
  }
  return it->second;
}

void LatentKvCache::Register(int32_t block, uint64_t key, const int32_t* tokens) {
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.registered || by_key_.count(key)) return;
  m.registered = true;
  m.key = key;
  by_key_[key] = block;
  std::copy(tokens, tokens + block_tokens_,
            block_tokens_ids_.begin() + static_cast<int64_t>(block) * block_tokens_);
}

void LatentKvCache::Unregister(int32_t block) {
  Meta& m = meta_[static_cast<size_t>(block)];
  if (!m.registered) return;
  by_key_.erase(m.key);
  m.registered = false;
}

absl::Status PagedKvSequence::Reserve(int64_t n) {
  const int64_t bt = cache_->block_tokens();
  const int64_t need = (length_ + n + bt - 1) / bt - static_cast<int64_t>(blocks_.size());
  if (need <= 0) return absl::OkStatus();
  if (need > cache_->free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: ", need, " blocks needed, ", cache_->free_blocks(), " free"));
  }
  for (int64_t i = 0; i < need; ++i) blocks_.push_back(cache_->Allocate());
  return absl::OkStatus();
}

cpu::LatentRows PagedKvSequence::Rows(int64_t layer) {
  cpu::LatentRows rows;
  rows.block_tokens = cache_->block_tokens();
  if (cache_->dtype() == cpu::KvDType::kF32) {
    ptrs_.resize(blocks_.size());
    for (size_t i = 0; i < blocks_.size(); ++i) {
      ptrs_[i] = reinterpret_cast<const float*>(cache_->BlockLayer(blocks_[i], layer));
    }
    rows.blocks = ptrs_.data();
    return rows;
  }
  qptrs_.resize(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i) qptrs_[i] = cache_->BlockLayer(blocks_[i], layer);
  rows.qblocks = qptrs_.data();
  rows.dtype = cache_->dtype();
  rows.r = cache_->latent_rank();
  rows.dr = cache_->row() - cache_->latent_rank();
  return rows;
}

void PagedKvSequence::Release() {
  for (int32_t b : blocks_) cache_->Free(b);
  blocks_.clear();
  length_ = 0;
  registered_ = 0;
  chain_key_ = chain_seed_;
}

void PagedKvSequence::Truncate(int64_t n) {
  if (n >= length_) return;
  length_ = std::max<int64_t>(n, 0);
  // Registered blocks hold committed rows only, and rows are only dropped past the last full
  // registered block: they stay.
  const int64_t bt = cache_->block_tokens();
  const size_t keep = static_cast<size_t>(std::max((length_ + bt - 1) / bt, registered_));
  while (blocks_.size() > keep) {
    cache_->Free(blocks_.back());
    blocks_.pop_back();
  }
}

int64_t PagedKvSequence::AttachPrefix(const int32_t* tokens, int64_t n, int64_t max_tokens) {
  if (length_ != 0 || !blocks_.empty()) return length_;
  const int64_t bt = cache_->block_tokens();
  uint64_t key = chain_seed_;
  while ((static_cast<int64_t>(blocks_.size()) + 1) * bt <= std::min(n - 1, max_tokens)) {
    const int32_t* block_tokens = tokens + static_cast<int64_t>(blocks_.size()) * bt;
    const uint64_t next = LatentKvCache::ChainHash(key, block_tokens, bt);
    const int32_t b = cache_->Lookup(next, block_tokens);
    if (b < 0) break;
    cache_->Share(b);
    blocks_.push_back(b);
    key = next;
  }
  registered_ = static_cast<int64_t>(blocks_.size());
  chain_key_ = key;
  length_ = registered_ * bt;
  return length_;
}

void PagedKvSequence::RegisterFullBlocks(const int32_t* tokens) {
  const int64_t bt = cache_->block_tokens();
  while ((registered_ + 1) * bt <= length_ && registered_ < static_cast<int64_t>(blocks_.size())) {
    const int32_t* block_tokens = tokens + registered_ * bt;
    chain_key_ = LatentKvCache::ChainHash(chain_key_, block_tokens, bt);
    cache_->Register(blocks_[static_cast<size_t>(registered_)], chain_key_, block_tokens);
    ++registered_;
  }
}

}  // namespace dmoe
