#include "attention_service/kv_cache.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace dmoe {

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

LatentKvCache::LatentKvCache(const ModelConfig& c, int64_t block_tokens, int64_t num_blocks)
    : row_(c.latent_dim()),
      layers_(c.num_hidden_layers),
      block_tokens_(block_tokens),
      total_(num_blocks),
      block_floats_(c.num_hidden_layers * block_tokens * c.latent_dim()),
      storage_(static_cast<size_t>(num_blocks * block_floats_)),
      in_use_(static_cast<size_t>(num_blocks), 0) {
  free_.reserve(static_cast<size_t>(num_blocks));
  // Lowest block ids first out.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t LatentKvCache::BlocksForBytes(const ModelConfig& c, int64_t block_tokens, uint64_t bytes) {
  const uint64_t per_block =
      static_cast<uint64_t>(c.num_hidden_layers) * block_tokens * c.latent_dim() * 4;
  return static_cast<int64_t>(bytes / per_block);
}

int32_t LatentKvCache::Allocate() {
  if (free_.empty()) return -1;
  const int32_t b = free_.back();
  free_.pop_back();
  in_use_[static_cast<size_t>(b)] = 1;
  return b;
}

void LatentKvCache::Free(int32_t block) {
  if (block < 0 || block >= total_ || !in_use_[static_cast<size_t>(block)]) {
    // A double free would corrupt two sequences' caches: an invariant broken inside dmoe.
    std::fprintf(stderr, "LatentKvCache: freeing block %d that is not in use\n", block);
    std::abort();
  }
  in_use_[static_cast<size_t>(block)] = 0;
  free_.push_back(block);
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
  ptrs_.resize(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i) ptrs_[i] = cache_->BlockLayer(blocks_[i], layer);
  return cpu::LatentRows{ptrs_.data(), cache_->block_tokens()};
}

void PagedKvSequence::Release() {
  for (int32_t b : blocks_) cache_->Free(b);
  blocks_.clear();
  length_ = 0;
}

}  // namespace dmoe
