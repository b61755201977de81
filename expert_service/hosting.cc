#include "expert_service/hosting.h"

#include <malloc.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/mutex.h"
#include "model/safetensors.h"

namespace dmoe {

HostingAgent::HostingAgent(const ModelConfig& config, std::string model_dir, std::string node_id,
                           ExpertShard* shard, std::chrono::milliseconds drain, WeightDType dtype)
    : config_(config),
      dir_(std::move(model_dir)),
      node_id_(std::move(node_id)),
      shard_(shard),
      drain_(drain),
      dtype_(dtype) {}

HostingAgent::~HostingAgent() { Stop(); }

void HostingAgent::Start() {
  thread_ = std::thread([this] { Run(); });
}

void HostingAgent::Stop() {
  StopLoading();
  {
    MutexLock l(&mu_);
    stop_ = true;
    wake_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
}

void HostingAgent::OnUpdate(const internal::PlacementUpdate& u) {
  MutexLock l(&mu_);
  pending_ = u;
  wake_.SignalAll();
}

bool HostingAgent::ActiveWithoutMe() const {
  MutexLock l(&mu_);
  const uint64_t active = active_version_;
  if (active == 0) return false;
  auto it = assigned_.find(active);
  return it == assigned_.end() || it->second.empty();
}

void HostingAgent::Run() {
  MutexLock l(&mu_);
  while (!stop_) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
    while (!stop_ && !pending_.has_value() && wake_.WaitUntil(&mu_, until)) {
    }
    if (stop_) break;
    if (pending_.has_value()) {
      const internal::PlacementUpdate u = std::move(*pending_);
      pending_.reset();
      std::set<Key> mine;
      for (const auto& r : u.replicas()) {
        for (const auto& id : r.node_ids()) {
          if (id == node_id_) mine.insert({r.layer(), r.expert()});
        }
      }
      if (u.version() > 0) assigned_[u.version()] = mine;
      if (u.active_version() != active_version_) {
        active_version_ = u.active_version();
        active_since_ = std::chrono::steady_clock::now();
      }
      if (u.version() > ready_version_) LoadLocked(u.version(), mine);
    }
    DropIfDrainedLocked();
    // Forget versions older than both the active and the ready one.
    const uint64_t keep = std::min<uint64_t>(active_version_, ready_version_);
    while (!assigned_.empty() && assigned_.begin()->first < keep)
      assigned_.erase(assigned_.begin());
  }
}

void HostingAgent::LoadLocked(uint64_t version, const std::set<Key>& want) {
  const std::shared_ptr<const ExpertStore> current = shard_->store();
  std::vector<Key> gained;
  for (const Key& k : want) {
    if (current->Find(k.first, k.second) == nullptr) gained.push_back(k);
  }
  if (!gained.empty()) {
    mu_.Unlock();  // loading may take long; updates keep queuing meanwhile
    const auto t0 = std::chrono::steady_clock::now();
    std::unique_ptr<ExpertStore> added;
    uint64_t bytes = 0;
    absl::Status st;
    {
      auto ck = Checkpoint::Open(dir_);
      if (!ck.ok()) {
        st = ck.status();
      } else {
        uint64_t tensors = 0;
        const uint64_t total = (*ck)->BytesOf(ExpertStore::TensorSelector(gained), &tensors);
        LoadProgress progress(absl::StrCat("dmoe-expert: placement ", version, ", ", gained.size(),
                                           " experts gained"),
                              tensors, total);
        (*ck)->set_progress(&progress);
        (*ck)->set_cancel([this] { return stop_loading_.load(); });
        auto s = ExpertStore::Load(**ck, config_, gained, dtype_);
        if (s.ok()) progress.Done();
        (*ck)->set_progress(nullptr);
        if (!s.ok()) {
          st = s.status();
        } else {
          added = std::move(s).value();
          bytes = (*ck)->bytes_read();
        }
      }  // the checkpoint is unmapped here
    }
    mu_.Lock();
    if (absl::IsCancelled(st)) {
      ++loads_given_up_;
      spdlog::info("placement {}: loading its experts given up (the shard is stopping)", version);
      return;
    }
    if (!st.ok()) {
      ++load_errors_;
      spdlog::error("cannot load the experts of placement {}: {}", version,
                    std::string(st.message()));
      return;
    }
    std::set<Key> keep;
    for (const Key& k : shard_->store()->Keys()) keep.insert(k);
    shard_->SetStore(shard_->store()->Merge(keep, added.get()));
    malloc_trim(0);  // conversion scratch and the checkpoint's pages go back to the system
    spdlog::info("placement {}: loaded {} experts ({:.1f} MiB) in {:.2f} s", version, gained.size(),
                 static_cast<double>(bytes) / (1 << 20),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  ready_version_ = version;
  if (on_ready) {
    mu_.Unlock();
    on_ready(version);
    mu_.Lock();
  }
}

void HostingAgent::DropIfDrainedLocked() {
  if (active_version_ == 0 || std::chrono::steady_clock::now() - active_since_ < drain_) return;
  // Needed: what the active map and the newest loaded target assign here.
  std::set<Key> needed;
  for (uint64_t v : {active_version_.load(), ready_version_.load()}) {
    auto it = assigned_.find(v);
    if (it != assigned_.end()) needed.insert(it->second.begin(), it->second.end());
  }
  const std::shared_ptr<const ExpertStore> current = shard_->store();
  size_t extra = 0;
  for (const Key& k : current->Keys()) extra += needed.count(k) == 0;
  if (extra == 0) return;
  shard_->SetStore(current->Merge(needed, nullptr));
  malloc_trim(0);  // (freed once the last batch using the old store lets go of it)
  spdlog::info("placement {} active: dropped {} experts", active_version_.load(), extra);
}

}  // namespace dmoe
