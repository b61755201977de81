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

namespace {

// ComputePlacement's state: the map being built and the room left on each shard.
struct Planner {
  explicit Planner(const std::vector<ShardSlot>& s) : shards(s) {}
  const std::vector<ShardSlot>& shards;
  std::vector<int64_t> moe_layers;
  int64_t e = 0;     // routed experts per layer
  int64_t unit = 0;  // experts kept together: a group, or about E / shards without groups
  PlacementMap m;
  std::vector<int64_t> free;

  int MostFree(int64_t need) const {
    int best = -1;
    for (size_t i = 0; i < free.size(); ++i) {
      if (free[i] >= need && (best < 0 || free[i] > free[static_cast<size_t>(best)])) {
        best = static_cast<int>(i);
      }
    }
    return best;
  }

  // One copy of every unit, on the shard with the most room (split when none holds it whole).
  void FirstCopies() {
    for (int64_t l : moe_layers) {
      for (int64_t first = 0; first < e; first += unit) {
        const int64_t n = std::min(unit, e - first);
        int s = MostFree(n);
        if (s >= 0) {  // the whole unit on one shard
          for (int64_t x = first; x < first + n; ++x) m.replicas[{l, x}].push_back(s);
          free[static_cast<size_t>(s)] -= n;
          continue;
        }
        for (int64_t x = first; x < first + n; ++x) {  // no shard has room for it whole: split
          s = MostFree(1);
          m.replicas[{l, x}].push_back(s);
          --free[static_cast<size_t>(s)];
        }
      }
    }
  }

  bool Hosts(size_t s, int64_t l, int64_t x) {
    const std::vector<int>& rs = m.replicas[{l, x}];
    return std::find(rs.begin(), rs.end(), static_cast<int>(s)) != rs.end();
  }

  // A further copy of experts [first, first + n) of layer l: on the shard with the most room
  // that hosts none of them, else split as room allows.
  void AnotherCopy(int64_t l, int64_t first, int64_t n) {
    int best = -1;
    for (size_t s = 0; s < shards.size(); ++s) {
      bool any = false;
      for (int64_t x = first; x < first + n && !any; ++x) any = Hosts(s, l, x);
      if (!any && free[s] >= n && (best < 0 || free[s] > free[static_cast<size_t>(best)])) {
        best = static_cast<int>(s);
      }
    }
    if (best >= 0) {
      for (int64_t x = first; x < first + n; ++x) m.replicas[{l, x}].push_back(best);
      free[static_cast<size_t>(best)] -= n;
      return;
    }
    for (int64_t x = first; x < first + n; ++x) {
      int b = -1;
      for (size_t s = 0; s < shards.size(); ++s) {
        if (!Hosts(s, l, x) && free[s] > 0 && (b < 0 || free[s] > free[static_cast<size_t>(b)])) {
          b = static_cast<int>(s);
        }
      }
      if (b < 0) continue;
      m.replicas[{l, x}].push_back(b);
      --free[static_cast<size_t>(b)];
    }
  }

  // EPLB, one replica: take load off the most loaded shard by replicating its heaviest expert
  // (per replica) onto the least-loaded shard that has room and does not host it yet, if that
  // lowers the maximum shard load. False when no replica does.
  bool AddHotReplica(const std::map<ExpertKey, double>& load, std::vector<double>* per) {
    const int hottest = static_cast<int>(std::max_element(per->begin(), per->end()) - per->begin());
    const double before = (*per)[static_cast<size_t>(hottest)];
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
      for (size_t i = 0; i < per->size(); ++i) {
        if (free[i] <= 0 || std::find(rs.begin(), rs.end(), static_cast<int>(i)) != rs.end())
          continue;
        if (target < 0 || (*per)[i] < (*per)[static_cast<size_t>(target)]) {
          target = static_cast<int>(i);
        }
      }
      if (target < 0) continue;
      // The new split: each of the n+1 replicas carries load / (n+1).
      const double total = load.at(key);
      const double n = static_cast<double>(rs.size());
      std::vector<double> next = *per;
      for (int s : rs) next[static_cast<size_t>(s)] -= total / n - total / (n + 1);
      next[static_cast<size_t>(target)] += total / (n + 1);
      if (*std::max_element(next.begin(), next.end()) >= before - 1e-12) continue;
      rs.push_back(target);
      --free[static_cast<size_t>(target)];
      *per = next;
      return true;
    }
    return false;
  }
};

}  // namespace

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
  Planner p(shards);
  for (int64_t l = 0; l < c.num_expert_layers(); ++l) {
    if (c.IsMoeLayer(l)) p.moe_layers.push_back(l);
  }
  p.e = c.n_routed_experts;
  const int64_t needed = static_cast<int64_t>(p.moe_layers.size()) * p.e;
  if (needed > total_capacity) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement: ", needed, " (layer, expert) pairs but the shards hold ", total_capacity));
  }
  p.m.version = version;
  for (const ShardSlot& s : shards) p.m.shards.push_back(s.id);
  for (const ShardSlot& s : shards) p.free.push_back(s.capacity);
  const int64_t ns = static_cast<int64_t>(shards.size());
  p.unit = c.n_group > 1 ? p.e / c.n_group : (p.e + ns - 1) / ns;
  p.FirstCopies();
  // Further copies: each unit again on the shard with the most room that hosts none of it.
  for (int64_t r = 1; r < options.replication && r < ns; ++r) {
    for (int64_t l : p.moe_layers) {
      for (int64_t first = 0; first < p.e; first += p.unit) {
        p.AnotherCopy(l, first, std::min(p.unit, p.e - first));
      }
    }
  }
  std::vector<double> per = ShardLoads(p.m, load);
  for (int64_t added = 0; added < options.max_extra_replicas; ++added) {
    if (!p.AddHotReplica(load, &per)) break;  // no replica lowers the maximum any more
  }
  return p.m;
}

}  // namespace dmoe::router
