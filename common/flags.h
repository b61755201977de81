// A small flag parser for subcommands: `--name value`, `--name=value`, boolean `--name`, and
// positional arguments. Unknown flags are errors that name the flag.
#ifndef DMOE_COMMON_FLAGS_H_
#define DMOE_COMMON_FLAGS_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe {

class Flags {
 public:
  // `value_flags` take a value; `bool_flags` do not. `--help`/`-h` and `--version` are always
  // known.
  static absl::StatusOr<Flags> Parse(int argc, char** argv,
                                     const std::set<std::string>& value_flags,
                                     const std::set<std::string>& bool_flags);
  bool help() const { return help_; }
  bool version() const { return version_; }
  bool Has(const std::string& name) const { return values_.count(name) || bools_.count(name); }
  const std::vector<std::string>& positional() const { return positional_; }
  absl::StatusOr<std::string> String(const std::string& name) const;  // required
  std::string StringOr(const std::string& name, const std::string& dflt) const;
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t dflt) const;
  absl::StatusOr<double> Double(const std::string& name, double dflt) const;
  bool Bool(const std::string& name) const { return bools_.count(name) != 0; }

 private:
  bool help_ = false;
  bool version_ = false;
  std::map<std::string, std::string> values_;
  std::set<std::string> bools_;
  std::vector<std::string> positional_;
};

// "1,2,3" -> {1, 2, 3}; errors name `flag` and the bad element.
absl::StatusOr<std::vector<int32_t>> ParseTokenList(const std::string& flag, const std::string& s);

// The compute-thread count of a service: --threads N, or its former name --blas-threads N (not
// both); 0 when neither is given (the default: one per CPU).
absl::StatusOr<int64_t> ComputeThreads(const Flags& f);

}  // namespace dmoe

#endif  // DMOE_COMMON_FLAGS_H_
