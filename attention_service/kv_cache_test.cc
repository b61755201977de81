#include "attention_service/kv_cache.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

TEST(LatentKvCache, ExactAccounting) {
  const ModelConfig c = *PresetConfig("tiny");
  LatentKvCache cache(c, 4, 10);
  EXPECT_EQ(cache.bytes_per_token(), 4u * (64 + 16) * 4);  // layers x (r + dr) floats, nothing else
  EXPECT_EQ(cache.block_bytes(), 4u * 4 * (64 + 16) * 4);
  EXPECT_EQ(LatentKvCache::BlocksForBytes(c, 4, 10 * cache.block_bytes() + 7), 10);
  {
    PagedKvSequence a(&cache), b(&cache);
    ASSERT_TRUE(a.Reserve(9).ok());  // 3 blocks
    EXPECT_EQ(cache.free_blocks(), 7);
    a.Advance(9);
    ASSERT_TRUE(a.Reserve(3).ok());  // 12 tokens still fit in 3 blocks
    EXPECT_EQ(cache.free_blocks(), 7);
    const absl::Status full = b.Reserve(29);  // 8 blocks > 7 free: nothing taken
    EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(cache.free_blocks(), 7);
    EXPECT_TRUE(b.block_table().empty());
    ASSERT_TRUE(b.Reserve(28).ok());
    EXPECT_EQ(cache.free_blocks(), 0);
    b.Release();
    EXPECT_EQ(cache.free_blocks(), 7);
    EXPECT_EQ(b.length(), 0);
  }
  EXPECT_EQ(cache.free_blocks(), 10);  // destructors give everything back
}

TEST(LatentKvCache, PrefixBlocksAreSharedCachedAndEvicted) {
  const ModelConfig c = *PresetConfig("tiny");
  LatentKvCache cache(c, 4, 6);
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  {
    PagedKvSequence a(&cache);
    ASSERT_TRUE(a.Reserve(10).ok());  // 3 blocks
    a.Advance(10);
    a.RegisterFullBlocks(tokens);  // blocks 0 and 1 are full
    PagedKvSequence b(&cache);
    EXPECT_EQ(b.AttachPrefix(tokens), 8);  // two shared blocks, the rest to compute
    EXPECT_EQ(b.block_table()[0], a.block_table()[0]);
    EXPECT_EQ(cache.free_blocks(), 3);
    std::vector<int32_t> other = tokens;
    other[5] = 99;  // differs in the second block
    PagedKvSequence c2(&cache);
    EXPECT_EQ(c2.AttachPrefix(other), 4);
    const std::vector<int32_t> exact = {1, 2, 3, 4, 5, 6, 7, 8};
    PagedKvSequence d(&cache);
    EXPECT_EQ(d.AttachPrefix(exact), 4);  // leaves at least one token to compute
  }
  // Unreferenced registered blocks stay cached and count as available...
  EXPECT_EQ(cache.free_blocks(), 6);
  EXPECT_EQ(cache.cached_blocks(), 2);
  PagedKvSequence e(&cache);
  EXPECT_EQ(e.AttachPrefix(tokens), 8);
  e.Release();
  // ...until their space is needed.
  PagedKvSequence f(&cache);
  ASSERT_TRUE(f.Reserve(24).ok());
  EXPECT_EQ(cache.cached_blocks(), 0);
  EXPECT_EQ(cache.free_blocks(), 0);
  f.Release();
  PagedKvSequence g(&cache);
  EXPECT_EQ(g.AttachPrefix(tokens), 0);  // evicted
}

std::string TinyModel() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/paged_model";
  TinyModelOptions o;
  o.seed = 8;
  EXPECT_TRUE(WriteTinyModel(dir, *PresetConfig("tiny"), o).ok());
  return dir;
}

double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

