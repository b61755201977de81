#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using Json = nlohmann::json;

absl::Status HeaderError(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors header: ", what));
}

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::ShapeString() const {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

namespace {

// One tensor's entry: dtype, shape, data_offsets inside the data region.
absl::StatusOr<TensorInfo> ParseEntry(const std::string& name, const Json& e, uint64_t data_start,
                                      uint64_t data_size) {
  auto err = [&](absl::string_view what) {
    return HeaderError(absl::StrCat("tensor \"", name, "\": ", what));
  };
  if (!e.is_object()) return err("entry is not an object");
  TensorInfo t;
  t.name = name;
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) return err("missing string field dtype");
  const std::string& dts = dt->get_ref<const std::string&>();
  if (!ParseDTypeName(dts, &t.dtype)) {
    return err(absl::StrCat("unknown or unsupported dtype \"", dts, "\" (F32, BF16, F16)"));
  }
  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) return err("missing array field shape");
  if (sh->size() > 8) return err(absl::StrCat("rank ", sh->size(), " is above 8"));
  uint64_t numel = 1;
  for (const Json& d : *sh) {
    if (!d.is_number_unsigned())
      return err("shape holds a value that is not a non-negative integer");
    const uint64_t v = d.get<uint64_t>();
    if (v > (1ull << 40) || MulOverflows(numel, v, &numel) || numel > (1ull << 50)) {
      return err("shape is too large");
    }
    t.shape.push_back(static_cast<int64_t>(v));
  }
  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return err("data_offsets must be two non-negative integers");
  }
  const uint64_t begin = (*off)[0].get<uint64_t>();
  const uint64_t end = (*off)[1].get<uint64_t>();
  if (begin > end) return err(absl::StrCat("data_offsets [", begin, ", ", end, "] are reversed"));
  if (end > data_size) {
    return err(absl::StrCat("data_offsets [", begin, ", ", end, "] run past the data region of ",
                            data_size, " bytes"));
  }
  uint64_t expect = 0;
  if (MulOverflows(numel, DTypeSize(t.dtype), &expect) || expect != end - begin) {
    return err(absl::StrCat("shape ", t.ShapeString(), " x ", dts, " is ", expect,
                            " bytes but data_offsets span ", end - begin));
  }
  t.offset = data_start + begin;
  t.nbytes = end - begin;
  return t;
}

absl::Status CheckNoOverlap(const std::vector<TensorInfo>& out) {
  std::vector<const TensorInfo*> sorted;
  sorted.reserve(out.size());
  for (const TensorInfo& t : out) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
  });
  for (size_t i = 1; i < sorted.size(); ++i) {
    const TensorInfo* a = sorted[i - 1];
    const TensorInfo* b = sorted[i];
    if (b->offset < a->offset + a->nbytes) {
      return HeaderError(absl::StrCat("tensors \"", a->name, "\" and \"", b->name,
                                      "\" have overlapping data_offsets"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(const uint8_t* data, size_t size) {
  if (size < 8) {
    return HeaderError(absl::StrCat("file is ", size, " bytes, shorter than the 8-byte length"));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxSafetensorsHeaderBytes) {
    return HeaderError(
        absl::StrCat("header length ", n, " exceeds the limit of ", kMaxSafetensorsHeaderBytes));
  }
  if (n > size - 8) {
    return HeaderError(
        absl::StrCat("header length ", n, " runs past the end of the file (", size, " bytes)"));
  }
  const char* text = reinterpret_cast<const char*>(data + 8);
  Json j = Json::parse(text, text + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return HeaderError("not valid JSON");
  if (!j.is_object()) return HeaderError("top level is not a JSON object");
  const uint64_t data_start = 8 + n;
  const uint64_t data_size = size - data_start;

  std::vector<TensorInfo> out;
  out.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it->is_object()) return HeaderError("__metadata__ is not an object");
      continue;
    }
    ASSIGN_OR_RETURN(TensorInfo t, ParseEntry(name, it.value(), data_start, data_size));
    out.push_back(std::move(t));
  }
  RETURN_IF_ERROR(CheckNoOverlap(out));
  return out;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  auto f = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("mmap ", path, ": ", std::strerror(errno)));
    }
    f->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  static const uint8_t kEmpty[1] = {0};
  auto tensors = ParseSafetensorsHeader(f->base_ ? f->base_ : kEmpty, f->size_);
  if (!tensors.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", tensors.status().message()));
  }
  f->tensors_ = std::move(tensors).value();
  for (size_t i = 0; i < f->tensors_.size(); ++i) f->by_name_[f->tensors_[i].name] = i;
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

void SafetensorsFile::DropPages(const TensorInfo& t) const {
  if (base_ == nullptr || t.nbytes == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(base_ + t.offset) & ~(page - 1);
  const uintptr_t end = std::min(reinterpret_cast<uintptr_t>(base_ + size_),
                                 reinterpret_cast<uintptr_t>(base_ + t.offset + t.nbytes));
  // A page shared with a neighbouring tensor is dropped too: its next read faults it back in.
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& model_dir) {
  auto ck = std::unique_ptr<Checkpoint>(new Checkpoint());
  ck->dir_ = model_dir;
  const std::string index_path = model_dir + "/model.safetensors.index.json";
  const std::string single_path = model_dir + "/model.safetensors";
  std::ifstream index_in(index_path, std::ios::binary);
  if (!index_in) {
    auto f = SafetensorsFile::Open(single_path);
    if (!f.ok()) {
      if (absl::IsNotFound(f.status())) {
        return absl::NotFoundError(
            absl::StrCat("no model.safetensors or model.safetensors.index.json in ", model_dir));
      }
      return f.status();
    }
    ck->files_.push_back(std::move(f).value());
    for (const TensorInfo& t : ck->files_[0]->tensors()) {
      ck->where_[t.name] = {ck->files_[0].get(), &t};
    }
    return ck;
  }
  std::stringstream ss;
  ss << index_in.rdbuf();
  const std::string text = ss.str();
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto err = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", what));
  };
  if (j.is_discarded()) return err("not valid JSON");
  if (!j.is_object()) return err("top level is not an object");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) return err("missing object field weight_map");
  std::map<std::string, const SafetensorsFile*> opened;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) {
      return err(absl::StrCat("weight_map[\"", it.key(), "\"] is not a file name"));
    }
    const std::string& file = it->get_ref<const std::string&>();
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
      return err(absl::StrCat("weight_map[\"", it.key(), "\"]: bad file name \"", file, "\""));
    }
    auto o = opened.find(file);
    if (o == opened.end()) {
      auto f = SafetensorsFile::Open(model_dir + "/" + file);
      if (!f.ok()) return f.status();
      ck->files_.push_back(std::move(f).value());
      o = opened.emplace(file, ck->files_.back().get()).first;
    }
    const TensorInfo* t = o->second->Find(it.key());
    if (t == nullptr) {
      return err(absl::StrCat("tensor \"", it.key(), "\" is mapped to ", file,
                              " but that file does not hold it"));
    }
    ck->where_[it.key()] = {o->second, t};
  }
  return ck;
}

