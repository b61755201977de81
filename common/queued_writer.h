// A server-streaming reactor that other threads feed: Push queues a message (one write in flight
// at a time; PushLatest replaces what is queued), FinishWith ends the stream after everything
// queued. The reactor deletes itself in
// OnDone (after calling OnDoneHook), as gRPC's callback API expects. Thread-safe.
#ifndef DMOE_COMMON_QUEUED_WRITER_H_
#define DMOE_COMMON_QUEUED_WRITER_H_

#include <grpcpp/grpcpp.h>

#include <deque>

#include "common/mutex.h"

namespace dmoe {

template <typename Response>
class QueuedWriter : public grpc::ServerWriteReactor<Response> {
 public:
  void Push(Response r) {
    MutexLock l(&mu_);
    if (overflowed_) return;  // (see PushBounded)
    queued_bytes_ += r.ByteSizeLong();
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
  }
  // Push, unless the client has left more than `max_bytes` of messages unsent (it reads too
  // slowly, or not at all): then what was queued is dropped, and this and every later message
  // too (Push included), and false is returned; the caller ends the stream with FinishWith (once
  // nothing else will touch it). Bounds what a reader that stalls makes the server hold.
  bool PushBounded(Response r, size_t max_bytes) {
    MutexLock l(&mu_);
    if (overflowed_ || queued_bytes_ + r.ByteSizeLong() > max_bytes) {
      overflowed_ = true;
      queue_.clear();
      queued_bytes_ = 0;
      return false;
    }
    queued_bytes_ += r.ByteSizeLong();
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
    return true;
  }
  // For streams of whole snapshots: drops the messages not yet written (each superseded by
  // this one), so that a client that reads slowly holds at most one queued message.
  void PushLatest(Response r) {
    MutexLock l(&mu_);
    queue_.clear();
    queued_bytes_ = r.ByteSizeLong();
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
  }
  // PushBounded refused a message: the stream is dropping everything.
  bool overflowed() const {
    MutexLock l(&mu_);
    return overflowed_;
  }
  // The first call's status is the stream's (a later one, e.g. a cancelled generation reporting
  // after PushBounded refused, is ignored).
  void FinishWith(grpc::Status status) {
    MutexLock l(&mu_);
    if (finished_) return;
    finished_ = true;
    status_ = std::move(status);
    MaybeWriteLocked();
  }
  void OnWriteDone(bool ok) override {
    MutexLock l(&mu_);
    writing_ = false;
    if (!ok) broken_ = true;  // the client is gone: drop the rest
    MaybeWriteLocked();
  }
  void OnDone() override {
    // Wait out a Push/OnWriteDone still inside the lock (and order their reads of the queued
    // messages before the deletes below: gRPC's own ordering is invisible to ThreadSanitizer).
    { MutexLock l(&mu_); }
    OnDoneHook();
    delete this;
  }

 protected:
  // Runs once the stream is over, before the reactor is deleted (e.g. joining a worker thread).
  virtual void OnDoneHook() {}

 private:
  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finish_sent_) return;
    if (!queue_.empty() && !broken_) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      queued_bytes_ -= std::min(queued_bytes_, current_.ByteSizeLong());
      writing_ = true;
      this->StartWrite(&current_);
      return;
    }
    if (finished_) {
      finish_sent_ = true;
      this->Finish(status_);
    }
  }

  mutable Mutex mu_;
  std::deque<Response> queue_ ABSL_GUARDED_BY(mu_);
  size_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // of queue_ (not the one being written)
  Response current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool overflowed_ ABSL_GUARDED_BY(mu_) = false;  // PushBounded refused: drop everything
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe

#endif  // DMOE_COMMON_QUEUED_WRITER_H_
