// Safetensors files: header validation, mmap'ed single files and sharded checkpoints with
// selective loading (only the tensors asked for by name are ever read).
//
// File format: u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data region; offsets are relative to the start of the data region.
#ifndef DMOE_MODEL_SAFETENSORS_H_
#define DMOE_MODEL_SAFETENSORS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "model/load_progress.h"

namespace dmoe {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute byte offset in the file
  uint64_t nbytes = 0;

  int64_t numel() const;
  std::string ShapeString() const;  // "[4, 256]"
};

// Largest header accepted (the reference implementation's limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

// Parses and checks the header of a safetensors file whose first `size` bytes are `data` (the whole
// file). Checks: length field, JSON, each entry's dtype, shape (non-negative, no overflow),
// shape x dtype size == byte range, ranges inside the data region and pairwise non-overlapping.
// Reads nothing past the header. Never crashes on any input (fuzzed).
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(const uint8_t* data, size_t size);

// One mmap'ed safetensors file. Thread-compatible after Open.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;
  // Pointer to the tensor's bytes inside the mapping (no alignment guarantee).
  const uint8_t* Data(const TensorInfo& t) const { return base_ + t.offset; }
  // Drops the mapping's pages under the tensor from this process's resident set (the file is
  // read-only: a later read faults them back in). Loading copies each tensor once, then drops it,
  // so the peak resident memory is the weights held plus one tensor, not twice the weights.
  void DropPages(const TensorInfo& t) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> by_name_;
};

// A Hugging Face checkpoint directory: `model.safetensors`, or the shards listed by
// `model.safetensors.index.json`. Only headers are read at Open; tensor bytes are touched only by
// Read*/Raw for the names asked for, and counted in bytes_read(). Thread-safe for reads.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& model_dir);

  bool Has(const std::string& name) const { return where_.count(name) != 0; }
  absl::StatusOr<TensorInfo> Info(const std::string& name) const;
  std::vector<std::string> Names() const;

  // The tensor as floats, after checking that its shape is exactly `shape`.
  // ReadFloat into `out` (resized; its capacity is reused, so a loop allocates once).
  absl::Status ReadFloatInto(const std::string& name, const std::vector<int64_t>& shape,
                             std::vector<float>* out) const;
  absl::StatusOr<std::vector<float>> ReadFloat(const std::string& name,
                                               const std::vector<int64_t>& shape) const;
  // A BF16 tensor's elements as bits (no conversion), after checking its shape and dtype.
  absl::Status ReadBf16Into(const std::string& name, const std::vector<int64_t>& shape,
                            std::vector<uint16_t>* out) const;
  // The tensor's raw bytes in the mapping (counted as read). Call DropPages(name) once copied.
  absl::StatusOr<const uint8_t*> Raw(const std::string& name, TensorInfo* info) const;
  // SafetensorsFile::DropPages of the named tensor (no-op for an unknown name). Read* call it.
  void DropPages(const std::string& name) const;

  // Total bytes of tensor data handed out so far.
  uint64_t bytes_read() const { return bytes_read_.load(); }
  // Tensors whose name `select` accepts: their count in *tensors and their bytes (the totals of a
  // LoadProgress).
  uint64_t BytesOf(const std::function<bool(const std::string&)>& select, uint64_t* tensors) const;
  // Every tensor handed out from now on is reported to `progress` (not owned; nullptr: none).
  // Not thread-safe against concurrent reads; set it before loading.
  void set_progress(LoadProgress* progress) { progress_ = progress; }
  // Before each tensor is handed out, `cancelled` (empty: never) is asked; once it returns true,
  // reads fail CANCELLED, so that a long load can be given up (the process is stopping). Set
  // before loading, like set_progress.
  void set_cancel(std::function<bool()> cancelled) { cancelled_ = std::move(cancelled); }
  size_t num_files() const { return files_.size(); }

 private:
  Checkpoint() = default;
  absl::StatusOr<TensorInfo> InfoWithShape(const std::string& name,
                                           const std::vector<int64_t>& shape) const;
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>> where_;
  mutable std::atomic<uint64_t> bytes_read_{0};
  LoadProgress* progress_ = nullptr;
  std::function<bool()> cancelled_;
};

}  // namespace dmoe

#endif  // DMOE_MODEL_SAFETENSORS_H_
