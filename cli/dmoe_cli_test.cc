// Runs the real `dmoe` binary on real checkpoint directories and checks exit codes and messages.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_join.h"
#include "attention_service/local_model.h"
#include "gtest/gtest.h"
#include "model/tiny_model.h"

namespace dmoe {
namespace {

struct Result {
  int code;
  std::string out;  // stdout + stderr
};

std::string TmpDir() {
  const char* d = std::getenv("TEST_TMPDIR");
  return d ? d : "/tmp";
}

Result RunDmoe(const std::string& args) {
  const std::string bin = std::string(std::getenv("TEST_SRCDIR")) + "/dmoe/cli/dmoe";
  FILE* p = popen((bin + " " + args + " 2>&1").c_str(), "r");
  Result r{-1, ""};
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void Spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A fresh tiny model directory (via the CLI itself).
std::string MakeModel(const std::string& name, const std::string& extra = "") {
  const std::string dir = TmpDir() + "/" + name;
  const Result r = RunDmoe("make-tiny-model " + dir + " --preset tiny --seed 4 " + extra);
  EXPECT_EQ(r.code, 0) << r.out;
  return dir;
}

#define EXPECT_FAILS_WITH(result, text)                                      \
  do {                                                                       \
    const Result r_ = (result);                                              \
    EXPECT_NE(r_.code, 0) << r_.out;                                         \
    EXPECT_NE(r_.out.find(text), std::string::npos) << "output: " << r_.out; \
    EXPECT_EQ(r_.out.find("Segmentation"), std::string::npos);               \
    EXPECT_LT(r_.code, 128) << "killed by a signal: " << r_.out;             \
  } while (0)

TEST(DmoeCli, HelpOnEveryCommand) {
  for (const char* cmd :
       {"--help", "logits --help", "generate --help", "make-tiny-model --help", "tokenize --help",
        "chat --help", "up --help", "down --help", "serve --help"}) {
    const Result r = RunDmoe(cmd);
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_NE(r.out.find("usage:"), std::string::npos) << cmd << ": " << r.out;
  }
  EXPECT_FAILS_WITH(RunDmoe(""), "usage:");
  EXPECT_FAILS_WITH(RunDmoe("frobnicate"), "unknown command \"frobnicate\"");
  EXPECT_FAILS_WITH(RunDmoe("logits --modle x"), "unknown flag --modle");
  EXPECT_FAILS_WITH(RunDmoe("down --state-file " + TmpDir() + "/none.json"), "no cluster recorded");
  EXPECT_FAILS_WITH(RunDmoe("up --experts 0 --state-file " + TmpDir() + "/s.json"),
                    "--experts: must be in [1, 64]");
  // A state file whose entries are not what dmoe up writes: an error, no process stopped (a
  // missing pid aborted dmoe down).
  const std::pair<const char*, const char*> bad_states[] = {
      {R"({"processes":[{"role":"router"}]})", "processes[0] needs a positive integer pid"},
      {R"({"processes":[{"pid":"12"}]})", "processes[0] needs a positive integer pid"},
      {R"({"processes":[{"role":1,"pid":2}]})", "processes[0] needs a positive integer pid"},
      {R"({"processes":5})", "not a state file"},
  };
  for (const auto& [bad, want] : bad_states) {
    const std::string path = TmpDir() + "/bad_state.json";
    std::ofstream(path) << bad;
    EXPECT_FAILS_WITH(RunDmoe("down --state-file " + path), want);
  }
  EXPECT_FAILS_WITH(RunDmoe("tokenize --jsonl x"), "--tokenizer is required");
  EXPECT_FAILS_WITH(RunDmoe("chat --target 127.0.0.1:1"), "expected one MESSAGE");
  EXPECT_FAILS_WITH(RunDmoe("serve"), "--model is required");
  // The origin goes into a response header verbatim: a path, spaces or a bare host are refused.
  const std::string model = MakeModel("cors");
  for (const char* bad : {"ui.example", "'https://ui.example/app'", "'http://a b'", "ftp://x"}) {
    EXPECT_FAILS_WITH(RunDmoe("serve --model " + model + " --cors-origin " + bad), "--cors-origin");
  }
}

TEST(DmoeCli, LogitsNpyHoldsTheEngineLogits) {
  const std::string dir = MakeModel("npy");
  const std::string out = TmpDir() + "/logits.npy";
  const Result r = RunDmoe("logits --model " + dir + " --tokens 1,2,3,300,7 --out " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string bytes = Slurp(out);
  ASSERT_GT(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const size_t hlen = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
  EXPECT_EQ((10 + hlen) % 64, 0u);
  const std::string header = bytes.substr(10, hlen);
  EXPECT_NE(header.find("'descr': '<f4'"), std::string::npos) << header;
  EXPECT_NE(header.find("'fortran_order': False"), std::string::npos) << header;
  EXPECT_NE(header.find("'shape': (5, 512)"), std::string::npos) << header;
  ASSERT_EQ(bytes.size(), 10 + hlen + 5 * 512 * 4);
  auto model = LocalModel::Load(dir);
  ASSERT_TRUE(model.ok());
  auto want = (*model)->engine().Forward({1, 2, 3, 300, 7});
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(std::memcmp(bytes.data() + 10 + hlen, want->data(), want->size() * 4), 0);

  const Result summary = RunDmoe("logits --model " + dir + " --tokens 1,2,3");
  EXPECT_EQ(summary.code, 0) << summary.out;
  EXPECT_NE(summary.out.find("argmax"), std::string::npos);
}

TEST(DmoeCli, GenerateMatchesTheInProcessEngine) {
  const std::string dir = MakeModel("gen");
  auto model = LocalModel::Load(dir);
  ASSERT_TRUE(model.ok());
  GenerateOptions g;
  g.max_tokens = 12;
  auto want = Generate((*model)->engine(), {5, 6, 7, 8}, g);
  ASSERT_TRUE(want.ok());
  for (const char* chunk : {"", " --prefill-chunk 1", " --prefill-chunk 3"}) {
    const Result r = RunDmoe("generate --model " + dir + " --tokens 5,6,7,8 --max-tokens 12 " +
                             "--temperature 0 --print-token-ids" + chunk);
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_EQ(r.out, absl::StrJoin(*want, ",") + "\n") << chunk;
  }
  // On a GPU (--device cuda) the same greedy tokens; elsewhere a clear refusal with the reason.
  const Result gpu = RunDmoe("generate --model " + dir +
                             " --tokens 5,6,7,8 --max-tokens 12 --print-token-ids --device cuda");
  if (gpu.code == 0) {
    EXPECT_EQ(gpu.out.substr(gpu.out.rfind('\n', gpu.out.size() - 2) + 1),
              absl::StrJoin(*want, ",") + "\n");
  } else {
    EXPECT_EQ(gpu.code, 2);
    EXPECT_NE(gpu.out.find("error: --device cuda: no CUDA device"), std::string::npos) << gpu.out;
  }
  // Seeded sampling is reproducible.
  const std::string cmd = "generate --model " + dir +
                          " --tokens 5,6 --max-tokens 8 --temperature 1 --seed 9 --print-token-ids";
  EXPECT_EQ(RunDmoe(cmd).out, RunDmoe(cmd).out);
}

TEST(DmoeCli, BadRequestsAreClearErrors) {
  const std::string dir = MakeModel("badreq");
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir + " --tokens 1,512"),
                    "tokens[1]: id 512 is outside [0, vocab_size 512)");
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir + " --tokens 1,x"),
                    "--tokens[1]: \"x\" is not a token id");
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir + " --tokens 1,-3"), "is negative");
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir), "--tokens is required");
  EXPECT_FAILS_WITH(RunDmoe("logits --tokens 1"), "--model is required");
  std::vector<int> long_prompt(513, 3);
  EXPECT_FAILS_WITH(
      RunDmoe("logits --model " + dir + " --tokens " + absl::StrJoin(long_prompt, ",")),
      "length 513 exceeds max_position_embeddings 512");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --max-tokens 511"),
                    "exceeds max_position_embeddings 512");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --device tpu"),
                    "--device: \"tpu\" is not cpu or cuda");
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir + " --tokens 1,2 --gpu 1"),
                    "--gpu needs --device cuda");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --max-tokens 0"),
                    "--max-tokens: must be positive");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --temperature -1"),
                    "--temperature: must be >= 0");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --temperature 1 --top-p 0"),
                    "top_p: 0 is not in (0, 1]");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --top-k -2"),
                    "top_k: -2 is negative");
  EXPECT_FAILS_WITH(RunDmoe("generate --model " + dir + " --tokens 1,2 --temperature hot"),
                    "--temperature: \"hot\" is not a number");
  EXPECT_FAILS_WITH(RunDmoe("make-tiny-model " + TmpDir() + "/x --preset huge"),
                    "--preset: unknown preset");
  EXPECT_FAILS_WITH(RunDmoe("make-tiny-model " + TmpDir() + "/x --dtype f64"), "--dtype");
  EXPECT_FAILS_WITH(RunDmoe("make-tiny-model " + TmpDir() + "/x --shards 0"), "--shards");
  EXPECT_FAILS_WITH(RunDmoe("make-tiny-model"), "expected exactly one output directory");
}

