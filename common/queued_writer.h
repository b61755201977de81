// A server-streaming reactor that other threads feed: Push queues a message (one write in flight
// at a time), FinishWith ends the stream after everything queued. The reactor deletes itself in
// OnDone (after calling OnDoneHook), as gRPC's callback API expects. Thread-safe.
#ifndef DMOE_COMMON_QUEUED_WRITER_H_
#define DMOE_COMMON_QUEUED_WRITER_H_

#include <grpcpp/grpcpp.h>

#include <deque>
#include <mutex>

namespace dmoe {

template <typename Response>
class QueuedWriter : public grpc::ServerWriteReactor<Response> {
 public:
  void Push(Response r) {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(std::move(r));
    MaybeWriteLocked();
  }
  void FinishWith(grpc::Status status) {
    std::lock_guard<std::mutex> l(mu_);
    finished_ = true;
    status_ = std::move(status);
    MaybeWriteLocked();
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) broken_ = true;  // the client is gone: drop the rest
    MaybeWriteLocked();
  }
  void OnDone() override {
    // Wait out a Push/OnWriteDone still inside the lock (and order their reads of the queued
    // messages before the deletes below: gRPC's own ordering is invisible to ThreadSanitizer).
    { std::lock_guard<std::mutex> l(mu_); }
    OnDoneHook();
    delete this;
  }

 protected:
  // Runs once the stream is over, before the reactor is deleted (e.g. joining a worker thread).
  virtual void OnDoneHook() {}

 private:
  // REQUIRES: mu_ held.
  void MaybeWriteLocked() {
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

  std::mutex mu_;
  std::deque<Response> queue_;
  Response current_;
  bool writing_ = false;
  bool finished_ = false;
  bool finish_sent_ = false;
  bool broken_ = false;
  grpc::Status status_;
};

}  // namespace dmoe

#endif  // DMOE_COMMON_QUEUED_WRITER_H_
