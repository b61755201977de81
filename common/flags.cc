#include "common/flags.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dmoe {

absl::StatusOr<Flags> Flags::Parse(int argc, char** argv, const std::set<std::string>& value_flags,
                                   const std::set<std::string>& bool_flags) {
  Flags f;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--version") {
      f.version_ = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      f.help_ = true;
      continue;
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      f.positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    const size_t eq = name.find('=');
    const bool inline_value = eq != std::string::npos;
    if (inline_value) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (bool_flags.count(name)) {
      if (inline_value)
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      f.bools_.insert(name);
    } else if (value_flags.count(name)) {
      if (!inline_value) {
        if (i + 1 >= argc)
          return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
        value = argv[++i];
      }
      f.values_[name] = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see --help)"));
    }
  }
  // For tests/help_flags_test.sh: with --help and DMOE_HELP_LIST_FLAGS set, the accepted flags go
  // to stderr, so the test can check that the help documents every one of them.
  if (f.help_ && std::getenv("DMOE_HELP_LIST_FLAGS") != nullptr) {
    for (const auto* set : {&value_flags, &bool_flags}) {
      for (const std::string& name : *set)
        std::fprintf(stderr, "accepted flag: --%s\n", name.c_str());
    }
  }
  return f;
}

absl::StatusOr<std::string> Flags::String(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end() || it->second.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
  }
  return it->second;
}

std::string Flags::StringOr(const std::string& name, const std::string& dflt) const {
  auto it = values_.find(name);
  return it == values_.end() ? dflt : it->second;
}

absl::StatusOr<int64_t> Flags::Int(const std::string& name, int64_t dflt) const {
  auto it = values_.find(name);
  if (it == values_.end()) return dflt;
  int64_t v;
  if (!absl::SimpleAtoi(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": \"", it->second, "\" is not an integer"));
  }
  return v;
}

absl::StatusOr<double> Flags::Double(const std::string& name, double dflt) const {
  auto it = values_.find(name);
  if (it == values_.end()) return dflt;
  double v;
  if (!absl::SimpleAtod(it->second, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": \"", it->second, "\" is not a number"));
  }
  return v;
}

absl::StatusOr<std::vector<int32_t>> ParseTokenList(const std::string& flag, const std::string& s) {
  std::vector<int32_t> out;
  if (s.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": empty token list"));
  size_t i = 0;
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    int32_t v;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, "[", i, "]: \"", part, "\" is not a token id"));
    }
    if (v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, "[", i, "]: ", v, " is negative"));
    }
    out.push_back(v);
    ++i;
  }
  return out;
}

absl::StatusOr<int64_t> ComputeThreads(const Flags& f) {
  if (f.Has("threads") && f.Has("blas-threads")) {
    return absl::InvalidArgumentError(
        "--threads and --blas-threads are the same count (its former name): give one");
  }
  return f.Int(f.Has("threads") ? "threads" : "blas-threads", 0);
}

}  // namespace dmoe
