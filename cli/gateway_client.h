// `dmoe generate --target` / `dmoe chat --target`: clients of a dmoe-gateway that stream to the
// terminal.
#ifndef DMOE_CLI_GATEWAY_CLIENT_H_
#define DMOE_CLI_GATEWAY_CLIENT_H_

#include <string>
#include <vector>

#include "common/flags.h"
#include "proto/dmoe/v1/dmoe.grpc.pb.h"

namespace dmoe::cli {

// Fills sampling parameters from the flags shared by generate and chat.
absl::Status SamplingFromFlags(const Flags& f, v1::SamplingParams* p);
// Streams a Generate (text or token ids) and prints text deltas as they come, or the token ids
// at the end with --print-token-ids. Returns the process exit code.
int GenerateViaGateway(const Flags& f, const std::string& text, const std::vector<int32_t>* ids);
int ChatViaGateway(const Flags& f, const std::vector<std::pair<std::string, std::string>>& turns);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_GATEWAY_CLIENT_H_
