#include "model/load_progress.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_format.h"

namespace dmoe {

namespace {

std::string Bytes(double b) {
  if (b >= 1024.0 * 1024 * 1024) return absl::StrFormat("%.2f GiB", b / (1024.0 * 1024 * 1024));
  return absl::StrFormat("%.1f MiB", b / (1024.0 * 1024));
}

}  // namespace

LoadProgress::LoadProgress(std::string what, uint64_t total_tensors, uint64_t total_bytes,
                           std::FILE* out, int terminal)
    : what_(std::move(what)),
      total_tensors_(total_tensors),
      total_bytes_(total_bytes),
      out_(out),
      terminal_(terminal < 0 ? isatty(fileno(out)) != 0 : terminal != 0),
      start_(std::chrono::steady_clock::now()) {
  absl::MutexLock l(&mu_);
  std::fprintf(out_, "%s: loading %llu tensors, %s\n", what_.c_str(),
               static_cast<unsigned long long>(total_tensors_),
               Bytes(static_cast<double>(total_bytes_)).c_str());
  std::fflush(out_);
}

std::string LoadProgress::Line(double seconds) const {
  const double total = static_cast<double>(std::max<uint64_t>(total_bytes_, 1));
  const double done = static_cast<double>(std::min(bytes_, total_bytes_));
  const double rate = seconds > 0 ? static_cast<double>(bytes_) / seconds : 0;
  std::string line = absl::StrFormat(
      "%s: %3.0f%%  %llu/%llu tensors  %s/%s  %s/s", what_, 100.0 * done / total,
      static_cast<unsigned long long>(std::min(tensors_, total_tensors_)),
      static_cast<unsigned long long>(total_tensors_), Bytes(done), Bytes(total), Bytes(rate));
  if (rate > 0 && done < total) {
    absl::StrAppendFormat(&line, "  %.0f s left", (total - done) / rate);
  }
  return line;
}

void LoadProgress::Add(uint64_t bytes) {
  absl::MutexLock l(&mu_);
  if (done_) return;
  ++tensors_;
  bytes_ += bytes;
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (terminal_) {
    if (last_draw_ >= 0 && t - last_draw_ < 0.2) return;
    last_draw_ = t;
    std::fprintf(out_, "\r%s\033[K", Line(t).c_str());
    std::fflush(out_);
    return;
  }
  const int tenths =
      total_bytes_ == 0
          ? 10
          : static_cast<int>(std::min<uint64_t>(bytes_, total_bytes_) * 10 / total_bytes_);
  if (tenths > logged_tenths_ && tenths < 10) {
    logged_tenths_ = tenths;
    std::fprintf(out_, "%s\n", Line(t).c_str());
    std::fflush(out_);
  }
}

LoadProgress::~LoadProgress() {
  absl::MutexLock l(&mu_);
  if (done_) return;
  std::fprintf(out_, "%s%s: loading stopped after %llu tensors\n", terminal_ ? "\r\033[K" : "",
               what_.c_str(), static_cast<unsigned long long>(tensors_));
  std::fflush(out_);
}

void LoadProgress::Done() {
  absl::MutexLock l(&mu_);
  if (done_) return;
  done_ = true;
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::fprintf(out_, "%s%s: loaded %llu tensors, %s in %.2f s (%s/s)\n",
               terminal_ ? "\r\033[K" : "", what_.c_str(),
               static_cast<unsigned long long>(tensors_),
               Bytes(static_cast<double>(bytes_)).c_str(), t,
               Bytes(t > 0 ? static_cast<double>(bytes_) / t : 0).c_str());
  std::fflush(out_);
}

}  // namespace dmoe
