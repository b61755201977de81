// Time as the code that decides deadlines, stalls and leases sees it: Clock::Real() in the
// services, a ManualClock in tests that step time instead of sleeping (a loaded CI machine makes
// sleeps and wall-clock bounds flaky).
#ifndef DMOE_COMMON_CLOCK_H_
#define DMOE_COMMON_CLOCK_H_

#include <atomic>
#include <chrono>

namespace dmoe {

class Clock {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual time_point Now() const = 0;
  // std::chrono::steady_clock; one for the process, never destroyed.
  static const Clock* Real();
};

// Stands still until Advance. Thread-safe.
class ManualClock : public Clock {
 public:
  time_point Now() const override { return now_.load(); }
  void Advance(std::chrono::nanoseconds d) {
    time_point t = now_.load();
    while (!now_.compare_exchange_weak(t, t + d)) {
    }
  }

 private:
  // Not the epoch: code may subtract a duration from Now() or treat time_point{} as "unset".
  std::atomic<time_point> now_{time_point{} + std::chrono::hours(1)};
};

inline const Clock* Clock::Real() {
  class RealClock : public Clock {
   public:
    time_point Now() const override { return std::chrono::steady_clock::now(); }
  };
  static const RealClock* real = new RealClock();
  return real;
}

}  // namespace dmoe

#endif  // DMOE_COMMON_CLOCK_H_
