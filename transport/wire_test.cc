#include "transport/wire.h"

#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"

namespace dmoe::wire {
namespace {

Header DispatchHeader(uint32_t tokens, uint32_t hidden, WireDType dtype) {
  Header h;
  h.sender_id = 7;
  h.step_seq = 123456789012345ull;
  h.layer = 3;
  h.micro_batch = 1;
  h.token_count = tokens;
  h.hidden_size = hidden;
  h.dtype = dtype;
  return h;
}

TEST(Wire, DispatchRoundTripF32IsExact) {
  std::vector<float> rows = {1.5f, -2.25f, 3.0f, 0.1f, 7.0f, -0.5f};
  std::vector<Pair> pairs = {{0, 4, 0.25f}, {1, 9, 1.5f}, {1, 2, -0.125f}};
  std::vector<uint8_t> buf;
  EncodeDispatch(DispatchHeader(2, 3, WireDType::kF32), rows.data(), pairs, &buf);
  ASSERT_EQ(buf.size(), kHeaderBytes + 6 * 4 + 3 * kPairBytes);
  auto v = DecodeMessage(buf.data(), buf.size());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->header.kind, Kind::kDispatch);
  EXPECT_EQ(v->header.step_seq, 123456789012345ull);
  EXPECT_EQ(v->header.layer, 3u);
  EXPECT_EQ(v->header.pair_count, 3u);
  float row[3];
  v->RowToFloat(1, row);
  EXPECT_EQ(row[0], 0.1f);
  EXPECT_EQ(row[2], -0.5f);
  EXPECT_EQ(v->pair(2).expert, 2u);
  EXPECT_EQ(v->pair(2).weight, -0.125f);
}

TEST(Wire, Bf16RowsAreRoundedToNearestEven) {
  std::vector<float> rows = {1.0f + 1.0f / 256, 3.14159f};
  std::vector<uint8_t> buf;
  EncodeCombine(DispatchHeader(1, 2, WireDType::kBF16), rows.data(), &buf);
  auto v = DecodeMessage(buf.data(), buf.size());
  ASSERT_TRUE(v.ok());
  float row[2];
  v->RowToFloat(0, row);
  EXPECT_EQ(row[0], 1.0f);
  EXPECT_EQ(row[1], Bf16ToFloat(FloatToBf16(3.14159f)));
}

TEST(Wire, ErrorMessagesCarryText) {
  std::vector<uint8_t> buf;
  EncodeError(DispatchHeader(5, 4, WireDType::kF32), "expert 3 of layer 1 is not hosted", &buf);
  auto v = DecodeMessage(buf.data(), buf.size());
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->header.kind, Kind::kError);
  EXPECT_EQ(v->error, "expert 3 of layer 1 is not hosted");
}

TEST(Wire, RejectsMalformedMessages) {
  std::vector<float> rows(8, 1.0f);
  std::vector<uint8_t> good;
  EncodeDispatch(DispatchHeader(2, 4, WireDType::kF32), rows.data(), {{1, 0, 1.0f}}, &good);
  auto expect_bad = [](std::vector<uint8_t> b, const char* what) {
    auto v = DecodeMessage(b.data(), b.size());
    ASSERT_FALSE(v.ok()) << what;
    EXPECT_NE(std::string(v.status().message()).find(what), std::string::npos) << v.status();
  };
  expect_bad(std::vector<uint8_t>(good.begin(), good.begin() + 10), "shorter than");
  expect_bad(std::vector<uint8_t>(good.begin(), good.end() - 1), "payload bytes");
  auto extra = good;
  extra.push_back(0);
  expect_bad(extra, "payload bytes");
  auto magic = good;
  magic[0] ^= 1;
  expect_bad(magic, "bad magic");
  auto version = good;
  version[4] = 9;
  expect_bad(version, "unsupported version");
  auto kind = good;
  kind[6] = 7;
  expect_bad(kind, "unknown kind");
  auto dtype = good;
  dtype[36] = 5;
  expect_bad(dtype, "unknown dtype");
  auto reserved = good;
  reserved[60] = 1;
  expect_bad(reserved, "reserved");
  auto tokens = good;
  tokens[28] = 3;  // 3 tokens: sizes no longer add up
  expect_bad(tokens, "sizes give");
  auto huge = good;
  huge[31] = 0x7f;  // token_count ~ 2^30
  expect_bad(huge, "token_count");
  auto hidden = good;
  std::memset(hidden.data() + 32, 0, 4);
  expect_bad(hidden, "hidden_size 0");
  auto pair_token = good;
  pair_token[kHeaderBytes + 32] = 2;  // the pair names token 2 of 2
  expect_bad(pair_token, "names token 2 of 2");
  auto weight = good;
  const float nan = __builtin_nanf("");
  std::memcpy(weight.data() + kHeaderBytes + 32 + 8, &nan, 4);
  expect_bad(weight, "non-finite weight");
  auto oversized = good;
  const uint64_t big = uint64_t{1} << 40;
  std::memcpy(oversized.data() + 44, &big, 8);
  expect_bad(oversized, "exceeds the limit");
}

}  // namespace
}  // namespace dmoe::wire