// Three sequences share one paged cache (blocks of 4 tokens) and run chunked prefill then decode
// in one batch; every step's logits equal those of the contiguous cache, run alone.
TEST(PagedKvSequence, EngineLogitsEqualTheContiguousCache) {
  auto model = LocalModel::Load(TinyModel());
  ASSERT_TRUE(model.ok());
  Engine& engine = (*model)->engine();
  const ModelConfig& c = engine.config();
  LatentKvCache cache(c, 4, 64);
  const int64_t start_free = cache.free_blocks();
  {
    std::vector<std::unique_ptr<PagedKvSequence>> paged;
    std::vector<std::unique_ptr<SequenceKvCache>> plain;
    const std::vector<std::vector<int32_t>> prompts = {
        {5, 9, 200, 31, 7, 8, 1}, {44}, {300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310}};
    for (size_t i = 0; i < prompts.size(); ++i) {
      paged.push_back(std::make_unique<PagedKvSequence>(&cache));
      plain.push_back(std::make_unique<SequenceKvCache>(c));
    }
    std::vector<size_t> at(prompts.size(), 0);
    std::vector<int32_t> next(prompts.size(), 0);
    for (int step = 0; step < 14; ++step) {
      std::vector<SequenceStep> batch(prompts.size());
      for (size_t i = 0; i < prompts.size(); ++i) {
        batch[i].cache = paged[i].get();
        if (at[i] < prompts[i].size()) {  // prefill in chunks of 3
          const size_t end = std::min(prompts[i].size(), at[i] + 3);
          batch[i].tokens.assign(prompts[i].begin() + at[i], prompts[i].begin() + end);
          at[i] = end;
        } else {
          batch[i].tokens = {next[i]};
        }
      }
      std::vector<std::vector<float>> got;
      ASSERT_TRUE(engine.Step(batch, &got).ok());
      for (size_t i = 0; i < prompts.size(); ++i) {
        std::vector<SequenceStep> alone(1);
        alone[0].cache = plain[i].get();
        alone[0].tokens = batch[i].tokens;
        std::vector<std::vector<float>> want;
        ASSERT_TRUE(engine.Step(alone, &want).ok());
        EXPECT_LE(MaxDiff(got[i], want[0]), 1e-4) << "step " << step << " sequence " << i;
        next[i] = ArgMax(got[i].data(), c.vocab_size);
      }
    }
    EXPECT_EQ(paged[2]->length(), 11 + 10);
    EXPECT_EQ(static_cast<int64_t>(paged[2]->block_table().size()), (21 + 3) / 4);
    EXPECT_EQ(cache.free_blocks(),
              start_free - static_cast<int64_t>(paged[0]->block_table().size() +
                                                paged[1]->block_table().size() +
                                                paged[2]->block_table().size()));
  }
  EXPECT_EQ(cache.free_blocks(), start_free);
}

TEST(PagedKvSequence, ExhaustionIsAnErrorThatChangesNothing) {
  auto model = LocalModel::Load(TinyModel());
  ASSERT_TRUE(model.ok());
  Engine& engine = (*model)->engine();
  LatentKvCache cache(engine.config(), 4, 3);  // 12 tokens in all
  PagedKvSequence a(&cache), b(&cache);
  std::vector<SequenceStep> batch(1);
  batch[0].cache = &a;
  batch[0].tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<std::vector<float>> logits;
  ASSERT_TRUE(engine.Step(batch, &logits).ok());
  batch[0].cache = &b;
  batch[0].tokens = {1, 2, 3, 4, 5};
  const absl::Status st = engine.Step(batch, &logits);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_EQ(b.length(), 0);
  EXPECT_EQ(cache.free_blocks(), 0);  // a holds all three blocks; b took none
  a.Release();
  EXPECT_TRUE(engine.Step(batch, &logits).ok());
  EXPECT_EQ(b.length(), 5);
}

}  // namespace
}  // namespace dmoe

