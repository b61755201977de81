// The two status macros Debian's Abseil 20220623 lacks.
#ifndef DMOE_COMMON_STATUS_MACROS_H_
#define DMOE_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DMOE_CONCAT_INNER_(a, b) a##b
#define DMOE_CONCAT_(a, b) DMOE_CONCAT_INNER_(a, b)

// Returns from the current function with the status of `expr` when it is not OK.
#define RETURN_IF_ERROR(expr)                    \
  do {                                           \
    ::absl::Status dmoe_status_ = (expr);        \
    if (!dmoe_status_.ok()) return dmoe_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, F())`: declares/assigns x from a StatusOr or returns its error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(DMOE_CONCAT_(dmoe_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(var, lhs, expr) \
  auto var = (expr);                           \
  if (!var.ok()) return var.status();          \
  lhs = std::move(var).value()

#endif  // DMOE_COMMON_STATUS_MACROS_H_
