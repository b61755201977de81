// The flags that put routed experts on dmoe-expert shards, shared by `dmoe generate/logits` and
// dmoe-attention: --expert-shards, --wire-dtype, --expert-deadline-ms, --hedge-*, --ucx-connect.
#ifndef DMOE_ATTENTION_SERVICE_REMOTE_FLAGS_H_
#define DMOE_ATTENTION_SERVICE_REMOTE_FLAGS_H_

#include <set>
#include <string>

#include "attention_service/local_model.h"
#include "common/flags.h"

namespace dmoe {

// Help text for the flags (one block).
extern const char kRemoteHelp[];
// `flags` plus the remote-expert flag names.
std::set<std::string> WithRemote(std::set<std::string> flags);
// Fills the remote-expert part of `o`; INVALID_ARGUMENT naming the flag on a bad value.
absl::Status RemoteOptions(const Flags& flags, LocalModelOptions* o);

}  // namespace dmoe

#endif  // DMOE_ATTENTION_SERVICE_REMOTE_FLAGS_H_
