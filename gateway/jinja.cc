// The evaluator of gateway/jinja.h: statements and expressions of src/runtime.ts of
// @huggingface/jinja 0.5, function by function, so that each quirk there has its counterpart
// here. Lexer and parser: jinja_parse.cc; filters, tests, methods, JSON: jinja_builtins.cc.
#include "gateway/jinja.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gateway/jinja_internal.h"

namespace dmoe::gateway::jinja {

struct Program {
  std::string source;
  std::vector<internal::NodeP> body;
};

namespace internal {

using absl::Status;
using absl::StatusOr;

// Counts one level of nesting for the enclosing function; returns when too deep (Limits).
#define JINJA_DEPTH_GUARD(node)     \
  DepthGuard depth_guard_(&depth_); \
  RETURN_IF_ERROR(CheckDepth(depth_, node))

Interp::~Interp() {
  for (const auto& ns : namespaces_) ns->items.clear();
}

Status Interp::Err(const Node& at, std::string_view msg) const {
  return absl::InvalidArgumentError(
      absl::StrCat("jinja: ", Where(src_, at.pos), ": ", std::string(msg)));
}

Status Interp::Step(int64_t n) {
  steps_ += n;
  if (steps_ > lim_.max_steps) {
    return absl::ResourceExhaustedError(
        absl::StrCat("jinja: the render takes more than ", lim_.max_steps, " steps"));
  }
  return absl::OkStatus();
}

Status Interp::Charge(size_t bytes) {
  bytes_ += bytes;
  if (bytes > lim_.max_output_bytes || bytes_ > lim_.max_total_bytes) {
    return absl::ResourceExhaustedError("jinja: the render builds more text than its limits");
  }
  return absl::OkStatus();
}

Status Interp::CheckDepth(int depth, const Node& at) const {
  if (depth > lim_.max_depth || StackUsed(stack_base_) > lim_.max_stack_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("jinja: ", Where(src_, at.pos), ": the template nests too deeply (more than ",
                     lim_.max_depth, " levels or ", lim_.max_stack_bytes, " bytes of stack)"));
  }
  return absl::OkStatus();
}

Status Interp::CheckOutput(const std::string& out) const {
  if (out.size() > lim_.max_output_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("jinja: the output exceeds ", lim_.max_output_bytes, " bytes"));
  }
  return absl::OkStatus();
}

StatusOr<Value> Interp::Built(std::string s) {
  RETURN_IF_ERROR(Charge(s.size()));
  return Str(std::move(s));
}

// ---- Statements (evaluateBlock and friends). Output goes straight into `out`.

Status Interp::Exec(const std::vector<NodeP>& body, const EnvP& env, std::string* out) {
  for (const NodeP& n : body) RETURN_IF_ERROR(ExecOne(*n, env, out));
  return absl::OkStatus();
}

Status Interp::ExecOne(const Node& n, const EnvP& env, std::string* out) {
  JINJA_DEPTH_GUARD(n);
  RETURN_IF_ERROR(Step());
  switch (n.kind) {
    case NK::kStr:
      RETURN_IF_ERROR(Charge(n.str.size()));
      AppendJs(out, n.str);
      break;
    case NK::kIf: {
      ASSIGN_OR_RETURN(Value test, Eval(*n.a[0], env));
      return Exec(Truthy(test) ? n.body : n.alt, env, out);
    }
    case NK::kFor:
      return ExecFor(n, env, out);
    case NK::kSet:
      return ExecSet(n, env);
    case NK::kMacro: {
      const Node* macro = &n;
      env->Set(n.str, Fn([macro](Interp& in, Args& args, const EnvP& scope,
                                 const Node& at) -> StatusOr<Value> {
                 // Macros see the caller's variables (the JS evaluates them in the call scope).
                 const EnvP ms = Child(scope);
                 RETURN_IF_ERROR(in.BindParams(absl::StrCat("'", macro->str, "'"), macro->a, 0,
                                               macro->special, args, ms, at));
                 std::string text;
                 RETURN_IF_ERROR(in.Exec(macro->body, ms, &text));
                 return Str(std::move(text));
               }));
      break;
    }
    case NK::kBreak:
    case NK::kContinue:
      ctrl_ = n.kind == NK::kBreak ? Ctrl::kBreak : Ctrl::kContinue;
      ctrl_node_ = &n;
      return absl::CancelledError("jinja: loop control");  // caught by the enclosing for
    case NK::kComment:
      break;
    default: {
      ASSIGN_OR_RETURN(Value v, Eval(n, env));
      if (v.k == K::kNull || v.k == K::kUndef) break;
      ASSIGN_OR_RETURN(std::string text, Display(v, n));
      RETURN_IF_ERROR(Charge(text.size()));
      AppendJs(out, text);
    }
  }
  RETURN_IF_ERROR(CheckOutput(*out));
  return absl::OkStatus();
}

