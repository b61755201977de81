// How deep a parsed JSON value nests, found without recursion. nlohmann parses any depth
// iteratively, but copying, comparing or printing a value recurses once per level: input from a
// client is checked with this before any of those.
#ifndef DMOE_COMMON_JSON_NESTING_H_
#define DMOE_COMMON_JSON_NESTING_H_

#include <utility>
#include <vector>

namespace dmoe {

// Whether `j` (nlohmann::json or ordered_json) nests deeper than `limit` levels of arrays and
// objects (a scalar is level 0, [] level 1, [[]] level 2). Only containers are held on the way,
// so a long flat array costs no memory here.
template <typename J>
bool NestsDeeperThan(const J& j, int limit) {
  const auto container = [](const J& v) { return v.is_array() || v.is_object(); };
  std::vector<std::pair<const J*, int>> todo;
  if (container(j)) todo.emplace_back(&j, 1);
  while (!todo.empty()) {
    const auto [v, depth] = todo.back();
    todo.pop_back();
    if (depth > limit) return true;
    for (const J& e : *v) {
      if (container(e)) todo.emplace_back(&e, depth + 1);
    }
  }
  return false;
}

}  // namespace dmoe

#endif  // DMOE_COMMON_JSON_NESTING_H_
