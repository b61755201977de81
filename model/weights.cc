#include "model/weights.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/w8a8.h"

namespace dmoe {

namespace weight_names {
std::string Layer(int64_t layer, const std::string& suffix) {
  return absl::StrCat("model.layers.", layer, ".", suffix);
}
std::string Expert(int64_t layer, int64_t expert, const std::string& proj) {
  return absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, ".", proj, ".weight");
}
}  // namespace weight_names

cpu::WeightRef LinearWeight::ref() const {
  cpu::WeightRef r;
  r.format = format;
  r.f32 = w.data();
  r.bf16 = h.data();
  r.sums = sums.empty() ? nullptr : sums.data();
  r.q = q.data();
  r.scales = scales.data();
  r.out = out;
  r.in = in;
  r.packed = packed;
  return r;
}

void LinearWeight::ConvertTo(cpu::WeightFormat f) {
  if (f == format) return;
  if (format != cpu::WeightFormat::kF32) {
    w.resize(static_cast<size_t>(out * in));
    cpu::Dequantize(ref(), 0, out, w.data());
    h = {};
    q = {};
    scales = {};
    sums = {};
    packed = false;
    format = cpu::WeightFormat::kF32;
  }
  if (f == cpu::WeightFormat::kF32) return;
  std::vector<float> src = std::move(w);
  QuantizeFrom(src.data(), f);
}

void LinearWeight::QuantizeFrom(const float* src, cpu::WeightFormat f) {
  if (f == cpu::WeightFormat::kBf16) {
    h.resize(static_cast<size_t>(out * in));
    FloatToBf16N(src, h.size(), h.data());
  } else if (f == cpu::WeightFormat::kInt8) {
    cpu::QuantizeInt8PerChannel(src, out, in, &q, &scales);
    sums.resize(static_cast<size_t>(out));
    cpu::Int8RowSums(reinterpret_cast<const int8_t*>(q.data()), out, in, sums.data());
  } else {
    cpu::QuantizeFp8Blocks(src, out, in, &q, &scales);
  }
  w = {};
  format = f;
  packed = false;
  Pack();
}

void LinearWeight::Pack() {
  if (packed || !cpu::Packable(format, out, in)) return;
  // In place, one group of 8 rows at a time: never a second copy of the matrix.
  void* data = format == cpu::WeightFormat::kBf16 ? static_cast<void*>(h.data()) : q.data();
  cpu::PackRows(format, data, out, in, data);
  packed = true;
}

void LinearWeight::UseHugePages() const {
  dmoe::UseHugePages(w.data(), 4 * w.size());
  dmoe::UseHugePages(h.data(), 2 * h.size());
  dmoe::UseHugePages(q.data(), q.size());
}

void UseHugePages(const DenseWeights& w) {
  w.embed.UseHugePages();
  w.lm_head.UseHugePages();
  for (const LayerWeights& l : w.layers) {
    for (const LinearWeight* m :
         {&l.q_a, &l.q_b, &l.q, &l.kv_a, &l.kv_b, &l.o, &l.dense.gate, &l.dense.up, &l.dense.down,
          &l.gate, &l.shared.gate, &l.shared.up, &l.shared.down}) {
      m->UseHugePages();
    }
  }
}

void LinearWeight::Row(int64_t r, float* dst) const { cpu::Dequantize(ref(), r, r + 1, dst); }

bool ParseWeightDType(const std::string& s, WeightDType* out) {
  if (s == "auto") {
    *out = WeightDType::kAuto;
  } else if (s == "f32") {
    *out = WeightDType::kF32;
  } else if (s == "bf16") {
    *out = WeightDType::kBf16;
  } else if (s == "int8") {
    *out = WeightDType::kInt8;
  } else if (s == "fp8") {
    *out = WeightDType::kFp8;
  } else {
    return false;
  }
  return true;
}

const char* WeightDTypeName(WeightDType t) {
  switch (t) {
    case WeightDType::kAuto:
      return "auto";
    case WeightDType::kF32:
      return "f32";
    case WeightDType::kBf16:
      return "bf16";
    case WeightDType::kInt8:
      return "int8";
    case WeightDType::kFp8:
      return "fp8";
  }
  return "?";
}

WeightDType HeldWeightDType(WeightDType requested, DType stored) {
  if (requested != WeightDType::kAuto) return requested;
  if (stored == DType::kBF16) return WeightDType::kBf16;
  if (stored == DType::kF8E4M3) return WeightDType::kFp8;
  return WeightDType::kF32;
}

