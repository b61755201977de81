// `dmoe serve`: the whole stack in one process.
#ifndef DMOE_CLI_SERVE_H_
#define DMOE_CLI_SERVE_H_

namespace dmoe::cli {

int Serve(int argc, char** argv);

}  // namespace dmoe::cli

#endif  // DMOE_CLI_SERVE_H_
