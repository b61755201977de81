#include "router/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace dmoe::router {

std::vector<int64_t> PlacementMap::Hosted() const {
  std::vector<int64_t> n(shards.size(), 0);
  for (const auto& [key, rs] : replicas) {
    for (int s : rs) ++n[static_cast<size_t>(s)];
  }
  return n;
}

std::vector<double> ShardLoads(const PlacementMap& m, const std::map<ExpertKey, double>& load) {
  std::vector<double> per(m.shards.size(), 0.0);
  for (const auto& [key, rs] : m.replicas) {
    auto it = load.find(key);
    if (it == load.end() || rs.empty()) continue;
    for (int s : rs) per[static_cast<size_t>(s)] += it->second / static_cast<double>(rs.size());
  }
  return per;
}

double Imbalance(const PlacementMap& m, const std::map<ExpertKey, double>& load) {
  const std::vector<double> per = ShardLoads(m, load);
  if (per.empty()) return 1.0;
  double sum = 0, mx = 0;
  for (double v : per) {
    sum += v;
    mx = std::max(mx, v);
  }
  return sum > 0 ? mx / (sum / static_cast<double>(per.size())) : 1.0;
}

absl::StatusOr<PlacementMap> ComputePlacement(const ModelConfig& c,
                                              const std::vector<ShardSlot>& shards,
                                              const std::map<ExpertKey, double>& load,
                                              const PlacementOptions& options, uint64_t version) {
  if (shards.empty()) return absl::InvalidArgumentError("placement: no expert shards");
  int64_t total_capacity = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    if (shards[i].capacity <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: shard ", shards[i].id, " has capacity ", shards[i].capacity));
    }
    total_capacity += shards[i].capacity;
  }
  std::vector<int64_t> moe_layers;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (c.IsMoeLayer(l)) moe_layers.push_back(l);
  }
  const int64_t e = c.n_routed_experts;
  const int64_t needed = static_cast<int64_t>(moe_layers.size()) * e;
  if (needed > total_capacity) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement: ", needed, " (layer, expert) pairs but the shards hold ", total_capacity));
  }
  PlacementMap m;
  m.version = version;
  for (const ShardSlot& s : shards) m.shards.push_back(s.id);
  std::vector<int64_t> free(shards.size());
  for (size_t i = 0; i < shards.size(); ++i) free[i] = shards[i].capacity;
  // Units kept together: expert groups, or blocks of about E / shards without groups.
  const int64_t unit = c.n_group > 1 ? e / c.n_group
                                     : (e + static_cast<int64_t>(shards.size()) - 1) /
                                           static_cast<int64_t>(shards.size());
  auto most_free = [&](int64_t need) {
    int best = -1;
    for (size_t i = 0; i < free.size(); ++i) {
      if (free[i] >= need && (best < 0 || free[i] > free[static_cast<size_t>(best)])) {
        best = static_cast<int>(i);
      }
    }
    return best;
  };
  for (int64_t l : moe_layers) {
    for (int64_t first = 0; first < e; first += unit) {
      const int64_t n = std::min(unit, e - first);
      int s = most_free(n);
      if (s >= 0) {  // the whole unit on one shard
        for (int64_t x = first; x < first + n; ++x) m.replicas[{l, x}].push_back(s);
        free[static_cast<size_t>(s)] -= n;
        continue;
      }
      for (int64_t x = first; x < first + n; ++x) {  // no shard has room for it whole: split
        s = most_free(1);
        m.replicas[{l, x}].push_back(s);
        --free[static_cast<size_t>(s)];
      }
    }
  }
  // Further copies: each unit again on the shard with the most room that hosts none of it.
  for (int64_t r = 1; r < options.replication && r < static_cast<int64_t>(shards.size()); ++r) {
    for (int64_t l : moe_layers) {
      for (int64_t first = 0; first < e; first += unit) {
        const int64_t n = std::min(unit, e - first);
        auto hosts = [&](size_t s, int64_t x) {
          const std::vector<int>& rs = m.replicas[{l, x}];
          return std::find(rs.begin(), rs.end(), static_cast<int>(s)) != rs.end();
        };
        int best = -1;
        for (size_t s = 0; s < shards.size(); ++s) {
          bool any = false;
          for (int64_t x = first; x < first + n && !any; ++x) any = hosts(s, x);
          if (!any && free[s] >= n && (best < 0 || free[s] > free[static_cast<size_t>(best)])) {
            best = static_cast<int>(s);
          }
        }
        if (best >= 0) {
          for (int64_t x = first; x < first + n; ++x) m.replicas[{l, x}].push_back(best);
          free[static_cast<size_t>(best)] -= n;
          continue;
        }
        for (int64_t x = first; x < first + n; ++x) {  // split, as room allows
          int b = -1;
          for (size_t s = 0; s < shards.size(); ++s) {
            if (!hosts(s, x) && free[s] > 0 && (b < 0 || free[s] > free[static_cast<size_t>(b)])) {
              b = static_cast<int>(s);
            }
          }
          if (b < 0) continue;
          m.replicas[{l, x}].push_back(b);
          --free[static_cast<size_t>(b)];
        }
      }
    }
  }
  // EPLB: take load off the most loaded shard by replicating its heaviest expert (per replica)
  // onto the least-loaded shard that has room and does not host it yet, while that lowers the
  // maximum shard load.
  std::vector<double> per = ShardLoads(m, load);
  for (int64_t added = 0; added < options.max_extra_replicas; ++added) {
    const int hottest = static_cast<int>(std::max_element(per.begin(), per.end()) - per.begin());
    const double before = per[static_cast<size_t>(hottest)];
    bool done = false;
    // Candidates on the hottest shard, heaviest per replica first.
    std::vector<std::pair<double, ExpertKey>> candidates;
    for (const auto& [key, rs] : m.replicas) {
      auto it = load.find(key);
      if (it == load.end() || std::find(rs.begin(), rs.end(), hottest) == rs.end()) continue;
      candidates.push_back({it->second / static_cast<double>(rs.size()), key});
    }
    std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (const auto& [unused, key] : candidates) {
      std::vector<int>& rs = m.replicas[key];
      int target = -1;
      for (size_t i = 0; i < per.size(); ++i) {
        if (free[i] <= 0 || std::find(rs.begin(), rs.end(), static_cast<int>(i)) != rs.end())
          continue;
        if (target < 0 || per[i] < per[static_cast<size_t>(target)]) target = static_cast<int>(i);
      }
      if (target < 0) continue;
      // The new split: each of the n+1 replicas carries load / (n+1).
      const double total = load.at(key);
      const double n = static_cast<double>(rs.size());
      std::vector<double> next = per;
      for (int s : rs) next[static_cast<size_t>(s)] -= total / n - total / (n + 1);
      next[static_cast<size_t>(target)] += total / (n + 1);
      if (*std::max_element(next.begin(), next.end()) >= before - 1e-12) continue;
      rs.push_back(target);
      --free[static_cast<size_t>(target)];
      per = next;
      done = true;
      break;
    }
    if (!done) break;  // no replica lowers the maximum any more
  }
  return m;
}

}  // namespace dmoe::router