std::string NumericsString(const char* what, const std::string& held, bool bf16_activations,
                           DType stored, const std::string& device) {
  const bool a16 = (held == "bf16" || held == "fp8") && bf16_activations && device == "cpu";
  return absl::StrCat(what, "=", held, a16 ? "+a16" : "", " stored=", DTypeName(stored),
                      " device=", device);
}

// The fp32 matrix a converting load goes through, reused from weight to weight (the largest,
// lm_head, is V x D x 4 bytes: 125 MiB for `small`, 0.8 GB for V2-Lite) and released when a
// load ends (LoadScratchRelease).
static thread_local std::vector<float> t_load_scratch;

absl::StatusOr<LinearWeight> ReadLinear(const Checkpoint& ck, const std::string& name, int64_t out,
                                        int64_t in, WeightDType dtype) {
  LinearWeight l;
  l.out = out;
  l.in = in;
  ASSIGN_OR_RETURN(TensorInfo info, ck.Info(name));
  if (info.dtype == DType::kF8E4M3) {
    if (info.shape != std::vector<int64_t>{out, in}) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" has shape ",
                                                     info.ShapeString(), ", expected [", out, ", ",
                                                     in, "]"));
    }
    const std::string scale_name = name + "_scale_inv";
    if (!ck.Info(scale_name).ok()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", scale_name,
                                                     "\": missing (the F8_E4M3 weight \"", name,
                                                     "\" needs its 128x128 block scales)"));
    }
    const int64_t bo = (out + cpu::kFp8Block - 1) / cpu::kFp8Block;
    const int64_t bi = (in + cpu::kFp8Block - 1) / cpu::kFp8Block;
    ASSIGN_OR_RETURN(l.scales, ck.ReadFloat(scale_name, {bo, bi}));
    for (float s : l.scales) {
      if (!(s > 0) || !std::isfinite(s)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor \"", scale_name, "\": block scales must be finite and positive, found ", s));
      }
    }
    TensorInfo t;
    ASSIGN_OR_RETURN(const uint8_t* raw, ck.Raw(name, &t));
    l.format = cpu::WeightFormat::kFp8;
    if (cpu::Packable(l.format, out, in)) {  // packed straight from the mapped file
      l.q.resize(static_cast<size_t>(out * in));
      cpu::PackRows(l.format, raw, out, in, l.q.data());
      l.packed = true;
    } else {
      l.q.assign(raw, raw + out * in);
    }
    ck.DropPages(name);
    if (dtype == WeightDType::kF32) l.ConvertTo(cpu::WeightFormat::kF32);
    if (dtype == WeightDType::kBf16) l.ConvertTo(cpu::WeightFormat::kBf16);
    if (dtype == WeightDType::kInt8) {
      // Through the reused fp32 scratch: no full-size fp32 matrix is allocated per weight.
      std::vector<float>& scratch = t_load_scratch;
      scratch.resize(static_cast<size_t>(out * in));
      cpu::Dequantize(l.ref(), 0, out, scratch.data());
      l.QuantizeFrom(scratch.data(), cpu::WeightFormat::kInt8);
    }
    return l;
  }
  if (info.dtype == DType::kBF16 && (dtype == WeightDType::kAuto || dtype == WeightDType::kBf16)) {
    l.format = cpu::WeightFormat::kBf16;
    if (info.shape == std::vector<int64_t>{out, in} && cpu::Packable(l.format, out, in)) {
      // Packed straight from the mapped file: no row-major copy is ever held.
      TensorInfo t;
      ASSIGN_OR_RETURN(const uint8_t* raw, ck.Raw(name, &t));
      l.h.resize(static_cast<size_t>(out * in));
      cpu::PackRows(l.format, raw, out, in, l.h.data());
      ck.DropPages(name);
      l.packed = true;
      return l;
    }
    RETURN_IF_ERROR(ck.ReadBf16Into(name, {out, in}, &l.h));
    return l;
  }
  if (dtype == WeightDType::kInt8 || dtype == WeightDType::kFp8 || dtype == WeightDType::kBf16) {
    // Converted at load through a reused fp32 scratch, so that a shard's resident set holds the
    // 8/16-bit weights, not freed fp32 copies of them.
    std::vector<float>& scratch = t_load_scratch;
    RETURN_IF_ERROR(ck.ReadFloatInto(name, {out, in}, &scratch));
    l.QuantizeFrom(scratch.data(), dtype == WeightDType::kInt8  ? cpu::WeightFormat::kInt8
                                   : dtype == WeightDType::kFp8 ? cpu::WeightFormat::kFp8
                                                                : cpu::WeightFormat::kBf16);
    return l;
  }
  ASSIGN_OR_RETURN(l.w, ck.ReadFloat(name, {out, in}));
  return l;
}