Status Interp::Bind(const Node& target, const Value& v, Env* env) {
  if (target.kind == NK::kIdent) {
    env->Set(target.str, v);
    return absl::OkStatus();
  }
  for (size_t j = 0; j < target.a.size(); ++j) {
    if (target.a[j]->kind != NK::kIdent) return Err(*target.a[j], "Cannot unpack to a non-name");
    env->Set(target.a[j]->str, (*v.a)[j]);
  }
  return absl::OkStatus();
}

Status Interp::ExecFor(const Node& n, const EnvP& env, std::string* out) {
  const EnvP scope = Child(env);
  const Node& target = *n.a[0];
  const Node* iter_node = n.a[1].get();
  const Node* test = nullptr;
  if (iter_node->kind == NK::kSelect) {  // `for x in xs if cond`
    test = iter_node->a[1].get();
    iter_node = iter_node->a[0].get();
  }
  ASSIGN_OR_RETURN(Value iterable, Eval(*iter_node, scope));
  std::vector<Value> keys;
  if (IsMap(iterable)) {
    for (const auto& kv : iterable.o->items) keys.push_back(Str(kv.first));
  } else if (!IsArr(iterable)) {
    return Err(*iter_node, absl::StrCat("Expected iterable or object type in for loop: got ",
                                        TypeName(iterable)));
  }
  const std::vector<Value>& all = IsArr(iterable) ? *iterable.a : keys;
  std::vector<Value> items;
  for (const Value& cur : all) {
    RETURN_IF_ERROR(Step());
    if (target.kind == NK::kTuple) {
      if (cur.k != K::kArr) {  // a TupleValue does not unpack in the JS
        return Err(target, absl::StrCat("Cannot unpack non-iterable type: ", TypeName(cur)));
      }
      if (cur.a->size() != target.a.size()) {
        return Err(target, absl::StrCat("Too ", target.a.size() > cur.a->size() ? "few" : "many",
                                        " items to unpack"));
      }
    }
    if (test) {
      const EnvP ls = Child(scope);
      RETURN_IF_ERROR(Bind(target, cur, ls.get()));
      ASSIGN_OR_RETURN(Value keep, Eval(*test, ls));
      if (!Truthy(keep)) continue;
    }
    items.push_back(cur);
  }
  bool none = true;
  const double count = static_cast<double>(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    RETURN_IF_ERROR(Step());
    const double d = static_cast<double>(i);
    Object loop;
    loop.Set("index", Int(d + 1));
    loop.Set("index0", Int(d));
    loop.Set("revindex", Int(count - d));
    loop.Set("revindex0", Int(count - d - 1));
    loop.Set("first", Bool(i == 0));
    loop.Set("last", Bool(i + 1 == items.size()));
    loop.Set("length", Int(count));
    loop.Set("previtem", i > 0 ? items[i - 1] : Value());
    loop.Set("nextitem", i + 1 < items.size() ? items[i + 1] : Value());
    scope->Set("loop", Obj(std::move(loop)));
    RETURN_IF_ERROR(Bind(target, items[i], scope.get()));
    std::string text;
    const Status st = Exec(n.body, scope, &text);
    if (!st.ok()) {
      // break/continue drop what this iteration rendered and do not count as an iteration.
      if (ctrl_ == Ctrl::kContinue) {
        ctrl_ = Ctrl::kNone;
        continue;
      }
      if (ctrl_ == Ctrl::kBreak) {
        ctrl_ = Ctrl::kNone;
        break;
      }
      return st;
    }
    AppendJs(out, text);
    RETURN_IF_ERROR(CheckOutput(*out));
    none = false;
  }
  if (none) return Exec(n.alt, scope, out);
  return absl::OkStatus();
}