absl::StatusOr<TensorInfo> Checkpoint::Info(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint ", dir_, ": missing tensor \"", name, "\""));
  }
  return *it->second.second;
}

uint64_t Checkpoint::BytesOf(const std::function<bool(const std::string&)>& select,
                             uint64_t* tensors) const {
  uint64_t bytes = 0;
  *tensors = 0;
  for (const auto& [name, where] : where_) {
    if (!select(name)) continue;
    ++*tensors;
    bytes += where.second->nbytes;
  }
  return bytes;
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(where_.size());
  for (const auto& [name, _] : where_) names.push_back(name);
  return names;
}

absl::StatusOr<const uint8_t*> Checkpoint::Raw(const std::string& name, TensorInfo* info) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(
        absl::StrCat("checkpoint ", dir_, ": missing tensor \"", name, "\""));
  }
  if (cancelled_ && cancelled_()) {
    return absl::CancelledError(
        absl::StrCat("checkpoint ", dir_, ": loading given up at \"", name, "\" (stopping)"));
  }
  *info = *it->second.second;
  bytes_read_ += info->nbytes;
  if (progress_ != nullptr) progress_->Add(info->nbytes);
  return it->second.first->Data(*it->second.second);
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat(const std::string& name,
                                                         const std::vector<int64_t>& shape) const {
  std::vector<float> out;
  if (auto st = ReadFloatInto(name, shape, &out); !st.ok()) return st;
  return out;
}

void Checkpoint::DropPages(const std::string& name) const {
  auto it = where_.find(name);
  if (it != where_.end()) it->second.first->DropPages(*it->second.second);
}

absl::StatusOr<TensorInfo> Checkpoint::InfoWithShape(const std::string& name,
                                                     const std::vector<int64_t>& shape) const {
  auto info = Info(name);
  if (!info.ok()) return info.status();
  if (info->shape != shape) {
    TensorInfo want;
    want.shape = shape;
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", dir_, ": tensor \"", name,
                                                   "\" has shape ", info->ShapeString(),
                                                   ", expected ", want.ShapeString()));
  }
  return info;
}

absl::Status Checkpoint::ReadFloatInto(const std::string& name, const std::vector<int64_t>& shape,
                                       std::vector<float>* out) const {
  auto info = InfoWithShape(name, shape);
  if (!info.ok()) return info.status();
  if (info->dtype == DType::kF8E4M3) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", dir_, ": tensor \"", name,
                     "\" is F8_E4M3, which is read only as a linear weight with its block scales"));
  }
  TensorInfo t;
  auto data = Raw(name, &t);
  if (!data.ok()) return data.status();
  out->resize(static_cast<size_t>(t.numel()));
  ConvertToFloat(t.dtype, *data, out->size(), out->data());
  DropPages(name);
  return absl::OkStatus();
}

absl::Status Checkpoint::ReadBf16Into(const std::string& name, const std::vector<int64_t>& shape,
                                      std::vector<uint16_t>* out) const {
  auto info = InfoWithShape(name, shape);
  if (!info.ok()) return info.status();
  if (info->dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", dir_, ": tensor \"", name,
                                                   "\" is ", DTypeName(info->dtype), ", not BF16"));
  }
  TensorInfo t;
  auto data = Raw(name, &t);
  if (!data.ok()) return data.status();
  out->resize(static_cast<size_t>(t.numel()));
  std::memcpy(out->data(), *data, 2 * out->size());
  DropPages(name);
  return absl::OkStatus();
}

}  // namespace dmoe
