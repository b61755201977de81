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
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
  }
  // For streams of whole snapshots: drops the messages not yet written (each superseded by
  // this one), so that a client that reads slowly holds at most one queued message.
  void PushLatest(Response r) {
    MutexLock l(&mu_);
    queue_.clear();
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
  }
  void FinishWith(grpc::Status status) {
    MutexLock l(&mu_);
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
      writing_ = true;
      this->StartWrite(&current_);
      return;
    }
    if (finished_) {
      finish_sent_ = true;
      this->Finish(status_);
    }
  }

  Mutex mu_;
  std::deque<Response> queue_ ABSL_GUARDED_BY(mu_);
  Response current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe

#endif  // DMOE_COMMON_QUEUED_WRITER_H_