Status Interp::ExecSet(const Node& n, const EnvP& env) {
  Value rhs;
  if (n.a[1]) {
    ASSIGN_OR_RETURN(rhs, Eval(*n.a[1], env, /*allow_hole=*/true));
    if (rhs.k == K::kHole) rhs = Value();  // the JS stores `undefined`, read back as undefined
  } else {
    std::string text;
    RETURN_IF_ERROR(Exec(n.body, env, &text));
    rhs = Str(std::move(text));
  }
  const Node& target = *n.a[0];
  if (target.kind == NK::kIdent) {
    env->Set(target.str, rhs);
  } else if (target.kind == NK::kTuple) {
    if (!IsArr(rhs)) {
      return Err(target, absl::StrCat("Cannot unpack non-iterable type in set: ", TypeName(rhs)));
    }
    if (rhs.a->size() != target.a.size()) {
      return Err(target, absl::StrCat("Too ", target.a.size() > rhs.a->size() ? "few" : "many",
                                      " items to unpack in set"));
    }
    return Bind(target, rhs, env.get());
  } else if (target.kind == NK::kMember) {
    ASSIGN_OR_RETURN(Value obj, Eval(*target.a[0], env));
    if (obj.k != K::kNs) return Err(target, "cannot assign attribute on non-namespace object");
    if (target.a[1]->kind != NK::kIdent) {
      return Err(target, "Cannot assign to member with non-identifier property");
    }
    obj.o->Set(target.a[1]->str, rhs);
  } else {
    return Err(target, "Invalid LHS inside assignment expression");
  }
  return absl::OkStatus();
}

// bindMacroArguments: positional, then keyword, then defaults (evaluated in the macro scope).
Status Interp::BindParams(const std::string& display, const std::vector<NodeP>& params, size_t from,
                          int special, const Args& args, const EnvP& scope, const Node& at) {
  Args pos = args;
  Object kw;
  if (!pos.empty() && pos.back().k == K::kKw) {
    kw = *pos.back().o;
    pos.pop_back();
  }
  std::vector<const Node*> pending;
  const size_t count = params.size() - from;
  for (size_t i = 0; i < count; ++i) {
    const Node& p = *params[from + i];
    std::optional<Value> v;
    if (i < pos.size()) v = pos[i];
    if (!v) {
      if (const Value* k = kw.Find(p.str)) {
        v = *k;
        kw.Erase(p.str);
      }
    }
    if (!v && p.kind == NK::kKwarg) pending.push_back(&p);
    scope->Set(p.str, v ? *v : Value());
  }
  if (special & 2) {
    scope->Set("kwargs", Obj(kw));
  } else if (!kw.items.empty()) {
    return Err(at, absl::StrCat("macro ", display, " takes no keyword argument '",
                                kw.items[0].first, "'"));
  }
  if (special & 1) {
    scope->Set("varargs", Arr(pos.size() > count ? Args(pos.begin() + count, pos.end()) : Args()));
  } else if (pos.size() > count) {
    return Err(at, absl::StrCat("macro ", display, " takes not more than ", count, " argument(s)"));
  }
  for (const Node* p : pending) {
    ASSIGN_OR_RETURN(Value v, Eval(*p->a[0], scope));
    scope->Set(p->str, v);
  }
  return absl::OkStatus();
}

// ---- Expressions.

StatusOr<Value> Interp::Eval(const Node& n, const EnvP& env, bool allow_hole) {
  JINJA_DEPTH_GUARD(n);
  RETURN_IF_ERROR(Step());
  ASSIGN_OR_RETURN(Value v, EvalRaw(n, env));
  if (v.k == K::kHole && !allow_hole) {
    return Err(n, "Cannot read properties of undefined (the first/last of an empty list)");
  }
  return v;
}

