// Writes the generated seed corpora of the fuzz tests: valid safetensors files of every dtype and
// edge shapes (model/fuzz/corpus/safetensors/) and valid wire messages of every kind, dtype and
// edge size (transport/fuzz_corpus/), each a few KiB at most. The seeds are committed; rerun after
// changing a format:
//   bazel run //model/fuzz:write_seeds            (writes into the workspace)
//   bazel-bin/model/fuzz/write_seeds ROOT         (writes under ROOT)
// Files are overwritten by name; other files in those folders (crash regressions, hand-written
// seeds) are left alone.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "transport/wire.h"

namespace {

bool WriteFile(const std::string& path, const void* data, size_t n) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    std::perror(path.c_str());
    return false;
  }
  const bool ok = std::fwrite(data, 1, n, f) == n;
  if (std::fclose(f) != 0 || !ok) {
    std::perror(path.c_str());
    return false;
  }
  std::printf("%6zu  %s\n", n, path.c_str());
  return true;
}

// A safetensors file: u64 little-endian header length, the JSON header padded with spaces to a
// multiple of 8 (as the reference writer does), then `data_bytes` bytes of a counting pattern.
std::string Safetensors(std::string header, size_t data_bytes, bool pad = true) {
  while (pad && header.size() % 8 != 0) header.push_back(' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xff);
  out += header;
  for (size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<char>(i * 37 + 11));
  return out;
}

bool WriteSafetensorsSeeds(const std::string& dir) {
  struct Seed {
    const char* name;
    std::string bytes;
  };
  const Seed seeds[] = {
      {"f32_2x2_bf16_3", Safetensors(R"({"__metadata__":{"format":"pt"},)"
                                     R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                                     R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}})",
                                     22)},
      {"f16_2x3", Safetensors(R"({"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}})", 12)},
      // A DeepSeek-V3 style fp8 weight with its 128x128 block scales.
      {"f8_e4m3_with_scale_inv",
       Safetensors(R"({"model.layers.3.mlp.experts.7.up_proj.weight":)"
                   R"({"dtype":"F8_E4M3","shape":[4,8],"data_offsets":[0,32]},)"
                   R"("model.layers.3.mlp.experts.7.up_proj.weight_scale_inv":)"
                   R"({"dtype":"F32","shape":[1,1],"data_offsets":[32,36]}})",
                   36)},
      {"scalar_f32", Safetensors(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", 4)},
      // Zero-element tensors share an offset without overlapping.
      {"zero_size", Safetensors(R"({"e0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                                R"("e1":{"dtype":"BF16","shape":[0,5],"data_offsets":[0,0]},)"
                                R"("x":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}})",
                                2)},
      {"rank8", Safetensors(R"({"r":{"dtype":"BF16","shape":[1,1,1,1,1,1,1,2],)"
                            R"("data_offsets":[0,4]}})",
                            4)},
      {"empty_header", Safetensors("{}", 0, /*pad=*/false)},
      {"metadata_only", Safetensors(R"({"__metadata__":{"format":"pt","total_size":"0"}})", 0)},
      // Entries out of offset order, a gap between tensors and bytes after the last one.
      {"unordered_gap_trailing",
       Safetensors(R"({"model.norm.weight":{"dtype":"BF16","shape":[8],"data_offsets":[40,56]},)"
                   R"("model.embed_tokens.weight":{"dtype":"F32","shape":[2,4],)"
                   R"("data_offsets":[0,32]}})",
                   64)},
      // Real layer names and shapes of the tiny preset (V=512, D=256, r=64, dr=16), few bytes each.
      {"deepseek_layer_names",
       Safetensors(R"({"__metadata__":{"format":"pt"},)"
                   R"("model.layers.0.input_layernorm.weight":)"
                   R"({"dtype":"BF16","shape":[16],"data_offsets":[0,32]},)"
                   R"("model.layers.0.self_attn.kv_a_layernorm.weight":)"
                   R"({"dtype":"F32","shape":[16],"data_offsets":[32,96]},)"
                   R"("model.layers.1.mlp.gate.weight":)"
                   R"({"dtype":"F16","shape":[4,8],"data_offsets":[96,160]},)"
                   R"("model.layers.1.mlp.experts.15.down_proj.weight":)"
                   R"({"dtype":"F8_E4M3","shape":[8,4],"data_offsets":[160,192]}})",
                   192)},
      {"unicode_name",
       Safetensors("{\"t\xc3\xa9nsor \\u00e9\\\"q\\\"\":{\"dtype\":\"F32\",\"shape\":[1],"
                   "\"data_offsets\":[0,4]}}",
                   4)},
  };
  for (const Seed& s : seeds) {
    if (!WriteFile(dir + "/" + s.name, s.bytes.data(), s.bytes.size())) return false;
  }
  return true;
}

namespace wire = dmoe::wire;

wire::Header MakeHeader(uint32_t tokens, uint32_t hidden, wire::WireDType dtype) {
  wire::Header h;
  h.sender_id = 3;
  h.step_seq = 1000;
  h.layer = 1;
  h.micro_batch = 0;
  h.token_count = tokens;
  h.hidden_size = hidden;
  h.dtype = dtype;
  return h;
}

std::vector<float> Rows(uint32_t tokens, uint32_t hidden) {
  std::vector<float> rows(size_t{tokens} * hidden + 1);  // + 1: data() is never null
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = std::sin(0.7f * static_cast<float>(i)) * 3;
  return rows;
}

