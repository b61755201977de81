// Progress of loading weights from a checkpoint, for an operator watching a process start: on a
// terminal one status line redrawn at most 5 times a second (tensors and bytes loaded, rate, time
// left), otherwise (a log file, a pod's log) one line per 10 % and a last line at the end.
#ifndef DMOE_MODEL_LOAD_PROGRESS_H_
#define DMOE_MODEL_LOAD_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dmoe {

class LoadProgress {
 public:
  // `what` names the load in every line ("dmoe-expert: 24 experts"); the totals are what the
  // caller expects to read (a reading past them is shown as 100 %). `terminal` -1: ask isatty.
  LoadProgress(std::string what, uint64_t total_tensors, uint64_t total_bytes,
               std::FILE* out = stderr, int terminal = -1);
  LoadProgress(const LoadProgress&) = delete;
  LoadProgress& operator=(const LoadProgress&) = delete;

  // One tensor of `bytes` was read. Thread-safe.
  void Add(uint64_t bytes);
  // The last line (totals, time, rate): call it when the load succeeded.
  void Done();
  // Without Done() (the load failed), says where it stopped.
  ~LoadProgress();

 private:
  std::string Line(double seconds) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string what_;
  const uint64_t total_tensors_, total_bytes_;
  std::FILE* const out_;
  const bool terminal_;
  const std::chrono::steady_clock::time_point start_;
  absl::Mutex mu_;
  uint64_t tensors_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int logged_tenths_ ABSL_GUARDED_BY(mu_) = 0;
  double last_draw_ ABSL_GUARDED_BY(mu_) = -1;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmoe

#endif  // DMOE_MODEL_LOAD_PROGRESS_H_