StatusOr<Value> Interp::EvalRaw(const Node& n, const EnvP& env) {
  switch (n.kind) {
    case NK::kStr:
      return Str(n.str);
    case NK::kInt:
      return Int(n.num);
    case NK::kFloat:
      return Float(n.num);
    case NK::kArray:
    case NK::kTuple: {
      std::vector<Value> items;
      for (const NodeP& e : n.a) {
        ASSIGN_OR_RETURN(Value v, Eval(*e, env));
        items.push_back(std::move(v));
      }
      return Arr(std::move(items), n.kind == NK::kTuple);
    }
    case NK::kObject: {
      Object o;
      for (size_t i = 0; i + 1 < n.a.size(); i += 2) {
        ASSIGN_OR_RETURN(Value k, Eval(*n.a[i], env));
        if (k.k != K::kStr) {
          return Err(*n.a[i], absl::StrCat("Object keys must be strings: got ", TypeName(k)));
        }
        ASSIGN_OR_RETURN(Value v, Eval(*n.a[i + 1], env));
        o.Set(k.str(), std::move(v));
      }
      return Obj(std::move(o));
    }
    case NK::kIdent:
      return Lookup(n.str, env);
    case NK::kMember:
      return EvalMember(n, env);
    case NK::kCall: {
      ASSIGN_OR_RETURN(auto args, EvalArgs(n.a, 1, env));
      if (!args.second.items.empty()) args.first.push_back(Obj(std::move(args.second), K::kKw));
      ASSIGN_OR_RETURN(Value fn, Eval(*n.a[0], env));
      if (fn.k != K::kFn) {
        return Err(
            n, absl::StrCat("Cannot call something that is not a function: got ", TypeName(fn)));
      }
      return (*fn.f)(*this, args.first, env, n);
    }
    case NK::kUnary:
      return EvalUnary(n, env);
    case NK::kBinary:
      return EvalBinary(n, env);
    case NK::kFilter: {
      ASSIGN_OR_RETURN(Value x, Eval(*n.a[0], env));
      return ApplyFilter(x, *n.a[1], env);
    }
    case NK::kTest: {
      ASSIGN_OR_RETURN(Value x, Eval(*n.a[0], env));
      ASSIGN_OR_RETURN(bool r, Test(n.str, x, nullptr, n));
      return Bool(r != n.flag);
    }
    case NK::kSelect: {  // `a if cond` without else: undefined when cond is false
      ASSIGN_OR_RETURN(Value test, Eval(*n.a[1], env));
      if (!Truthy(test)) return Value();
      return Eval(*n.a[0], env);
    }
    case NK::kTernary: {
      ASSIGN_OR_RETURN(Value c, Eval(*n.a[0], env));
      return Eval(*n.a[Truthy(c) ? 1 : 2], env);
    }
    case NK::kCallBlock:
      return EvalCallBlock(n, env);
    case NK::kFilterBlock: {
      std::string text;
      RETURN_IF_ERROR(Exec(n.body, env, &text));
      return ApplyFilter(Str(std::move(text)), *n.a[0], env);
    }
    default:
      return Err(n, "unexpected syntax here");
  }
}

// evaluateArguments: all positional arguments (with `*` unpacking) first, then keywords.
StatusOr<std::pair<Args, Object>> Interp::EvalArgs(const std::vector<NodeP>& nodes, size_t from,
                                                   const EnvP& env) {
  std::pair<Args, Object> r;
  for (size_t i = from; i < nodes.size(); ++i) {
    const Node& a = *nodes[i];
    if (a.kind == NK::kSpread) {
      ASSIGN_OR_RETURN(Value v, Eval(*a.a[0], env));
      if (!IsArr(v)) return Err(a, absl::StrCat("Cannot unpack non-iterable type: ", TypeName(v)));
      r.first.insert(r.first.end(), v.a->begin(), v.a->end());
    } else if (a.kind != NK::kKwarg && a.kind != NK::kKwSpread) {
      ASSIGN_OR_RETURN(Value v, Eval(a, env));
      r.first.push_back(std::move(v));
    }
  }
  const auto add = [&](const std::string& key, Value v, const Node& at) -> Status {
    if (r.second.Find(key)) {
      return Err(at, absl::StrCat("Got multiple values for keyword argument '", key, "'"));
    }
    r.second.Set(key, std::move(v));
    return absl::OkStatus();
  };
  for (size_t i = from; i < nodes.size(); ++i) {
    const Node& a = *nodes[i];
    if (a.kind == NK::kKwarg) {
      ASSIGN_OR_RETURN(Value v, Eval(*a.a[0], env));
      RETURN_IF_ERROR(add(a.str, std::move(v), a));
    } else if (a.kind == NK::kKwSpread) {
      ASSIGN_OR_RETURN(Value v, Eval(*a.a[0], env));
      if (!IsMap(v)) {
        return Err(a, absl::StrCat("Argument after ** must be a mapping, not ", TypeName(v)));
      }
      for (const auto& [k, val] : v.o->items) RETURN_IF_ERROR(add(k, val, a));
    }
  }
  return r;
}