namespace {

absl::StatusOr<MlpWeights> ReadMlp(const Checkpoint& ck, const std::string& prefix, int64_t d,
                                   int64_t width, WeightDType dtype) {
  MlpWeights m;
  ASSIGN_OR_RETURN(m.gate, ReadLinear(ck, prefix + "gate_proj.weight", width, d, dtype));
  ASSIGN_OR_RETURN(m.up, ReadLinear(ck, prefix + "up_proj.weight", width, d, dtype));
  ASSIGN_OR_RETURN(m.down, ReadLinear(ck, prefix + "down_proj.weight", d, width, dtype));
  return m;
}

}  // namespace

namespace {

// kv_b and the router gate, read by fp32 products (the absorbed attention, the router logits):
// held as the checkpoint's bf16 (row-major, never packed: the products widen each value exactly,
// so they give the fp32 upcast's bits from half the bytes), else as fp32; fp32 when `dtype` asks
// for an fp32 model.
absl::StatusOr<LinearWeight> ReadExact(const Checkpoint& ck, const std::string& name, int64_t out,
                                       int64_t in, WeightDType dtype) {
  ASSIGN_OR_RETURN(TensorInfo info, ck.Info(name));
  if (info.dtype != DType::kBF16 || dtype == WeightDType::kF32) {
    return ReadLinear(ck, name, out, in, WeightDType::kF32);
  }
  LinearWeight l;
  l.out = out;
  l.in = in;
  l.format = cpu::WeightFormat::kBf16;
  RETURN_IF_ERROR(ck.ReadBf16Into(name, {out, in}, &l.h));
  return l;
}

// Decoder layer `i` (the MTP layer too: i == num_hidden_layers).
absl::StatusOr<LayerWeights> LoadLayer(const Checkpoint& ck, const ModelConfig& c, int64_t i,
                                       WeightDType dtype) {
  using weight_names::Layer;
  const int64_t d = c.hidden_size, h = c.num_attention_heads;
  LayerWeights l;
  ASSIGN_OR_RETURN(l.input_norm, ck.ReadFloat(Layer(i, "input_layernorm.weight"), {d}));
  ASSIGN_OR_RETURN(l.post_norm, ck.ReadFloat(Layer(i, "post_attention_layernorm.weight"), {d}));
  if (c.q_lora_rank > 0) {
    ASSIGN_OR_RETURN(
        l.q_a, ReadLinear(ck, Layer(i, "self_attn.q_a_proj.weight"), c.q_lora_rank, d, dtype));
    ASSIGN_OR_RETURN(l.q_a_norm,
                     ck.ReadFloat(Layer(i, "self_attn.q_a_layernorm.weight"), {c.q_lora_rank}));
    ASSIGN_OR_RETURN(l.q_b, ReadLinear(ck, Layer(i, "self_attn.q_b_proj.weight"),
                                       h * c.q_head_dim(), c.q_lora_rank, dtype));
  } else {
    ASSIGN_OR_RETURN(
        l.q, ReadLinear(ck, Layer(i, "self_attn.q_proj.weight"), h * c.q_head_dim(), d, dtype));
  }
  ASSIGN_OR_RETURN(l.kv_a, ReadLinear(ck, Layer(i, "self_attn.kv_a_proj_with_mqa.weight"),
                                      c.latent_dim(), d, dtype));
  ASSIGN_OR_RETURN(l.kv_a_norm,
                   ck.ReadFloat(Layer(i, "self_attn.kv_a_layernorm.weight"), {c.kv_lora_rank}));
  ASSIGN_OR_RETURN(l.kv_b,
                   ReadExact(ck, Layer(i, "self_attn.kv_b_proj.weight"),
                             h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, dtype));
  ASSIGN_OR_RETURN(l.o,
                   ReadLinear(ck, Layer(i, "self_attn.o_proj.weight"), d, h * c.v_head_dim, dtype));
  l.moe = c.IsMoeLayer(i);
  if (!l.moe) {
    ASSIGN_OR_RETURN(l.dense, ReadMlp(ck, Layer(i, "mlp."), d, c.intermediate_size, dtype));
    return l;
  }
  ASSIGN_OR_RETURN(l.gate,
                   ReadExact(ck, Layer(i, "mlp.gate.weight"), c.n_routed_experts, d, dtype));
  if (c.topk_method == TopkMethod::kNoauxTc) {
    ASSIGN_OR_RETURN(l.gate_bias, ck.ReadFloat(Layer(i, "mlp.gate.e_score_correction_bias"),
                                               {c.n_routed_experts}));
  }
  if (c.n_shared_experts > 0) {
    ASSIGN_OR_RETURN(l.shared, ReadMlp(ck, Layer(i, "mlp.shared_experts."), d,
                                       c.moe_intermediate_size * c.n_shared_experts, dtype));
  }
  return l;
}

// The MTP layer (index num_hidden_layers): its projections, norms and decoder layer. Its
// embed_tokens and shared_head.head are copies of the main ones (MODEL_SPEC.md) and are not read.
absl::StatusOr<MtpWeights> LoadMtp(const Checkpoint& ck, const ModelConfig& c, WeightDType dtype) {
  using weight_names::Layer;
  const int64_t d = c.hidden_size, l = c.num_hidden_layers;
  MtpWeights m;
  ASSIGN_OR_RETURN(m.enorm, ck.ReadFloat(Layer(l, "enorm.weight"), {d}));
  ASSIGN_OR_RETURN(m.hnorm, ck.ReadFloat(Layer(l, "hnorm.weight"), {d}));
  ASSIGN_OR_RETURN(m.eh_proj, ReadLinear(ck, Layer(l, "eh_proj.weight"), d, 2 * d, dtype));
  ASSIGN_OR_RETURN(m.head_norm, ck.ReadFloat(Layer(l, "shared_head.norm.weight"), {d}));
  ASSIGN_OR_RETURN(m.layer, LoadLayer(ck, c, l, dtype));
  return m;
}

}  // namespace

