// `dmoe bench --backend grpc`: the same requests through dmoe.v1.Dmoe, so that the HTTP front's
// overhead can be measured against the gRPC API.
#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cli/openai_bench_internal.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe::cli::bench {
namespace {

double Seconds(SteadyClock::duration d) { return std::chrono::duration<double>(d).count(); }

// "UNAVAILABLE", ... (absl's and gRPC's codes are the same numbers).
std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

void SetUp(const GrpcOptions& o, grpc::ClientContext* ctx) {
  if (!o.api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + o.api_key);
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(
                        std::chrono::duration<double>(o.timeout_s)));
}

void FillSampling(const BenchRequest& r, v1::SamplingParams* s) {
  s->set_max_tokens(r.output_len);
  s->set_temperature(0);
  s->set_ignore_eos(true);
}

class GrpcClient : public BenchClient {
 public:
  explicit GrpcClient(GrpcOptions o)
      : options_(std::move(o)),
        stub_(v1::Dmoe::NewStub(
            grpc::CreateChannel(options_.target, grpc::InsecureChannelCredentials()))) {}

  RequestResult Send(const BenchRequest& request) override {
    grpc::ClientContext ctx;
    SetUp(options_, &ctx);
    const auto t0 = SteadyClock::now();
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
    if (options_.chat) {
      v1::ChatRequest req;
      req.set_model(options_.model);
      v1::ChatMessage* m = req.add_messages();
      m->set_role("user");
      m->set_content(request.prompt.is_string() ? request.prompt.get<std::string>() : "");
      FillSampling(request, req.mutable_sampling());
      reader = stub_->Chat(&ctx, req);
    } else {
      v1::GenerateRequest req;
      req.set_model(options_.model);
      if (request.prompt.is_string()) {
        req.set_text(request.prompt.get<std::string>());
      } else {
        for (const auto& id : request.prompt) req.mutable_token_ids()->add_ids(id.get<int32_t>());
      }
      FillSampling(request, req.mutable_sampling());
      reader = stub_->Generate(&ctx, req);
    }
    return ReadStream(reader.get(), t0);
  }

 private:
  static RequestResult ReadStream(grpc::ClientReader<v1::GenerateResponse>* reader,
                                  SteadyClock::time_point t0) {
    RequestResult r;
    v1::GenerateResponse msg;
    auto last = t0;
    while (reader->Read(&msg)) {
      const auto now = SteadyClock::now();
      if (msg.token_ids_size() > 0) {
        if (r.events == 0) {
          r.ttft_s = Seconds(now - t0);
        } else {
          r.itl.push_back(Seconds(now - last));
        }
        last = now;
        ++r.events;
      }
      if (msg.has_usage()) {
        r.has_usage = true;
        r.prompt_tokens = msg.usage().prompt_tokens();
        r.completion_tokens = msg.usage().completion_tokens();
      }
    }
    const grpc::Status st = reader->Finish();
    r.e2e_s = Seconds(SteadyClock::now() - t0);
    if (!st.ok()) {
      r.error = absl::StrCat("grpc_", CodeName(st.error_code()));
      r.detail = st.error_message();
      return r;
    }
    r.ok = true;
    return r;
  }

  GrpcOptions options_;
  std::unique_ptr<v1::Dmoe::Stub> stub_;
};

}  // namespace

std::unique_ptr<BenchClient> NewGrpcClient(const GrpcOptions& o) {
  return std::make_unique<GrpcClient>(o);
}

absl::StatusOr<std::vector<ModelInfo>> ListGrpcModels(const GrpcOptions& o) {
  auto stub = v1::Dmoe::NewStub(grpc::CreateChannel(o.target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  GrpcOptions short_deadline = o;
  short_deadline.timeout_s = 30;
  SetUp(short_deadline, &ctx);
  v1::ListModelsResponse resp;
  const grpc::Status st = stub->ListModels(&ctx, v1::ListModelsRequest(), &resp);
  if (!st.ok()) {
    return absl::UnavailableError(
        absl::StrCat("ListModels: ", CodeName(st.error_code()), ": ", st.error_message()));
  }
  std::vector<ModelInfo> models;
  for (const v1::Model& m : resp.models()) models.push_back({m.id(), m.vocab_size()});
  return models;
}

}  // namespace dmoe::cli::bench