namespace dmoe {
namespace {

// The stored row decoded from its bytes by the layout's definition (written here, not the code
// under test): 8-bit, r codes, one fp32 scale per 128, then dr bf16 values; bf16, r + dr values.
std::vector<float> DecodeRow(cpu::KvDType t, const uint8_t* p, int64_t r, int64_t dr) {
  std::vector<float> out(static_cast<size_t>(r + dr));
  if (t == cpu::KvDType::kBf16) {  // r + dr bf16 values: the high halves of floats
    for (int64_t i = 0; i < r + dr; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      const uint32_t bits = static_cast<uint32_t>(h) << 16;
      std::memcpy(&out[static_cast<size_t>(i)], &bits, 4);
    }
    return out;
  }
  const int64_t ns = (r + 127) / 128;
  for (int64_t i = 0; i < r; ++i) {
    float scale;
    std::memcpy(&scale, p + r + 4 * (i / 128), 4);
    const uint8_t q = p[i];
    double v;
    if (t == cpu::KvDType::kInt8) {
      v = static_cast<int8_t>(q);
    } else {
      const int e = (q >> 3) & 15, m = q & 7;
      v = (e == 0 ? m * std::pow(2.0, -9) : (1 + m / 8.0) * std::pow(2.0, e - 7)) *
          ((q & 0x80) ? -1 : 1);
    }
    out[static_cast<size_t>(i)] = static_cast<float>(v * scale);
  }
  for (int64_t j = 0; j < dr; ++j) {
    uint16_t h;
    std::memcpy(&h, p + r + 4 * ns + 2 * j, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    std::memcpy(&out[static_cast<size_t>(r + j)], &bits, 4);
  }
  return out;
}

TEST(LatentKvCache8Bit, LayoutBytesAndQuantizationError) {
  // DeepSeek-V2: r = 512, dr = 64 -> 512 + 4 x 4 + 64 x 2 = 656 bytes (FlashMLA's layout).
  EXPECT_EQ(cpu::KvRowBytes(cpu::KvDType::kFp8, 512, 64), 656);
  EXPECT_EQ(cpu::KvRowBytes(cpu::KvDType::kInt8, 512, 64), 656);
  EXPECT_EQ(cpu::KvRowBytes(cpu::KvDType::kF32, 512, 64), 2304);
  const ModelConfig c = *PresetConfig("tiny");  // r = 64, dr = 16: 64 + 4 + 32 = 100 bytes
  LatentKvCache cache(c, 4, 10, cpu::KvDType::kFp8);
  EXPECT_EQ(cache.bytes_per_token(), static_cast<uint64_t>(c.num_hidden_layers * 100));
  EXPECT_EQ(cache.block_bytes(), static_cast<uint64_t>(4 * c.num_hidden_layers * 100));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 1);
  for (cpu::KvDType t : {cpu::KvDType::kInt8, cpu::KvDType::kFp8}) {
    std::vector<float> row(80);
    for (float& v : row) v = nd(rng);
    std::vector<uint8_t> bytes(static_cast<size_t>(cpu::KvRowBytes(t, 64, 16)));
    cpu::QuantizeKvRow(t, row.data(), 64, 16, bytes.data());
    const std::vector<float> back = DecodeRow(t, bytes.data(), 64, 16);
    float amax = 0;
    for (int i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(row[i]));
    for (int i = 0; i < 64; ++i) {
      const double bound =
          t == cpu::KvDType::kInt8 ? amax / 127 / 2 : std::fabs(row[i]) / 16 + amax / 448 / 1024;
      EXPECT_LE(std::fabs(back[i] - row[i]), bound + 1e-7) << cpu::KvDTypeName(t) << " " << i;
    }
    for (int j = 64; j < 80; ++j) EXPECT_EQ(back[j], Bf16ToFloat(FloatToBf16(row[j])));
  }
}

// bf16 rows: 2 (r + dr) bytes (1152 for DeepSeek-V2), each value the bf16 nearest to it (ties to
// even), checked by bounds and by hand-picked ties rather than by the conversion under test.
TEST(LatentKvCacheBf16, LayoutBytesAndRounding) {
  EXPECT_EQ(cpu::KvRowBytes(cpu::KvDType::kBf16, 512, 64), 1152);
  const ModelConfig c = *PresetConfig("tiny");  // r = 64, dr = 16: 160 bytes
  LatentKvCache cache(c, 4, 10, cpu::KvDType::kBf16);
  EXPECT_EQ(cache.bytes_per_token(), static_cast<uint64_t>(c.num_hidden_layers * 160));
  EXPECT_EQ(cache.block_bytes(), static_cast<uint64_t>(4 * c.num_hidden_layers * 160));
  cpu::KvDType parsed = cpu::KvDType::kF32;
  ASSERT_TRUE(ParseKvDType("bf16", &parsed));
  EXPECT_EQ(parsed, cpu::KvDType::kBf16);
  EXPECT_STREQ(cpu::KvDTypeName(cpu::KvDType::kBf16), "bf16");
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> row(80);
  for (float& v : row) v = nd(rng) * 100;
  // Ties (1 + 2^-8 sits halfway between 1 and 1 + 2^-7: to the even 1; 1 + 3 * 2^-8 to 1 + 2^-6),
  // a value just past a tie, a negative, a zero and a subnormal (kept, not flushed).
  const float picked[] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f, -2.5f,
                          0.0f,           0x1p-130f};
  const float want[] = {1.0f, 1.0f + 0x1p-6f, 1.0f + 0x1p-7f, -2.5f, 0.0f, 0x1p-130f};
  for (int i = 0; i < 6; ++i) row[static_cast<size_t>(10 * i + 3)] = picked[i];
  std::vector<uint8_t> bytes(static_cast<size_t>(cpu::KvRowBytes(cpu::KvDType::kBf16, 64, 16)));
  cpu::QuantizeKvRow(cpu::KvDType::kBf16, row.data(), 64, 16, bytes.data());
  const std::vector<float> back = DecodeRow(cpu::KvDType::kBf16, bytes.data(), 64, 16);
  for (int i = 0; i < 80; ++i) {
    EXPECT_LE(std::fabs(back[i] - row[i]), std::fabs(row[i]) * 0x1p-8f) << i;  // half an ulp
  }
  for (int i = 0; i < 6; ++i) EXPECT_EQ(back[static_cast<size_t>(10 * i + 3)], want[i]) << i;
  std::vector<float> widened(80);
  cpu::DequantizeKvRows(cpu::KvDType::kBf16, bytes.data(), 1, 64, 16, widened.data());
  EXPECT_EQ(0, std::memcmp(widened.data(), back.data(), 80 * sizeof(float)));
}

// Attention over an 8-bit paged cache equals attention over the same rows decoded (by the
// definition above) into a contiguous fp32 cache: dequantization inside the kernel is exact.
TEST(LatentKvCache8Bit, KernelsReadTheStoredRowsExactly) {
  const ModelConfig c = *PresetConfig("tiny");
  const int64_t r = c.kv_lora_rank, dr = c.qk_rope_head_dim, lc = r + dr;
  const int64_t h = c.num_attention_heads, dn = c.qk_nope_head_dim, dv = c.v_head_dim;
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> kv_b(static_cast<size_t>(h * (dn + dv) * r));
  for (float& v : kv_b) v = nd(rng) * 0.1f;
  cpu::MlaParams p;
  p.num_heads = h;
  p.nope_dim = dn;
  p.rope_dim = dr;
  p.v_dim = dv;
  p.latent_rank = r;
  p.softmax_scale = 0.1f;
  p.kv_b = kv_b.data();
  for (cpu::KvDType t : {cpu::KvDType::kInt8, cpu::KvDType::kFp8, cpu::KvDType::kBf16}) {
    LatentKvCache cache(c, 4, 16, t);
    PagedKvSequence paged(&cache);
    SequenceKvCache plain(c);
    const int64_t n = 23;
    ASSERT_TRUE(paged.Reserve(n).ok());
    ASSERT_TRUE(plain.Reserve(n).ok());
    std::vector<float> row(static_cast<size_t>(lc));
    for (int64_t pos = 0; pos < n; ++pos) {
      for (float& v : row) v = nd(rng);
      paged.WriteRow(1, pos, row.data());
      const int64_t bt = cache.block_tokens();
      const uint8_t* stored =
          cache.BlockLayer(paged.block_table()[static_cast<size_t>(pos / bt)], 1) +
          (pos % bt) * cache.row_bytes();
      const std::vector<float> decoded = DecodeRow(t, stored, r, dr);
      plain.WriteRow(1, pos, decoded.data());
    }
    paged.Advance(n);
    plain.Advance(n);
    const int64_t q_rows = 3;
    std::vector<float> q(static_cast<size_t>(q_rows * h * (dn + dr)));
    for (float& v : q) v = nd(rng);
    std::vector<float> a(static_cast<size_t>(q_rows * h * dv)), b(a.size()), scratch;
    cpu::MlaAttentionNaive(p, q.data(), q_rows, paged.Rows(1), n, n - q_rows, a.data(), &scratch);
    cpu::MlaAttentionNaive(p, q.data(), q_rows, plain.Rows(1), n, n - q_rows, b.data(), &scratch);
    EXPECT_LE(MaxDiff(a, b), 1e-5) << cpu::KvDTypeName(t) << " naive";
    cpu::MlaAttentionAbsorbed(p, q.data(), q_rows, paged.Rows(1), n, n - q_rows, a.data(),
                              &scratch);
    cpu::MlaAttentionAbsorbed(p, q.data(), q_rows, plain.Rows(1), n, n - q_rows, b.data(),
                              &scratch);
    EXPECT_LE(MaxDiff(a, b), 1e-5) << cpu::KvDTypeName(t) << " absorbed";
    const cpu::LatentRows pr = paged.Rows(1), sr = plain.Rows(1);
    const int64_t ctx = n;
    cpu::MlaDecodeAbsorbedBatch(p, q.data(), 1, &pr, &ctx, a.data(), &scratch);
    cpu::MlaDecodeAbsorbedBatch(p, q.data(), 1, &sr, &ctx, b.data(), &scratch);
    a.resize(static_cast<size_t>(h * dv));
    b.resize(a.size());
    EXPECT_LE(MaxDiff(a, b), 1e-5) << cpu::KvDTypeName(t) << " batched decode";
  }
}

}  // namespace
}  // namespace dmoe