StatusOr<Value> Interp::Lookup(const std::string& name, const EnvP& env) {
  if (name == "namespace") {  // every JS Environment declares its own `namespace`
    if (Value* v = env->Find(name)) return *v;
    return Fn(
        [](Interp& in, Args& args, const EnvP&, const Node& at) { return in.Namespace(args, at); });
  }
  for (Env* e = env.get(); e != nullptr; e = e->parent.get()) {
    if (Value* v = e->Find(name)) return *v;
  }
  return Value();
}

StatusOr<Value> Interp::EvalMember(const Node& n, const EnvP& env) {
  ASSIGN_OR_RETURN(Value obj, Eval(*n.a[0], env));
  const Node& pn = *n.a[1];
  Value prop;
  if (n.flag) {
    if (pn.kind == NK::kSlice) return EvalSlice(obj, pn, env);
    ASSIGN_OR_RETURN(prop, Eval(pn, env));
  } else {
    prop = pn.kind == NK::kInt ? Int(pn.num) : Str(pn.str);
  }
  if (IsContainer(obj)) {
    if (prop.k != K::kStr) {
      return Err(n, absl::StrCat("Cannot access property with non-string: got ", TypeName(prop)));
    }
    if (const Value* v = obj.o->Find(prop.str())) return *v;
    if (obj.k == K::kNs) return Value();
    return Method(obj, prop.str());
  }
  if (IsArr(obj) || obj.k == K::kStr) {
    if (prop.k == K::kInt) {  // .at(i): negative indexes count from the end
      const std::vector<uint16_t> units =
          obj.k == K::kStr ? ToUtf16(obj.str()) : std::vector<uint16_t>();
      const double len = static_cast<double>(obj.k == K::kStr ? units.size() : obj.a->size());
      double i = std::isnan(prop.n) ? 0 : std::trunc(prop.n);
      if (i < 0) i += len;
      if (i < 0 || i >= len) return Value();
      if (IsArr(obj)) return (*obj.a)[static_cast<size_t>(i)];
      std::string ch;
      AppendCp(units[static_cast<size_t>(i)], &ch);
      return Str(std::move(ch));
    }
    if (prop.k == K::kStr) {
      if (IsArr(obj))
        return prop.str() == "length" ? Int(static_cast<double>(obj.a->size())) : Value();
      return Method(obj, prop.str());
    }
    return Err(
        n, absl::StrCat("Cannot access property with non-string/non-number: got ", TypeName(prop)));
  }
  if (prop.k != K::kStr) {
    return Err(n, absl::StrCat("Cannot access property with non-string: got ", TypeName(prop)));
  }
  return Value();
}

