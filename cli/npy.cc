#include "cli/npy.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dmoe::cli {

absl::Status WriteNpyFloat32(const std::string& path, const std::vector<int64_t>& shape,
                             const float* data) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  // "(T, V)"; a 1-d shape is written "(T,)" as Python spells a 1-tuple.
  std::string dims = absl::StrJoin(shape, ", ");
  if (shape.size() == 1) dims += ",";
  std::string header =
      absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (", dims, "), }");
  // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64, ending
  // in a newline.
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out: cannot write ", path, ": ", std::strerror(errno)));
  }
  const uint16_t len = static_cast<uint16_t>(header.size());
  const unsigned char preamble[10] = {0x93,
                                      'N',
                                      'U',
                                      'M',
                                      'P',
                                      'Y',
                                      1,
                                      0,
                                      static_cast<unsigned char>(len & 0xff),
                                      static_cast<unsigned char>(len >> 8)};
  bool ok = std::fwrite(preamble, 1, 10, f) == 10 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(data, 4, static_cast<size_t>(n), f) == static_cast<size_t>(n);
  if (std::fclose(f) != 0 || !ok) {
    return absl::InternalError(absl::StrCat("--out: write to ", path, " failed"));
  }
  return absl::OkStatus();
}

}  // namespace dmoe::cli
