// Internals of gateway/jinja.{h,cc} shared by its two source files: the text helpers that mimic JS
// strings and numbers, and the syntax tree that jinja_parse.cc builds and jinja.cc evaluates.
// Not an API: use gateway/jinja.h.
#ifndef DMOE_GATEWAY_JINJA_INTERNAL_H_
#define DMOE_GATEWAY_JINJA_INTERNAL_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gateway/jinja.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway::jinja::internal {

// ---- Strings: UTF-8, where a lone UTF-16 surrogate is a 3-byte (WTF-8) sequence.
// The code point at s[i] (i < s.size()) and its length in bytes.
uint32_t DecodeAt(std::string_view s, size_t i, size_t* len);
void AppendCp(uint32_t cp, std::string* out);
bool ValidUtf8(std::string_view s);             // strict: no surrogates, no overlongs
bool IsJsSpace(uint32_t cp);                    // JS `\s`
size_t SpaceLen(std::string_view s, size_t i);  // bytes of the JS whitespace at s[i], or 0
std::string_view TrimJs(std::string_view s, bool left, bool right);
// Appends as JS concatenation does: a high surrogate ending dst and a low one starting src join.
void AppendJs(std::string* dst, std::string_view src);
std::vector<uint16_t> ToUtf16(std::string_view s);
size_t Utf16Len(std::string_view s);
std::vector<std::string_view> CodePoints(std::string_view s);  // Array.from(s)
std::string CaseMap(std::string_view s, bool upper);           // toUpperCase / toLowerCase
bool IsWordByte(char c);                                       // JS `\w`
bool IsDigit(char c);

// ---- Numbers as JS prints and parses them.
std::string JsNumber(double x);  // Number.prototype.toString
std::string FloatStr(double x);  // @huggingface/jinja's FloatValue.toString ("3.0", "-0.0")
double ParseDigits(std::string_view digits);  // decimal digits with an optional '.', rounded
double JsToNumber(std::string_view s);        // Number(s)
double JsParseInt(std::string_view s);        // parseInt(s, 10)
double JsParseFloat(std::string_view s);      // parseFloat(s)

// "line L:C" of a byte offset in `source` (1-based; C counts code points).
std::string Where(std::string_view source, size_t offset);

// The current stack position, and how far below `base` it is (stacks grow down on our targets).
inline const char* StackPosition() { return static_cast<const char*>(__builtin_frame_address(0)); }
inline size_t StackUsed(const char* base) {
  const char* here = StackPosition();
  return here < base ? static_cast<size_t>(base - here) : 0;
}

// ---- Syntax tree.
enum class NK {
  kStr,
  kInt,
  kFloat,
  kArray,
  kTuple,
  kObject,
  kIdent,
  kMember,
  kSlice,
  kCall,
  kKwarg,
  kSpread,
  kKwSpread,
  kUnary,
  kBinary,
  kFilter,
  kTest,
  kSelect,
  kTernary,
  kIf,
  kFor,
  kSet,
  kMacro,
  kCallBlock,
  kFilterBlock,
  kBreak,
  kContinue,
  kComment
};

// One node; the meaning of `a` per kind: Member {object, property}; Slice {start, stop, step}
// (each may be null); Call {callee, args...}; Kwarg/Spread/KwSpread/Unary {value}; Binary {l, r};
// Filter {operand, Ident|Call}; Test {operand}; Select {lhs, test}; Ternary {cond, yes, no};
// If {test}; For {target, iterable}; Set {target, value or null}; Macro {params...};
// CallBlock {Call, caller params...}; FilterBlock {Ident|Call}; Object {k0, v0, k1, v1...}.
// Text outside tags is a kStr in a body.
struct Node {
  NK kind;
  size_t pos;       // byte offset in the original template
  std::string str;  // identifier, string value, operator, test/macro name
  double num = 0;
  bool flag = false;  // Member: computed (`[]`); Test: negated
  int special = 0;    // Macro/CallBlock: 1 = reads varargs, 2 = reads kwargs
  std::vector<std::unique_ptr<Node>> a, body, alt;
};
using NodeP = std::unique_ptr<Node>;

