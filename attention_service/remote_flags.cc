#include "attention_service/remote_flags.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/cluster_token.h"
#include "router/member.h"

namespace dmoe {

const char kRemoteHelp[] = R"(
Remote experts (without these flags every routed expert runs in this process):
  --expert-shards LIST    comma-separated gRPC control addresses of dmoe-expert shards; the
                          routed experts then run there, reached over UCX. A shard that failed
                          is connected again once its control API answers (asked every 2 s)
  --wire-dtype T          bf16 (default) or f32: hidden rows on the wire
  --expert-deadline-ms N  deadline of one dispatch/combine round trip (default 5000)
  --hedge-factor X        where an expert has another replica, a round trip still unanswered
                          X times its shard's recent p99 round trip after dispatch also goes to
                          that replica; the first answer wins (the same bits either way). A shard
                          that loses is set aside until its late reply comes. Never later than a
                          quarter of --expert-deadline-ms. Default 3; 0 turns hedging off
  --hedge-min-ms N        never hedge sooner than N ms after dispatch (default 2; a shard with
                          fewer than 16 round trips on record is hedged after 50 ms)
  --ucx-connect MODE      listener (default; needs tcp in UCX_TLS) or worker (the shard's worker
                          address; works with UCX_TLS=sm,self)
  --router H:P            take the shards from dmoe-router's placement instead of --expert-shards
                          (waits up to 30 s for a first active map; follows later maps)
  --cluster-token-file F  the cluster token (first line of F): sent to the router and the expert
                          shards; this node's own API then refuses calls without it
                          (UNAUTHENTICATED)

Weight formats (8-bit weights are weight-only quantization: activations stay fp32):
  --weight-dtype T        auto (default), f32, bf16, int8 or fp8: the attention/dense/shared-
                          expert projections (int8: per-channel scales; fp8: e4m3 with 128x128
                          block scales). auto keeps a bf16 checkpoint's bf16 (same results as
                          f32, half the memory) and an fp8 one's fp8, and reads the rest as f32.
  --expert-dtype T        the same for the routed experts held in this process
)";

const std::set<std::string> kRemoteFlags = {
    "expert-shards", "wire-dtype", "expert-deadline-ms", "hedge-factor", "hedge-min-ms",
    "ucx-connect",   "router",     "cluster-token-file", "weight-dtype", "expert-dtype"};

std::set<std::string> WithRemote(std::set<std::string> flags) {
  flags.insert(kRemoteFlags.begin(), kRemoteFlags.end());
  return flags;
}

namespace {

// --expert-deadline-ms, --hedge-factor, --hedge-min-ms.
absl::Status TimingOptions(const Flags& flags, RemoteExpertsOptions* o) {
  auto deadline = flags.Int("expert-deadline-ms", 5000);
  if (!deadline.ok()) return deadline.status();
  if (*deadline <= 0) return absl::InvalidArgumentError("--expert-deadline-ms: must be positive");
  o->deadline = std::chrono::milliseconds(*deadline);
  auto factor = flags.Double("hedge-factor", 3.0);
  if (!factor.ok()) return factor.status();
  if (!(*factor >= 0) || *factor > 1000) {
    return absl::InvalidArgumentError("--hedge-factor: must be 0 (off) or a positive factor");
  }
  o->hedge.factor = *factor;
  auto floor = flags.Int("hedge-min-ms", 2);
  if (!floor.ok()) return floor.status();
  if (*floor < 0) return absl::InvalidArgumentError("--hedge-min-ms: must not be negative");
  o->hedge.floor = std::chrono::milliseconds(*floor);
  return absl::OkStatus();
}

}  // namespace

// Fills the remote-expert part of `o` from the flags.
absl::Status RemoteOptions(const Flags& flags, LocalModelOptions* o) {
  const std::string shards = flags.StringOr("expert-shards", "");
  if (!shards.empty()) {
    for (absl::string_view s : absl::StrSplit(shards, ',')) {
      if (s.empty()) return absl::InvalidArgumentError("--expert-shards: empty address");
      o->expert_shards.emplace_back(s);
    }
  }
  for (auto [name, field] : {std::pair<const char*, WeightDType*>{"weight-dtype", &o->weight_dtype},
                             {"expert-dtype", &o->expert_dtype}}) {
    const std::string v = flags.StringOr(name, "auto");
    if (!ParseWeightDType(v, field)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, ": \"", v, "\" is not auto, f32, bf16, int8 or fp8"));
    }
  }
  o->shard_client.router = flags.StringOr("router", "");
  if (flags.Has("router") && o->shard_client.router.empty()) {
    return absl::InvalidArgumentError("--router: empty address");
  }
  if (!o->expert_shards.empty() && !o->shard_client.router.empty()) {
    return absl::InvalidArgumentError("--expert-shards and --router: give one of them");
  }
  if (flags.Has("cluster-token-file")) {
    auto t = ReadClusterTokenFile(flags.StringOr("cluster-token-file", ""));
    if (!t.ok()) return t.status();
    o->shard_client.cluster_token = *t;
  }
  const std::string dtype = flags.StringOr("wire-dtype", "bf16");
  if (dtype == "bf16") {
    o->shard_client.remote.dtype = wire::WireDType::kBF16;
  } else if (dtype == "f32") {
    o->shard_client.remote.dtype = wire::WireDType::kF32;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--wire-dtype: \"", dtype, "\" is not bf16 or f32"));
  }
  if (auto st = TimingOptions(flags, &o->shard_client.remote); !st.ok()) return st;
  const std::string mode = flags.StringOr("ucx-connect", "listener");
  if (mode == "listener") {
    o->shard_client.connect = UcxConnectMode::kListener;
  } else if (mode == "worker") {
    o->shard_client.connect = UcxConnectMode::kWorkerAddress;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--ucx-connect: \"", mode, "\" is not listener or worker"));
  }
  return absl::OkStatus();
}

}  // namespace dmoe
