#include "transport/buffer_pool.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe::transport {
namespace {

std::vector<uint8_t> Buffer(size_t capacity, size_t size) {
  std::vector<uint8_t> b;
  b.reserve(capacity);
  b.resize(size, 7);
  return b;
}

TEST(BufferPool, AcquireGivesTheLargestBufferUncleared) {
  BufferPool pool;
  pool.Release(Buffer(1000, 10));
  pool.Release(Buffer(5000, 40));
  pool.Release(Buffer(2000, 20));
  std::vector<uint8_t> b = pool.Acquire();
  EXPECT_GE(b.capacity(), 5000u);
  EXPECT_EQ(b.size(), 40u);  // old size and contents: encoders resize over them
  EXPECT_EQ(b[39], 7);
  EXPECT_GE(pool.Acquire().capacity(), 2000u);
  EXPECT_GE(pool.Acquire().capacity(), 1000u);
  EXPECT_EQ(pool.Acquire().capacity(), 0u);  // empty pool: a new buffer
}

TEST(BufferPool, AcquireSizedTakesTheSmallestThatFitsWithoutReallocating) {
  BufferPool pool;
  pool.Release(Buffer(8000, 8000));
  pool.Release(Buffer(1500, 100));
  pool.Release(Buffer(3000, 3000));
  const uint8_t* fit_data = nullptr;
  {
    std::vector<uint8_t> probe = pool.AcquireSized(1200);  // the 1500-capacity one
    EXPECT_EQ(probe.size(), 1200u);
    EXPECT_GE(probe.capacity(), 1500u);
    EXPECT_LT(probe.capacity(), 3000u);
    fit_data = probe.data();
    pool.Release(std::move(probe));
  }
  std::vector<uint8_t> again = pool.AcquireSized(1400);
  EXPECT_EQ(again.data(), fit_data);  // reused in place
  // Nothing fits: the largest is taken and grows.
  std::vector<uint8_t> big = pool.AcquireSized(20000);
  EXPECT_EQ(big.size(), 20000u);
  std::vector<uint8_t> left = pool.AcquireSized(10);
  EXPECT_GE(left.capacity(), 3000u);
  EXPECT_LT(left.capacity(), 8000u);
}

TEST(BufferPool, AmongEqualBuffersTheMostRecentlyReleasedComesBack) {
  // Cache-warm reuse: with equal buffers the one just released is handed out again, and the
  // others stay put, so a steady exchange touches a few buffers, not every one the pool holds.
  BufferPool pool;
  std::vector<uint8_t> a = Buffer(4096, 4096), b = Buffer(4096, 4096), c = Buffer(4096, 4096);
  const uint8_t* a_data = a.data();
  const uint8_t* c_data = c.data();
  pool.Release(std::move(a));
  pool.Release(std::move(b));
  pool.Release(std::move(c));
  for (int i = 0; i < 3; ++i) {
    std::vector<uint8_t> x = pool.Acquire();
    EXPECT_EQ(x.data(), c_data);
    pool.Release(std::move(x));
    std::vector<uint8_t> y = pool.AcquireSized(100);
    EXPECT_EQ(y.data(), c_data);
    pool.Release(std::move(y));
  }
  std::vector<uint8_t> first = pool.AcquireSized(100);
  std::vector<uint8_t> second = pool.AcquireSized(100);
  std::vector<uint8_t> third = pool.AcquireSized(100);
  EXPECT_EQ(first.data(), c_data);
  EXPECT_EQ(third.data(), a_data);  // the oldest comes last
}

TEST(BufferPool, KeepsAtMostMaxBuffersAndDropsEmptyOnes) {
  BufferPool pool(2);
  pool.Release(std::vector<uint8_t>());  // no storage: not kept
  pool.Release(Buffer(10, 1));
  pool.Release(Buffer(20, 1));
  pool.Release(Buffer(30, 1));  // over the limit: freed
  EXPECT_GT(pool.Acquire().capacity(), 0u);
  EXPECT_GT(pool.Acquire().capacity(), 0u);
  EXPECT_EQ(pool.Acquire().capacity(), 0u);
}

}  // namespace
}  // namespace dmoe::transport
