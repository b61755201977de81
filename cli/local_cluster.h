// `dmoe up` / `dmoe down`: a local cluster of separate processes on 127.0.0.1 (expert shards over
// UCX, attention nodes, a gateway), recorded in a state file so that `down` stops exactly them.
#ifndef DMOE_CLI_LOCAL_CLUSTER_H_
#define DMOE_CLI_LOCAL_CLUSTER_H_

namespace dmoe::cli {

int Up(int argc, char** argv);
int Down(int argc, char** argv);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_LOCAL_CLUSTER_H_
