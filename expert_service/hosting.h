// Keeps what an expert shard hosts in step with the router's placement (DESIGN.md §4): for each
// new target map it loads the experts it gained (reading only those tensors), serves them, and
// reports the version ready; it drops experts it lost only after a map without them has been
// active for the drain period, so that no attention node still using the old map is refused.
#ifndef DMOE_EXPERT_SERVICE_HOSTING_H_
#define DMOE_EXPERT_SERVICE_HOSTING_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "common/mutex.h"
#include "expert_service/expert_shard.h"
#include "model/config.h"
#include "proto/router.pb.h"

namespace dmoe {

class HostingAgent {
 public:
  using Key = std::pair<int64_t, int64_t>;
  HostingAgent(const ModelConfig& config, std::string model_dir, std::string node_id,
               ExpertShard* shard, std::chrono::milliseconds drain,
               WeightDType dtype = WeightDType::kAuto);
  ~HostingAgent();

  // Called after a version is loaded and served (e.g. to heartbeat at once). Set before Start.
  std::function<void(uint64_t version)> on_ready;
  void Start();
  void Stop();
  // Gives up a load in progress (at its next tensor) and every later one: the shard is leaving.
  void StopLoading() { stop_loading_ = true; }
  // From the router watch (any thread): the newest target map and the active version.
  void OnUpdate(const internal::PlacementUpdate& u);

  // The newest target whose experts are all loaded and served.
  uint64_t ready_version() const { return ready_version_; }
  uint64_t active_version() const { return active_version_; }
  // True when the active map assigns nothing to this shard (after it deregistered).
  bool ActiveWithoutMe() const;
  // Failures to load (bad checkpoint): the shard then never reports that version ready.
  uint64_t load_errors() const { return load_errors_; }
  // Loads given up by StopLoading (or Stop).
  uint64_t loads_given_up() const { return loads_given_up_; }

 private:
  void Run();
  // Drops and retakes mu_ while reading the checkpoint and around on_ready.
  void LoadLocked(uint64_t version, const std::set<Key>& want) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropIfDrainedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ModelConfig config_;
  std::string dir_;
  std::string node_id_;
  ExpertShard* shard_;
  std::chrono::milliseconds drain_;
  WeightDType dtype_;
  mutable Mutex mu_;
  CondVar wake_;
  std::optional<internal::PlacementUpdate> pending_ ABSL_GUARDED_BY(mu_);
  // This shard's experts in each version seen.
  std::map<uint64_t, std::set<Key>> assigned_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> ready_version_{0}, active_version_{0}, load_errors_{0}, loads_given_up_{0};
  std::chrono::steady_clock::time_point active_since_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<bool> stop_loading_{false};
  std::thread thread_;
};

}  // namespace dmoe

#endif  // DMOE_EXPERT_SERVICE_HOSTING_H_