StatusOr<Value> Interp::EvalSlice(const Value& obj, const Node& n, const EnvP& env) {
  if (!IsArr(obj) && obj.k != K::kStr) return Err(n, "Slice object must be an array or string");
  std::optional<double> part[3];
  static constexpr const char* kNames[] = {"start", "stop", "step"};
  for (int i = 0; i < 3; ++i) {
    if (!n.a[i]) continue;
    ASSIGN_OR_RETURN(Value v, Eval(*n.a[i], env));
    if (v.k == K::kUndef) continue;
    if (v.k != K::kInt) {
      return Err(*n.a[i], absl::StrCat("Slice ", kNames[i], " must be numeric or undefined"));
    }
    part[i] = v.n;
  }
  std::vector<std::string_view> cps;
  if (obj.k == K::kStr) cps = CodePoints(obj.str());
  const double len = static_cast<double>(obj.k == K::kStr ? cps.size() : obj.a->size());
  const double step = part[2].value_or(1);
  const double dir = step > 0 ? 1 : step < 0 ? -1 : 0;
  double start, stop;
  if (dir >= 0) {
    start = part[0].value_or(0);
    start = start < 0 ? std::max(len + start, 0.0) : std::min(start, len);
    stop = part[1].value_or(len);
    stop = stop < 0 ? std::max(len + stop, 0.0) : std::min(stop, len);
  } else {
    start = part[0].value_or(len - 1);
    start = start < 0 ? std::max(len + start, -1.0) : std::min(start, len - 1);
    stop = part[1].value_or(-1);
    stop = stop < -1 ? std::max(len + stop, -1.0) : std::min(stop, len - 1);
  }
  std::vector<Value> items;
  std::string text;
  for (double i = start; dir * i < dir * stop; i += step) {
    RETURN_IF_ERROR(Step());
    if (obj.k == K::kStr) {
      text.append(cps[static_cast<size_t>(i)]);
    } else {
      items.push_back((*obj.a)[static_cast<size_t>(i)]);
    }
  }
  if (obj.k == K::kStr) return Str(std::move(text));
  return Arr(std::move(items));
}

StatusOr<Value> Interp::EvalUnary(const Node& n, const EnvP& env) {
  ASSIGN_OR_RETURN(Value v, Eval(*n.a[0], env));
  if (n.str == "not") return Bool(!Truthy(v));
  if (IsNum(v) || v.k == K::kBool) return Num((n.str == "-" ? -1 : 1) * v.n, v.k == K::kFloat);
  return Err(n, absl::StrCat("Unknown operator \"", n.str, "\" for ", TypeName(v)));
}

// evaluateBinaryExpression, branch for branch.
StatusOr<Value> Interp::EvalBinary(const Node& n, const EnvP& env) {
  const std::string& op = n.str;
  ASSIGN_OR_RETURN(Value l, Eval(*n.a[0], env));
  if (op == "and") return Truthy(l) ? Eval(*n.a[1], env) : l;
  if (op == "or") return Truthy(l) ? l : Eval(*n.a[1], env);
  ASSIGN_OR_RETURN(Value r, Eval(*n.a[1], env));
  if (op == "==" || op == "!=") {
    ASSIGN_OR_RETURN(bool eq, LooseEq(l, r, n));
    return Bool(eq == (op == "=="));
  }
  const bool in = op == "in" || op == "not in";
  if (l.k == K::kUndef || r.k == K::kUndef) {
    if (r.k == K::kUndef && in) return Bool(op == "not in");
    return Err(n, absl::StrCat("Cannot perform operation ", op, " on undefined values"));
  }
  if (l.k == K::kNull || r.k == K::kNull) return Err(n, "Cannot perform operation on null values");
  const auto concat = [&]() -> StatusOr<Value> {
    ASSIGN_OR_RETURN(std::string a, RawStr(l, n));
    ASSIGN_OR_RETURN(std::string b, RawStr(r, n));
    RETURN_IF_ERROR(Charge(a.size() + b.size()));
    AppendJs(&a, b);
    return Str(std::move(a));
  };
  const auto numlike = [](const Value& v) { return IsNum(v) || v.k == K::kBool; };
  if (op == "~") return concat();
  if (op == "**" && numlike(l) && numlike(r)) {
    const double a = l.n, b = r.n;
    if (a == 0 && b < 0) return Err(n, "0.0 cannot be raised to a negative power");
    const double res =
        std::isnan(b) || (std::fabs(a) == 1 && std::isinf(b)) ? std::nan("") : std::pow(a, b);
    if (!std::isfinite(res)) return Err(n, "Exponentiation result is not a finite real number");
    return Num(res, l.k == K::kFloat || r.k == K::kFloat || b < 0);
  }
  if (IsNum(l) && IsNum(r)) {
    const double a = l.n, b = r.n;
    const bool is_float = l.k == K::kFloat || r.k == K::kFloat;
    if (op == "+") return Num(a + b, is_float);
    if (op == "-") return Num(a - b, is_float);
    if (op == "*") return Num(a * b, is_float);
    if (op == "/") return Float(a / b);
    if (op == "//") return Num(std::floor(a / b), is_float);
    if (op == "%") return Num(std::fmod(a, b), is_float);
    if (op == "<") return Bool(a < b);
    if (op == ">") return Bool(a > b);
    if (op == ">=") return Bool(a >= b);
    if (op == "<=") return Bool(a <= b);
  } else if (IsArr(l) && IsArr(r)) {
    if (op == "+") {
      RETURN_IF_ERROR(Step(static_cast<int64_t>(l.a->size() + r.a->size())));
      std::vector<Value> items = *l.a;
      items.insert(items.end(), r.a->begin(), r.a->end());
      return Arr(std::move(items));
    }
  } else if (IsArr(r) && in) {
    const bool found =
        std::any_of(r.a->begin(), r.a->end(), [&](const Value& x) { return StrictEq(x, l); });
    return Bool(found != (op == "not in"));
  }
  if ((l.k == K::kStr || r.k == K::kStr) && op == "+") return concat();
  if (l.k == K::kStr && r.k == K::kStr && in) {
    return Bool((r.str().find(l.str()) != std::string::npos) != (op == "not in"));
  }
  if (l.k == K::kStr && IsMap(r) && in)
    return Bool((r.o->Find(l.str()) != nullptr) != (op == "not in"));
  return Err(
      n, absl::StrCat("Unknown operator \"", op, "\" between ", TypeName(l), " and ", TypeName(r)));
}