// Preprocesses, tokenizes and parses a template (valid UTF-8) as @huggingface/jinja does.
// INVALID_ARGUMENT "jinja: line L:C: ..." on a syntax error or an unsupported tag/filter/test.
absl::StatusOr<std::vector<NodeP>> ParseTemplate(std::string_view source);

// ---- Runtime values and the evaluator (runtime.ts): statements and expressions in jinja.cc;
// filters, tests, methods, JSON and globals in jinja_builtins.cc.
//
// Numbers are JS doubles; kInt and kFloat only differ in printing and in the tests and filters
// that look at the type. Arrays and objects are shared, so `==` compares them by identity as JS
// does; only namespaces are ever mutated.
enum class K : uint8_t {
  kUndef,
  kNull,
  kBool,
  kInt,
  kFloat,
  kStr,
  kArr,
  kTuple,
  kObj,
  kNs,
  kKw,
  kFn,
  kHole  // a JS `undefined` that is not an UndefinedValue ([]|first); an error to use
};

class Interp;
struct Env;
struct Object;
struct Value;
using EnvP = std::shared_ptr<Env>;
using Args = std::vector<Value>;
// A callable: positional arguments (a trailing kKw value carries keyword arguments), the
// caller's scope and the node to report errors at.
using NativeFn = std::function<absl::StatusOr<Value>(Interp&, Args&, const EnvP&, const Node&)>;

struct Value {
  K k = K::kUndef;
  double n = 0;  // kBool (0/1), kInt, kFloat
  std::shared_ptr<const std::string> s;
  std::shared_ptr<const std::vector<Value>> a;  // kArr, kTuple
  std::shared_ptr<Object> o;                    // kObj, kNs, kKw
  std::shared_ptr<const NativeFn> f;
  const std::string& str() const { return *s; }
};

// An insertion-ordered map (JS Map).
struct Object {
  std::vector<std::pair<std::string, Value>> items;
  std::unordered_map<std::string, size_t> index;  // kept once there are more than 8 items

  const Value* Find(std::string_view key) const {
    if (!index.empty()) {
      const auto it = index.find(std::string(key));
      return it == index.end() ? nullptr : &items[it->second].second;
    }
    for (const auto& [k, v] : items) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  void Set(const std::string& key, Value v) {
    if (const Value* p = Find(key)) {
      *const_cast<Value*>(p) = std::move(v);
      return;
    }
    items.emplace_back(key, std::move(v));
    if (!index.empty()) {
      index.emplace(key, items.size() - 1);
    } else if (items.size() > 8) {
      for (size_t i = 0; i < items.size(); ++i) index.emplace(items[i].first, i);
    }
  }
  void Erase(const std::string& key) {
    const auto it =
        std::find_if(items.begin(), items.end(), [&](const auto& kv) { return kv.first == key; });
    if (it == items.end()) return;
    items.erase(it);
    index.clear();
    if (items.size() > 8) {
      for (size_t i = 0; i < items.size(); ++i) index.emplace(items[i].first, i);
    }
  }
};

inline Value Make(K k, double n = 0) {
  Value v;
  v.k = k;
  v.n = n;
  return v;
}
inline Value Bool(bool b) { return Make(K::kBool, b ? 1 : 0); }
inline Value Int(double x) { return Make(K::kInt, x); }
inline Value Float(double x) { return Make(K::kFloat, x); }
inline Value Num(double x, bool is_float) { return Make(is_float ? K::kFloat : K::kInt, x); }
inline Value Str(std::string s) {
  Value v = Make(K::kStr);
  v.s = std::make_shared<const std::string>(std::move(s));
  return v;
}
inline Value Arr(std::vector<Value> items, bool tuple = false) {
  Value v = Make(tuple ? K::kTuple : K::kArr);
  v.a = std::make_shared<const std::vector<Value>>(std::move(items));
  return v;
}
inline Value Obj(Object o, K kind = K::kObj) {
  Value v = Make(kind);
  v.o = std::make_shared<Object>(std::move(o));
  return v;
}
inline Value Fn(NativeFn f) {
  Value v = Make(K::kFn);
  v.f = std::make_shared<const NativeFn>(std::move(f));
  return v;
}

inline bool IsArr(const Value& v) {
  return v.k == K::kArr || v.k == K::kTuple;
}  // instanceof ArrayValue
inline bool IsMap(const Value& v) {
  return v.k == K::kObj || v.k == K::kKw;
}  // instanceof ObjectValue
inline bool IsNum(const Value& v) { return v.k == K::kInt || v.k == K::kFloat; }
inline bool IsContainer(const Value& v) { return IsMap(v) || v.k == K::kNs; }

std::string TypeName(const Value& v);  // the JS class name, for messages
bool Truthy(const Value& v);           // __bool__()
bool TruthyRaw(const Value& v);        // JS truthiness of the raw `.value`
enum class JsType { kUndefined, kBoolean, kNumber, kString, kObject };
JsType TypeOf(const Value& v);
// `a.value === b.value` (same_value_zero: SameValueZero, as a JS Set compares).
bool StrictEq(const Value& a, const Value& b, bool same_value_zero = false);

struct JsonOpts {
  double indent = 0;  // 0 or NaN: no newlines
  bool ascii = false;
  std::optional<std::pair<std::string, std::string>> separators;
  bool sort_keys = false;
};

struct Env {
  EnvP parent;
  std::vector<std::pair<std::string, Value>> vars;