static void FreeLoadScratch() { std::vector<float>().swap(t_load_scratch); }
LoadScratchRelease::~LoadScratchRelease() { FreeLoadScratch(); }
size_t LoadScratchBytesForTesting() { return sizeof(float) * t_load_scratch.capacity(); }

absl::StatusOr<DenseWeights> LoadDenseWeights(const Checkpoint& ck, const ModelConfig& c,
                                              WeightDType dtype) {
  LoadScratchRelease release;
  const int64_t d = c.hidden_size;
  DenseWeights w;
  // The embedding table is read one row per token: 16/32-bit as stored (or as asked), never 8.
  const WeightDType embed_dtype =
      dtype == WeightDType::kF32 || dtype == WeightDType::kBf16 ? dtype : WeightDType::kAuto;
  ASSIGN_OR_RETURN(w.embed,
                   ReadLinear(ck, "model.embed_tokens.weight", c.vocab_size, d, embed_dtype));
  if (w.embed.format != cpu::WeightFormat::kF32 && w.embed.format != cpu::WeightFormat::kBf16) {
    w.embed.ConvertTo(cpu::WeightFormat::kBf16);
  }
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    ASSIGN_OR_RETURN(w.layers[static_cast<size_t>(i)], LoadLayer(ck, c, i, dtype));
  }
  ASSIGN_OR_RETURN(w.final_norm, ck.ReadFloat("model.norm.weight", {d}));
  // lm_head is read whole every step (V x D): held like the projections.
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
    if (dtype == WeightDType::kInt8) w.lm_head.ConvertTo(cpu::WeightFormat::kInt8);
    if (dtype == WeightDType::kFp8) w.lm_head.ConvertTo(cpu::WeightFormat::kFp8);
  } else {
    ASSIGN_OR_RETURN(w.lm_head, ReadLinear(ck, "lm_head.weight", c.vocab_size, d, dtype));
  }
  if (c.num_nextn_predict_layers > 0) {
    ASSIGN_OR_RETURN(MtpWeights m, LoadMtp(ck, c, dtype));
    w.mtp = std::make_unique<MtpWeights>(std::move(m));
  }
  FreeLoadScratch();  // before the collapse (its peak memory); `release` finds it empty
  UseHugePages(w);
  return w;
}

absl::StatusOr<MlpWeights> LoadExpertWeights(const Checkpoint& ck, const ModelConfig& c,
                                             int64_t layer, int64_t expert, WeightDType dtype) {
  if (!c.IsExpertLayer(layer) || expert < 0 || expert >= c.n_routed_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("no routed expert ", expert, " in layer ", layer));
  }
  return ReadMlp(ck, absl::StrCat("model.layers.", layer, ".mlp.experts.", expert, "."),
                 c.hidden_size, c.moe_intermediate_size, dtype);
}

}  // namespace dmoe