StatusOr<Value> Interp::EvalCallBlock(const Node& n, const EnvP& env) {
  const Node* block = &n;
  Value caller =
      Fn([block, env](Interp& in, Args& args, const EnvP&, const Node& at) -> StatusOr<Value> {
        const EnvP cb = Child(env);
        RETURN_IF_ERROR(in.BindParams("None", block->a, 1, block->special, args, cb, at));
        std::string text;
        RETURN_IF_ERROR(in.Exec(block->body, cb, &text));
        return Str(std::move(text));
      });
  const Node& call = *n.a[0];
  ASSIGN_OR_RETURN(auto args, EvalArgs(call.a, 1, env));
  args.first.push_back(Obj(std::move(args.second), K::kKw));
  ASSIGN_OR_RETURN(Value fn, Eval(*call.a[0], env));
  if (fn.k != K::kFn) {
    return Err(n, absl::StrCat("Cannot call something that is not a function: got ", TypeName(fn)));
  }
  const EnvP scope = Child(env);
  scope->Set("caller", caller);
  return (*fn.f)(*this, args.first, scope, n);
}

}  // namespace internal

absl::StatusOr<Template> Template::Parse(std::string_view source) {
  if (!internal::ValidUtf8(source)) {
    return absl::InvalidArgumentError("jinja: the template is not valid UTF-8");
  }
  ASSIGN_OR_RETURN(std::vector<internal::NodeP> body, internal::ParseTemplate(source));
  auto program = std::make_shared<Program>();
  program->source = std::string(source);
  program->body = std::move(body);
  return Template(std::move(program));
}

absl::StatusOr<std::string> Template::Render(const nlohmann::ordered_json& context,
                                             const Limits& limits) const {
  using internal::Env;
  if (!context.is_object() && !context.is_null()) {
    return absl::InvalidArgumentError("jinja: the render context must be a JSON object");
  }
  internal::Interp in(program_->source, limits, internal::StackPosition());
  const auto global = std::make_shared<Env>();
  in.InstallGlobals(global.get());
  if (context.is_object()) {
    for (const auto& [name, value] : context.items()) {
      if (global->Find(name) != nullptr || name == "namespace") {
        return absl::InvalidArgumentError(absl::StrCat("jinja: Variable already declared: ", name));
      }
      ASSIGN_OR_RETURN(internal::Value v, in.FromJson(value, 0));
      global->Set(name, std::move(v));
    }
  }
  std::string out;
  const absl::Status st = in.Exec(program_->body, global, &out);
  if (!st.ok() && in.in_control_flow()) {
    return in.Err(*in.control_node(), "{% break %} or {% continue %} outside of a loop");
  }
  RETURN_IF_ERROR(st);
  return out;
}

}  // namespace dmoe::gateway::jinja