  Value* Find(std::string_view name) {
    for (auto& [k, v] : vars) {
      if (k == name) return &v;
    }
    return nullptr;
  }
  void Set(std::string_view name, Value v) {
    if (Value* p = Find(name)) {
      *p = std::move(v);
    } else {
      vars.emplace_back(std::string(name), std::move(v));
    }
  }
};

inline EnvP Child(const EnvP& parent) {
  auto e = std::make_shared<Env>();
  e->parent = parent;
  return e;
}

// One render of a template (Template::Render makes one per call; not thread-safe). It enforces
// the Limits and owns the namespaces created during the render.
class Interp {
 public:
  // `stack_base`: StackPosition() in the caller, the origin of Limits::max_stack_bytes.
  Interp(std::string_view source, const Limits& limits, const char* stack_base)
      : src_(source), lim_(limits), stack_base_(stack_base) {}
  // Namespaces are the only mutable values, so clearing them breaks every reference cycle.
  ~Interp();

  // Globals (true, none, range, raise_exception, ...) and context variables (JSON.parse values).
  void InstallGlobals(Env* g);
  absl::StatusOr<Value> FromJson(const nlohmann::ordered_json& j, int depth);

  // Renders statements into *out. A {% break %} / {% continue %} outside any loop leaves an error
  // with in_control_flow() true.
  absl::Status Exec(const std::vector<NodeP>& body, const EnvP& env, std::string* out);
  absl::StatusOr<Value> Eval(const Node& n, const EnvP& env, bool allow_hole = false);
  bool in_control_flow() const { return ctrl_ != Ctrl::kNone; }
  const Node* control_node() const { return ctrl_node_; }

  // INVALID_ARGUMENT "jinja: line L:C: msg" at the node.
  absl::Status Err(const Node& at, std::string_view msg) const;
  // Counts work against Limits::max_steps / bytes against the byte limits.
  absl::Status Step(int64_t n = 1);
  absl::Status Charge(size_t bytes);
  absl::Status CheckOutput(const std::string& out) const;  // Limits::max_output_bytes
  // RESOURCE_EXHAUSTED (at `at`) past Limits::max_depth or Limits::max_stack_bytes.
  absl::Status CheckDepth(int depth, const Node& at) const;
  absl::StatusOr<Value> Built(std::string s);  // Charge(s.size()), then Str(s)

  absl::StatusOr<std::string> Display(const Value& v, const Node& at);  // RuntimeValue.toString
  absl::StatusOr<std::string> RawStr(const Value& v, const Node& at);   // `.value.toString()`
  absl::Status ToJson(const Value& v, const JsonOpts& o, int depth, bool undef_null,
                      std::string* out, const Node& at);
  absl::StatusOr<bool> LooseEq(const Value& a, const Value& b, const Node& at);  // JS `==`

