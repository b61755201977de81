#include "cli/gateway_client.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstdlib>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "attention_service/sampler.h"

namespace dmoe::cli {

absl::Status SamplingFromFlags(const Flags& f, v1::SamplingParams* p) {
  auto max_tokens = f.Int("max-tokens", 16);
  auto temperature = f.Double("temperature", 0.0);
  auto seed = f.Int("seed", 0);
  auto top_k = f.Int("top-k", 0);
  auto top_p = f.Double("top-p", 1.0);
  auto min_p = f.Double("min-p", 0.0);
  for (const absl::Status& s : {max_tokens.status(), temperature.status(), seed.status(),
                                top_k.status(), top_p.status(), min_p.status()}) {
    if (!s.ok()) return s;
  }
  p->set_max_tokens(*max_tokens);
  p->set_temperature(*temperature);
  p->set_seed(static_cast<uint64_t>(*seed));
  p->set_top_k(*top_k);
  p->set_top_p(*top_p);
  p->set_min_p(*min_p);
  if (f.Has("stop")) p->add_stop(f.StringOr("stop", ""));
  if (f.Has("stop-token")) {
    auto stop_token = f.Int("stop-token", -1);
    if (!stop_token.ok()) return stop_token.status();
    p->add_stop_token_ids(static_cast<int32_t>(*stop_token));
  }
  auto logprobs = f.Int("logprobs", -1);
  if (!logprobs.ok()) return logprobs.status();
  if (*logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("--logprobs: at most ", kMaxTopLogprobs));
  }
  if (f.Has("logprobs") && *logprobs < 0) return absl::InvalidArgumentError("--logprobs: negative");
  if (*logprobs >= 0) {
    p->set_logprobs(true);
    p->set_top_logprobs(*logprobs);
  }
  p->set_ignore_eos(f.Bool("ignore-eos"));
  return absl::OkStatus();
}

namespace {

template <typename Request>
int Stream(const Flags& f, const Request& req,
           std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> (v1::Dmoe::Stub::*call)(
               grpc::ClientContext*, const Request&)) {
  const std::string target = f.StringOr("target", "");
  auto stub = v1::Dmoe::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  std::string key = f.StringOr("api-key", "");
  if (key.empty() && std::getenv("DMOE_API_KEY")) key = std::getenv("DMOE_API_KEY");
  if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
  auto timeout = f.Int("timeout-ms", 0);
  if (timeout.ok() && *timeout > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(*timeout));
  }
  const bool ids_only = f.Bool("print-token-ids");
  auto reader = ((*stub).*call)(&ctx, req);
  v1::GenerateResponse r;
  std::vector<int32_t> ids;
  std::string finish;
  std::vector<std::string> logprob_lines;  // --logprobs: printed after the text
  while (reader->Read(&r)) {
    for (int i = 0; i < r.logprobs_size() && i < r.token_ids_size(); ++i) {
      std::string line = absl::StrFormat("%5zu %7d %10.5f", ids.size() + static_cast<size_t>(i),
                                         r.token_ids(i), r.logprobs(i));
      if (i < r.top_logprobs_size()) {
        for (const auto& t : r.top_logprobs(i).top()) {
          absl::StrAppend(&line, absl::StrFormat("  %d:%s:%.5f", t.token_id(),
                                                 absl::CEscape(t.token()), t.logprob()));
        }
      }
      logprob_lines.push_back(std::move(line));
    }
    if (ids_only && r.token_ids_size() > 0) {  // streamed as they arrive: a watcher sees progress
      std::printf("%s%s", ids.empty() ? "" : ",", absl::StrJoin(r.token_ids(), ",").c_str());
      std::fflush(stdout);
    }
    ids.insert(ids.end(), r.token_ids().begin(), r.token_ids().end());
    if (!ids_only && !r.text_delta().empty()) {
      std::fwrite(r.text_delta().data(), 1, r.text_delta().size(), stdout);
      std::fflush(stdout);
    }
    if (!r.finish_reason().empty()) finish = r.finish_reason();
  }
  const grpc::Status st = reader->Finish();
  if (!st.ok()) {
    if (ids_only && !ids.empty()) std::printf("\n");  // the ids that arrived before the error
    std::fprintf(stderr, "%serror: %s (%s)\n", ids_only ? "" : "\n", st.error_message().c_str(),
                 absl::StrCat("gRPC code ", static_cast<int>(st.error_code())).c_str());
    return 2;
  }
  if (ids_only) {
    std::printf("\n");
  } else {
    if (!logprob_lines.empty()) {
      std::printf("\n  pos token_id    logprob  top: id:token:logprob ...\n%s",
                  absl::StrJoin(logprob_lines, "\n").c_str());
    }
    std::printf("\n");
    std::fprintf(stderr, "[%zu tokens, finish: %s]\n", ids.size(), finish.c_str());
  }
  return 0;
}

}  // namespace

int GenerateViaGateway(const Flags& f, const std::string& text, const std::vector<int32_t>* ids) {
  v1::GenerateRequest req;
  if (ids != nullptr) {
    for (int32_t id : *ids) req.mutable_token_ids()->add_ids(id);
  } else {
    req.set_text(text);
  }
  if (auto s = SamplingFromFlags(f, req.mutable_sampling()); !s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  return Stream(f, req, &v1::Dmoe::Stub::Generate);
}

int ChatViaGateway(const Flags& f, const std::vector<std::pair<std::string, std::string>>& turns) {
  v1::ChatRequest req;
  for (const auto& [role, content] : turns) {
    auto* m = req.add_messages();
    m->set_role(role);
    m->set_content(content);
  }
  if (auto s = SamplingFromFlags(f, req.mutable_sampling()); !s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  return Stream(f, req, &v1::Dmoe::Stub::Chat);
}

}  // namespace dmoe::cli