// Damaged checkpoints: each is a clear error naming the problem and a non-zero exit.
TEST(DmoeCli, DamagedCheckpointsAreClearErrors) {
  const std::string good = MakeModel("good");
  const std::string bytes = Slurp(good + "/model.safetensors");
  const std::string config = Slurp(good + "/config.json");
  auto with = [&](const std::string& name, const std::string& st, const std::string& cfg) {
    const std::string dir = TmpDir() + "/" + name;
    RunDmoe("make-tiny-model " + dir + " --preset tiny --seed 4");
    Spit(dir + "/model.safetensors", st);
    Spit(dir + "/config.json", cfg);
    return RunDmoe("logits --model " + dir + " --tokens 1,2,3");
  };
  EXPECT_FAILS_WITH(with("trunc", bytes.substr(0, bytes.size() / 2), config),
                    "run past the data region");
  EXPECT_FAILS_WITH(with("tiny_file", bytes.substr(0, 5), config),
                    "shorter than the 8-byte length");
  std::string past_eof = bytes;
  past_eof[5] = '\x7f';  // header length ~ 2^47
  EXPECT_FAILS_WITH(with("past_eof", past_eof, config), "header length");
  std::string bad_json = bytes;
  bad_json[8] = 'x';
  EXPECT_FAILS_WITH(with("bad_json", bad_json, config), "not valid JSON");
  std::string bad_dtype = bytes;
  bad_dtype.replace(bad_dtype.find("\"F32\""), 5, "\"I32\"");
  EXPECT_FAILS_WITH(with("bad_dtype", bad_dtype, config), "unsupported dtype \"I32\"");
  std::string bad_shape = bytes;
  bad_shape.replace(bad_shape.find("[512,256]"), 9, "[256,512]");
  EXPECT_FAILS_WITH(with("bad_shape", bad_shape, config),
                    "has shape [256, 512], expected [512, 256]");
  std::string bad_offsets = bytes;
  const size_t at = bad_offsets.find("\"data_offsets\":[0,");
  ASSERT_NE(at, std::string::npos);
  bad_offsets.replace(at, 18, "\"data_offsets\":[4,");  // size mismatch / overlap
  EXPECT_FAILS_WITH(with("bad_offsets", bad_offsets, config), "data_offsets");
  std::string inconsistent = config;
  inconsistent.replace(inconsistent.find("\"n_routed_experts\": 16"), 22,
                       "\"n_routed_experts\": 10");
  EXPECT_FAILS_WITH(with("inconsistent", bytes, inconsistent),
                    "n_routed_experts 10 is not divisible by n_group 4");
  std::string missing_field = config;
  missing_field.replace(missing_field.find("\"num_experts_per_tok\": 4,"), 25, "");
  EXPECT_FAILS_WITH(with("missing_field", bytes, missing_field), "num_experts_per_tok");
  std::string bigger = config;
  bigger.replace(bigger.find("\"hidden_size\": 256"), 18, "\"hidden_size\": 128");
  EXPECT_FAILS_WITH(with("bigger", bytes, bigger), "expected [512, 128]");
  EXPECT_FAILS_WITH(with("not_json_config", bytes, "{"), "config.json: not valid JSON");
}

TEST(DmoeCli, ShardedCheckpointWithAMissingTensor) {
  const std::string dir = MakeModel("sharded_missing", "--shards 3");
  std::string index = Slurp(dir + "/model.safetensors.index.json");
  const size_t at = index.find("\"model.norm.weight\"");
  ASSERT_NE(at, std::string::npos);
  index.replace(at, 19, "\"model.norm.weigh_\"");
  Spit(dir + "/model.safetensors.index.json", index);
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir + " --tokens 1"), "model.norm.weigh_");
  // Dropping an entry instead (not the last one, so the JSON stays valid): the tensor is missing.
  index.replace(index.find("\"model.norm.weigh_\""), 19, "\"model.norm.weight\"");
  const size_t line = index.find("    \"model.embed_tokens.weight\"");
  ASSERT_NE(line, std::string::npos);
  index.erase(line, index.find('\n', line) + 1 - line);
  Spit(dir + "/model.safetensors.index.json", index);
  EXPECT_FAILS_WITH(RunDmoe("logits --model " + dir + " --tokens 1"),
                    "missing tensor \"model.embed_tokens.weight\"");
}

}  // namespace
}  // namespace dmoe