 private:
  enum class Ctrl { kNone, kBreak, kContinue };
  struct DepthGuard {  // JINJA_DEPTH_GUARD in jinja.cc
    explicit DepthGuard(int* d) : d_(d) { ++*d_; }
    ~DepthGuard() { --*d_; }
    int* d_;
  };
  absl::Status ExecOne(const Node& n, const EnvP& env, std::string* out);
  absl::Status ExecFor(const Node& n, const EnvP& env, std::string* out);
  absl::Status ExecSet(const Node& n, const EnvP& env);
  absl::Status Bind(const Node& target, const Value& v, Env* env);
  absl::Status BindParams(const std::string& display, const std::vector<NodeP>& params, size_t from,
                          int special, const Args& args, const EnvP& scope, const Node& at);
  absl::StatusOr<Value> EvalRaw(const Node& n, const EnvP& env);
  absl::StatusOr<std::pair<Args, Object>> EvalArgs(const std::vector<NodeP>& nodes, size_t from,
                                                   const EnvP& env);
  absl::StatusOr<Value> Lookup(const std::string& name, const EnvP& env);
  absl::StatusOr<Value> EvalMember(const Node& n, const EnvP& env);
  absl::StatusOr<Value> EvalSlice(const Value& obj, const Node& n, const EnvP& env);
  absl::StatusOr<Value> EvalBinary(const Node& n, const EnvP& env);
  absl::StatusOr<Value> EvalUnary(const Node& n, const EnvP& env);
  absl::StatusOr<Value> EvalCallBlock(const Node& n, const EnvP& env);
  absl::Status ToJsonContainer(const Value& v, const JsonOpts& o, int depth, bool undef_null,
                               std::string* out, const Node& at);  // arrays, objects, namespaces
  absl::StatusOr<Value> ApplyFilter(const Value& x, const Node& f, const EnvP& env);
  absl::StatusOr<Value> ArrayFilter(const Value& x, const std::string& name, const Node& f);
  absl::StatusOr<Value> StringFilter(const Value& x, const std::string& name, const Node& f);
  absl::StatusOr<Value> ApplyCallFilter(const Value& x, const Node& f, const EnvP& env);
  absl::StatusOr<JsonOpts> JsonOptions(const Object& kwargs, const Node& f) const;
  absl::StatusOr<Value> JoinFilter(const Value& x, const Node& f, const EnvP& env);
  absl::StatusOr<Value> ArrayCallFilter(const Value& x, const Node& f, const EnvP& env);
  absl::StatusOr<Value> SelectAttr(const std::vector<Value>& a, const Node& f);
  absl::StatusOr<Value> StringCallFilter(const Value& x, const Node& f, const EnvP& env);
  absl::StatusOr<bool> Test(const std::string& name, const Value& a, const Value* b,
                            const Node& at);
  Value Method(const Value& recv, std::string name);
  absl::StatusOr<Value> CallMethod(const Value& recv, const std::string& name, const Args& args,
                                   const Node& at);
  absl::StatusOr<Value> StrMethod(const std::string& s, const std::string& name, const Args& args,
                                  const Node& at);
  absl::StatusOr<Value> StrAffix(const std::string& s, const std::string& name, const Args& args,
                                 const Node& at) const;
  absl::StatusOr<Value> StrSplit(const std::string& s, const Args& args, const Node& at);
  absl::StatusOr<Value> StrReplace(const std::string& s, const Args& args, const Node& at);
  absl::StatusOr<Value> ObjMethod(const Value& recv, const std::string& name, const Args& args,
                                  const Node& at);
  absl::StatusOr<Value> Sort(const std::vector<Value>& items, bool reverse, bool case_sensitive,
                             const std::function<Value(const Value&)>& key, const Node& at);
  absl::StatusOr<int> Compare(const Value& a, const Value& b, bool case_sensitive, const Node& at);
  absl::StatusOr<Value> Namespace(Args& args, const Node& at);
  absl::StatusOr<Value> Range(const Args& args, const Node& at);

  std::string_view src_;
  Limits lim_;
  const char* stack_base_;
  int64_t steps_ = 0;
  size_t bytes_ = 0;
  int depth_ = 0;
  Ctrl ctrl_ = Ctrl::kNone;
  const Node* ctrl_node_ = nullptr;
  std::vector<std::shared_ptr<Object>> namespaces_;
};

}  // namespace dmoe::gateway::jinja::internal

#endif  // DMOE_GATEWAY_JINJA_INTERNAL_H_
