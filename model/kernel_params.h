// The kernels' plain parameter structs, filled from a model config (kernels/ never see
// ModelConfig).
#ifndef DMOE_MODEL_KERNEL_PARAMS_H_
#define DMOE_MODEL_KERNEL_PARAMS_H_

#include "kernels/cpu/gating.h"
#include "kernels/cpu/rope.h"
#include "model/config.h"

namespace dmoe {

cpu::GateParams GateParamsOf(const ModelConfig& c);
cpu::RopeParams RopeParamsOf(const ModelConfig& c);

}  // namespace dmoe

#endif  // DMOE_MODEL_KERNEL_PARAMS_H_