// Overwrites row element `i` of an encoded message with raw bits (special values the encoder's
// float -> bf16 path would not produce, such as signalling NaNs).
void PatchBf16(std::vector<uint8_t>* msg, size_t i, uint16_t bits) {
  std::memcpy(msg->data() + wire::kHeaderBytes + 2 * i, &bits, 2);
}
void PatchF32(std::vector<uint8_t>* msg, size_t i, uint32_t bits) {
  std::memcpy(msg->data() + wire::kHeaderBytes + 4 * i, &bits, 4);
}

bool WriteWireSeeds(const std::string& dir) {
  using wire::WireDType;
  struct Seed {
    std::string name;
    std::vector<uint8_t> bytes;
  };
  std::vector<Seed> seeds;
  auto dispatch = [&](const std::string& name, const wire::Header& h,
                      const std::vector<wire::Pair>& pairs) -> std::vector<uint8_t>& {
    seeds.push_back({name, {}});
    wire::EncodeDispatch(h, Rows(h.token_count, h.hidden_size).data(), pairs, &seeds.back().bytes);
    return seeds.back().bytes;
  };
  auto combine = [&](const std::string& name, const wire::Header& h) -> std::vector<uint8_t>& {
    seeds.push_back({name, {}});
    wire::EncodeCombine(h, Rows(h.token_count, h.hidden_size).data(), &seeds.back().bytes);
    return seeds.back().bytes;
  };
  auto error = [&](const std::string& name, const wire::Header& h, const std::string& text) {
    seeds.push_back({name, {}});
    wire::EncodeError(h, text, &seeds.back().bytes);
  };

  dispatch("dispatch_f32_2x4", MakeHeader(2, 4, WireDType::kF32),
           {{0, 4, 0.25f}, {1, 9, 1.5f}, {1, 2, -0.125f}});
  dispatch("dispatch_bf16_3x8", MakeHeader(3, 8, WireDType::kBF16),
           {{0, 0, 1.0f}, {2, 159, -0.0f}, {2, 7, 1e-30f}, {1, 0xffffffffu, 16.0f}});
  dispatch("dispatch_bf16_1x1", MakeHeader(1, 1, WireDType::kBF16), {{0, 5, 0.5f}});
  dispatch("dispatch_empty", MakeHeader(0, 1, WireDType::kF32), {});
  dispatch("dispatch_no_pairs", MakeHeader(2, 3, WireDType::kBF16), {});
  // The largest hidden size a receiver accepts, with no tokens.
  dispatch("dispatch_max_hidden", MakeHeader(0, wire::kMaxHidden, WireDType::kBF16), {});
  // Six experts per token (top-6), as a decode step of V2 sends them; 4 KiB of rows.
  {
    std::vector<wire::Pair> pairs;
    for (uint32_t t = 0; t < 4; ++t) {
      for (uint32_t k = 0; k < 6; ++k)
        pairs.push_back({t, (t * 37 + k * 11) % 160, 0.1f * (k + 1)});
    }
    dispatch("dispatch_bf16_4x256_top6", MakeHeader(4, 256, WireDType::kBF16), pairs);
  }
  {
    wire::Header h = MakeHeader(1, 2, WireDType::kF32);
    h.sender_id = 0xffffffffu;
    h.step_seq = std::numeric_limits<uint64_t>::max();
    h.layer = 0xffffffffu;
    h.micro_batch = 0xffffffffu;
    dispatch("dispatch_max_header_fields", h, {{0, 0, std::numeric_limits<float>::max()}});
  }
  {
    // Row values the format carries untouched: infinities, NaNs (signalling ones come back
    // quiet in bf16), signed zero and subnormals.
    auto& b = dispatch("dispatch_bf16_special_values", MakeHeader(1, 8, WireDType::kBF16),
                       {{0, 1, std::numeric_limits<float>::denorm_min()}});
    const uint16_t bits[8] = {0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffa5, 0x8000, 0x0001, 0x807f};
    for (size_t i = 0; i < 8; ++i) PatchBf16(&b, i, bits[i]);
  }
  {
    auto& b = dispatch("dispatch_f32_special_values", MakeHeader(1, 6, WireDType::kF32),
                       {{0, 3, -std::numeric_limits<float>::max()}});
    const uint32_t bits[6] = {0x7f800000u, 0xff800000u, 0x7fc00000u,
                              0x7f800001u, 0x80000000u, 0x00000001u};
    for (size_t i = 0; i < 6; ++i) PatchF32(&b, i, bits[i]);
  }
  combine("combine_f32_2x4", MakeHeader(2, 4, WireDType::kF32));
  combine("combine_bf16_3x8", MakeHeader(3, 8, WireDType::kBF16));
  combine("combine_empty", MakeHeader(0, 7, WireDType::kBF16));
  combine("combine_bf16_4x256", MakeHeader(4, 256, WireDType::kBF16));
  error("error_text", MakeHeader(5, 4, WireDType::kF32), "expert 3 of layer 1 is not hosted");
  error("error_empty", MakeHeader(0, 0, WireDType::kBF16), "");
  error("error_binary_text", MakeHeader(1, 2, WireDType::kBF16), std::string("a\0\xff\xfe b", 6));
  for (const Seed& s : seeds) {
    if (!WriteFile(dir + "/" + s.name, s.bytes.data(), s.bytes.size())) return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string root = ".";
  if (argc > 1) {
    root = argv[1];
  } else if (const char* ws = std::getenv("BUILD_WORKSPACE_DIRECTORY")) {
    root = ws;
  }
  const bool ok = WriteSafetensorsSeeds(root + "/model/fuzz/corpus/safetensors") &&
                  WriteWireSeeds(root + "/transport/fuzz_corpus");
  return ok ? 0 : 1;
}
