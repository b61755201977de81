// The GPU engine with expert shards in other processes (real dmoe-expert over UCX, tcp on
// loopback): its greedy tokens equal the in-process CPU engine's. Built twice (tests/BUILD):
//   gpu_cluster_host_test: the engine over the host emulation of the kernel API
//     (//kernels/cuda:host) with CPU shards; runs on every machine.
//   gpu_cluster_test: the CUDA build; on a GPU also the whole node as processes, dmoe-attention
//     --device cuda with shards on the CPU and with shards --device cuda. Skips, with the reason,
//     without a GPU.
#include <string>
#include <vector>

#include "attention_service/cuda_engine.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "tests/cluster_harness.h"

namespace dmoe {
namespace {

using testing::Cluster;

constexpr int kMaxTokens = 12;

testing::Prompts MakePrompts(int n) {
  testing::Prompts prompts;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 1 + (i * 11) % 30; ++j) p.push_back((i * 31 + j * 7 + 3) % 512);
    prompts.push_back(p);
  }
  return prompts;
}

#define SKIP_WITHOUT_GPU()                              \
  do {                                                  \
    const cuda::DeviceProbe probe = cuda::Probe();      \
    if (probe.count == 0) GTEST_SKIP() << probe.reason; \
  } while (0)

TEST(GpuCluster, EngineWithShardsInOtherProcesses) {
  SKIP_WITHOUT_GPU();
  const std::string model = testing::TmpDir() + "/gpu_cluster_model";
  const testing::Prompts prompts = MakePrompts(8);
  testing::Prompts expected;
  ASSERT_TRUE(testing::PrepareWorkload(model, 31, prompts, kMaxTokens, &expected).ok());
  Cluster c("gpu_engine", model);
  c.AddShard(0, {"--experts", "0/2"});
  c.AddShard(0, {"--experts", "1/2"});
  LocalModelOptions o;
  o.expert_shards = {c.shard_info(0).at("grpc"), c.shard_info(1).at("grpc")};
  o.shard_client.remote.dtype = wire::WireDType::kF32;  // the reference is the in-process engine
  auto local = LocalModel::Load(model, o);
  ASSERT_TRUE(local.ok()) << local.status();
  CudaEngineOptions g;
  g.block_tokens = 4;
  g.kv_blocks = 64;
  auto gpu =
      CudaEngine::Create((*local)->config(), (*local)->dense(), (*local)->routed_experts(), g);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateOptions opts;
    opts.max_tokens = kMaxTokens;
    opts.ignore_eos = true;
    opts.prefill_chunk = 5;
    auto out = Generate(**gpu, prompts[i], opts);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, expected[i]) << "prompt " << i;
    EXPECT_EQ((*gpu)->cache().free_blocks(), 64);  // Generate's sequence gave its blocks back
  }
}

#if DMOE_CUDA_REAL_BUILD
// dmoe-attention --device cuda as a process, with the shards on the CPU and then on the GPU.
TEST(GpuCluster, AttentionNodeOnTheGpu) {
  SKIP_WITHOUT_GPU();
  const std::string model = testing::TmpDir() + "/gpu_node_model";
  const testing::Prompts prompts = MakePrompts(16);
  testing::Prompts expected;
  ASSERT_TRUE(testing::PrepareWorkload(model, 32, prompts, kMaxTokens, &expected).ok());
  for (bool gpu_shards : {false, true}) {
    Cluster c(gpu_shards ? "gpu_node_gpu_shards" : "gpu_node_cpu_shards", model);
    for (int i = 0; i < 2; ++i) {
      std::vector<std::string> extra = {"--experts", std::to_string(i) + "/2"};
      if (gpu_shards) extra.insert(extra.end(), {"--device", "cuda"});
      c.AddShard(0, extra);
    }
    c.StartAttention({"--device", "cuda", "--expert-shards",
                      c.shard_info(0).at("grpc") + "," + c.shard_info(1).at("grpc"), "--wire-dtype",
                      "f32", "--kv-blocks", "256"});
    const testing::Summary s = testing::Summarize(c.Run(prompts, kMaxTokens, 0, [] {}), expected);
    std::printf("dmoe-attention --device cuda, shards on the %s: %d/%zu identical\n",
                gpu_shards ? "GPU" : "CPU", s.identical, prompts.size());
    EXPECT_EQ(s.identical, static_cast<int>(prompts.size()));
  }
}
#endif

}  // namespace
}  // namespace dmoe
