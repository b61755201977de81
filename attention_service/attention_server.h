// The gRPC adapter of an attention node: AttentionService (Generate streaming, Cancel, GetLoad)
// over a Scheduler, and the thread that runs the scheduler's steps.
#ifndef DMOE_ATTENTION_SERVICE_ATTENTION_SERVER_H_
#define DMOE_ATTENTION_SERVICE_ATTENTION_SERVER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <thread>

#include "attention_service/attention_metrics.h"
#include "attention_service/scheduler.h"
#include "proto/attention.grpc.pb.h"

namespace dmoe {

// Steps the scheduler on its own thread until Stop.
class SchedulerLoop {
 public:
  explicit SchedulerLoop(Scheduler* scheduler) : scheduler_(scheduler) {}
  ~SchedulerLoop() { Stop(); }
  // Called with the wall time of each step that ran a batch (not of idle or failed ones), on the
  // loop's thread. Call before Start.
  void SetStepObserver(std::function<void(double seconds)> f) { on_step_ = std::move(f); }
  void Start();
  void Stop();

 private:
  Scheduler* scheduler_;
  std::function<void(double)> on_step_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class AttentionServiceImpl final : public internal::AttentionService::CallbackService {
 public:
  // `metrics` may be null.
  explicit AttentionServiceImpl(Scheduler* scheduler, AttentionMetrics* metrics = nullptr)
      : scheduler_(scheduler), metrics_(metrics) {}
  // Calls without this token (common/cluster_token.h) get UNAUTHENTICATED; empty: no check.
  // Call before serving.
  void SetClusterToken(std::string token) { token_ = std::move(token); }
  // A Generate stream whose reader (the gateway, held back by a slow client) leaves more than
  // this many bytes unread ends RESOURCE_EXHAUSTED and its sequence is cancelled: the node holds
  // at most this much per stream. Call before serving.
  void SetMaxStreamBacklog(size_t bytes) { max_backlog_ = bytes; }
  grpc::ServerWriteReactor<internal::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const internal::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const internal::CancelRequest* request,
                                   internal::CancelReply* reply) override;
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* ctx,
                                    const internal::GetLoadRequest* request,
                                    internal::GetLoadReply* reply) override;

 private:
  Scheduler* scheduler_;
  AttentionMetrics* metrics_;
  std::string token_;
  size_t max_backlog_ = size_t{16} << 20;
};

// Protobuf sampling parameters -> SamplingParams (top_p 0 means off).
SamplingParams FromProto(const internal::SamplingParams& p);

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_ATTENTION_SERVER_H_
