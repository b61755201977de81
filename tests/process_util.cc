#include "tests/process_util.h"

#include <cstdlib>

namespace dmoe::testing {

std::string Runfile(const std::string& path) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  return std::string(srcdir ? srcdir : ".") + "/dmoe/" + path;
}

std::string TmpDir() {
  const char* d = std::getenv("TEST_TMPDIR");
  return d ? d : "/tmp";
}

std::map<std::string, std::string> WaitForReadyFile(const std::string& path,
                                                    std::chrono::milliseconds timeout) {
  auto j = WaitForReady(path, timeout);
  if (!j.ok()) return {};
  std::map<std::string, std::string> out;
  for (auto it = j->begin(); it != j->end(); ++it) {
    out[it.key()] = it->is_string() ? it->get<std::string>() : it->dump();
  }
  return out;
}

}  // namespace dmoe::testing
