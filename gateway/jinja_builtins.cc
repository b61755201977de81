// Filters, tests, methods, JSON and the global functions of gateway/jinja.h: the rest of
// src/runtime.ts of @huggingface/jinja 0.5, function by function.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "gateway/jinja.h"
#include "gateway/jinja_internal.h"

namespace dmoe::gateway::jinja::internal {

using absl::Status;
using absl::StatusOr;

namespace {

bool SameObject(const Value& a, const Value& b) {
  if (IsArr(a) && IsArr(b)) return a.a == b.a;
  if (IsContainer(a) && IsContainer(b)) return a.o == b.o;
  return a.k == K::kFn && b.k == K::kFn && a.f == b.f;
}

int Utf16Compare(std::string_view a, std::string_view b) {
  const std::vector<uint16_t> x = ToUtf16(a), y = ToUtf16(b);
  return x < y ? -1 : y < x ? 1 : 0;
}

// Orders keys roughly as String.prototype.localeCompare does: punctuation, digits, letters
// case-insensitively, lowercase first.
bool LocaleLess(const std::string& a, const std::string& b) {
  const auto weight = [](std::string_view s) {
    std::vector<uint32_t> w;
    for (size_t i = 0, n; i < s.size(); i += n) {
      uint32_t cp = DecodeAt(s, i, &n);
      if (cp >= 'A' && cp <= 'Z') cp += 32;
      w.push_back(cp >= 0x80                                       ? 0x1000 + cp
                  : IsDigit(static_cast<char>(cp))                 ? 0x100 + cp
                  : IsWordByte(static_cast<char>(cp)) && cp != '_' ? 0x200 + cp
                                                                   : cp);
    }
    return w;
  };
  const auto wa = weight(a), wb = weight(b);
  if (wa != wb) return wa < wb;
  return a > b;
}

constexpr const char* kMonths[] = {"January",   "February", "March",    "April",
                                   "May",       "June",     "July",     "August",
                                   "September", "October",  "November", "December"};

// Array.prototype.join over raw values: null and undefined are empty.
StatusOr<std::string> JoinValues(Interp& in, const std::vector<Value>& items,
                                 const std::string& sep, const Node& at) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) AppendJs(&out, sep);
    if (items[i].k == K::kNull || items[i].k == K::kUndef) continue;
    ASSIGN_OR_RETURN(std::string e, in.RawStr(items[i], at));
    AppendJs(&out, e);
    RETURN_IF_ERROR(in.Charge(e.size() + sep.size()));
  }
  return out;
}

// getAttributeValue: "a.b.0" through objects, namespaces and arrays.
Value GetAttribute(const Value& item, const std::string& path) {
  Value v = item;
  size_t start = 0;
  for (;;) {
    const size_t dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? dot : dot - start);
    if (IsContainer(v)) {
      const Value* p = v.o->Find(part);
      v = p ? *p : Value();
    } else if (IsArr(v)) {
      const double i = JsParseInt(part);
      if (std::isnan(i) || i < 0 || i >= static_cast<double>(v.a->size())) return Value();
      v = (*v.a)[static_cast<size_t>(i)];
    } else {
      return Value();
    }
    if (dot == std::string::npos) return v;
    start = dot + 1;
  }
}

Value ItemsOf(const Object& o) {
  std::vector<Value> items;
  for (const auto& [k, v] : o.items) items.push_back(Arr({Str(k), v}));
  return Arr(std::move(items));
}

// A JSON string literal; with `ascii`, every code point from U+007F on as \uXXXX UTF-16 escapes.
std::string JsonString(std::string_view s, bool ascii) {
  std::string q = JsonQuote(s);
  if (!ascii) return q;
  std::string r;
  for (size_t i = 0, n; i < q.size(); i += n) {
    const uint32_t cp = DecodeAt(q, i, &n);
    if (cp < 0x7f) {
      r.push_back(q[i]);
      continue;
    }
    for (const uint16_t u : ToUtf16(q.substr(i, n))) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", u);
      r += buf;
    }
  }
  return r;
}

// str.title(): /\b\w/g, so ASCII words only.
std::string TitleCase(const std::string& s) {
  std::string r = s;
  for (size_t i = 0; i < r.size(); ++i) {
    if (IsWordByte(r[i]) && (i == 0 || !IsWordByte(s[i - 1])) && r[i] >= 'a' && r[i] <= 'z') {
      r[i] = static_cast<char>(r[i] - 32);
    }
  }
  return r;
}

// str.split() without a separator: runs of JS whitespace separate, leading ones are dropped; past
// `max` parts (unless it is -1) the rest of the text is the last part as it is.
std::vector<std::string> SplitOnSpace(const std::string& s, double max) {
  std::vector<std::string> parts;
  const std::string_view text = TrimJs(s, true, false);
  for (size_t i = 0; i < text.size();) {
    if (size_t n = SpaceLen(text, i)) {
      i += n;
      continue;
    }
    if (max != -1 && static_cast<double>(parts.size()) >= max) {
      parts.emplace_back(text.substr(i));
      break;
    }
    size_t j = i;
    while (j < text.size() && SpaceLen(text, j) == 0) {
      size_t n;
      DecodeAt(text, j, &n);
      j += n;
    }
    parts.emplace_back(text.substr(i, j - i));
    i = j;
  }
  return parts;
}

// str.split(d, max) for a non-empty `d`, as the library does it: split on every `d`, then join
// the parts past `max` back together (a negative `max` counts from the end, as splice does).
std::vector<std::string> SplitOn(const std::string& s, const std::string& d, double max) {
  std::vector<std::string> parts;
  for (size_t i = 0;;) {
    const size_t j = s.find(d, i);
    parts.push_back(s.substr(i, j == std::string::npos ? j : j - i));
    if (j == std::string::npos) break;
    i = j + d.size();
  }
  const double len = static_cast<double>(parts.size());
  if (max != -1 && len > max) {  // result.push(result.splice(maxsplit).join(sep))
    const auto from = static_cast<size_t>(max < 0 ? std::max(len + std::trunc(max), 0.0)
                                                  : std::min(std::trunc(max), len));
    std::string rest;
    for (size_t i = from; i < parts.size(); ++i) rest += (i > from ? d : "") + parts[i];
    parts.resize(from);
    parts.push_back(std::move(rest));
  }
  return parts;
}

// A filter's keyword argument, or `def`.
Value KwArg(const Object& kwargs, const char* key, Value def) {
  const Value* v = kwargs.Find(key);
  return v ? *v : def;
}

// A filter's argument: the i-th positional one, else the keyword one, else `def`.
Value FilterArg(const std::pair<Args, Object>& args, size_t i, const char* key, Value def) {
  if (i < args.first.size()) return args.first[i];
  return KwArg(args.second, key, std::move(def));
}

Status CannotApplyFilter(const Interp& in, const Node& f, const std::string& name, const Value& x) {
  return in.Err(f, absl::StrCat("Cannot apply filter \"", name, "\" to type: ", TypeName(x)));
}

std::string StrftimeNow(const std::string& format) {
  const std::time_t now = std::time(nullptr);
  std::tm t{};
  localtime_r(&now, &t);
  std::string out;
  const auto pad2 = [](int v) { return absl::StrCat(v < 10 ? "0" : "", v); };
  for (size_t i = 0; i < format.size(); ++i) {
    const char c = i + 1 < format.size() && format[i] == '%' ? format[i + 1] : '\0';
    switch (c) {
      case 'Y':
        out += std::to_string(t.tm_year + 1900);
        break;
      case 'm':
        out += pad2(t.tm_mon + 1);
        break;
      case 'd':
        out += pad2(t.tm_mday);
        break;
      case 'b':
        out += std::string(kMonths[t.tm_mon]).substr(0, 3);
        break;
      case 'B':
        out += kMonths[t.tm_mon];
        break;
      case 'H':
        out += pad2(t.tm_hour);
        break;
      case 'M':
        out += pad2(t.tm_min);
        break;
      case '%':
        out += '%';
        break;
      default:
        out += format[i];
        continue;
    }
    ++i;
  }
  return out;
}

}  // namespace

std::string TypeName(const Value& v) {
  static constexpr const char* kNames[] = {
      "UndefinedValue",        "NullValue",     "BooleanValue", "IntegerValue", "FloatValue",
      "StringValue",           "ArrayValue",    "TupleValue",   "ObjectValue",  "NamespaceValue",
      "KeywordArgumentsValue", "FunctionValue", "undefined"};
  return kNames[static_cast<int>(v.k)];
}

// __bool__().
bool Truthy(const Value& v) {
  switch (v.k) {
    case K::kBool:
    case K::kInt:
    case K::kFloat:
      return v.n != 0 && !std::isnan(v.n);
    case K::kStr:
      return !v.str().empty();
    case K::kArr:
    case K::kTuple:
      return !v.a->empty();
    case K::kObj:
    case K::kKw:
      return !v.o->items.empty();
    case K::kNs:
    case K::kFn:
      return true;
    default:
      return false;
  }
}

// JS truthiness of the raw `.value` (arrays and maps are objects, so always true).
bool TruthyRaw(const Value& v) { return IsArr(v) || IsContainer(v) || v.k == K::kFn || Truthy(v); }

JsType TypeOf(const Value& v) {
  switch (v.k) {
    case K::kUndef:
    case K::kHole:
    case K::kNull:  // a NullValue is built without an argument: its raw value is `undefined`
      return JsType::kUndefined;
    case K::kBool:
      return JsType::kBoolean;
    case K::kInt:
    case K::kFloat:
      return JsType::kNumber;
    case K::kStr:
      return JsType::kString;
    default:
      return JsType::kObject;
  }
}

// `a.value === b.value` (same_value_zero: SameValueZero, as a JS Set compares).
bool StrictEq(const Value& a, const Value& b, bool same_value_zero) {
  const JsType t = TypeOf(a);
  if (t != TypeOf(b)) return false;
  switch (t) {
    case JsType::kUndefined:
      return true;
    case JsType::kBoolean:
    case JsType::kNumber:
      return a.n == b.n || (same_value_zero && std::isnan(a.n) && std::isnan(b.n));
    case JsType::kString:
      return a.str() == b.str();
    default:
      return SameObject(a, b);
  }
}

// ---- Conversions to text.

StatusOr<std::string> Interp::Display(const Value& v, const Node& at) {  // RuntimeValue.toString
  switch (v.k) {
    case K::kUndef:
    case K::kNull:  // String(undefined): see TypeOf
      return std::string("undefined");
    case K::kBool:
      return std::string(v.n != 0 ? "true" : "false");
    case K::kInt:
      return JsNumber(v.n);
    case K::kFloat:
      return FloatStr(v.n);
    case K::kStr:
      return v.str();
    case K::kFn:
      return std::string("function");
    default: {
      std::string out;
      RETURN_IF_ERROR(ToJson(v, JsonOpts{}, 0, false, &out, at));
      return out;
    }
  }
}

// `x.value.toString()`: what `~` and string `+` concatenate.
StatusOr<std::string> Interp::RawStr(const Value& v, const Node& at) {
  switch (v.k) {
    case K::kInt:
    case K::kFloat:
      return JsNumber(v.n);
    case K::kArr:
    case K::kTuple: {  // Array.prototype.join(",") over the RuntimeValues
      std::string out;
      for (size_t i = 0; i < v.a->size(); ++i) {
        if (i > 0) out += ",";
        ASSIGN_OR_RETURN(std::string e, Display((*v.a)[i], at));
        AppendJs(&out, e);
      }
      return out;
    }
    case K::kObj:
    case K::kNs:
    case K::kKw:
      return std::string("[object Map]");
    default:
      return Display(v, at);
  }
}

// toJSON() of runtime.ts (JSON.stringify for scalars, its own layout for containers).
Status Interp::ToJson(const Value& v, const JsonOpts& o, int depth, bool undef_null,
                      std::string* out, const Node& at) {
  RETURN_IF_ERROR(CheckDepth(depth, at));
  RETURN_IF_ERROR(CheckOutput(*out));
  switch (v.k) {
    case K::kNull:
      *out += "null";
      return absl::OkStatus();
    case K::kUndef:
      *out += undef_null ? "null" : "undefined";
      return absl::OkStatus();
    case K::kInt:
    case K::kFloat:
      *out += std::isfinite(v.n) ? JsNumber(v.n) : "null";
      return absl::OkStatus();
    case K::kBool:
      *out += v.n != 0 ? "true" : "false";
      return absl::OkStatus();
    case K::kStr:
      *out += JsonString(v.str(), o.ascii);
      return absl::OkStatus();
    case K::kArr:
    case K::kObj:
    case K::kNs:
      return ToJsonContainer(v, o, depth, undef_null, out, at);
    default:
      return Err(at, absl::StrCat("Cannot convert to JSON: ", TypeName(v)));
  }
}

// The `[...]` / `{...}` layout of toJSON(): items on their own lines only with an indent.
Status Interp::ToJsonContainer(const Value& v, const JsonOpts& o, int depth, bool undef_null,
                               std::string* out, const Node& at) {
  std::string item_sep = ", ", key_sep = ": ";
  if (o.separators) {
    item_sep = o.separators->first;
    key_sep = o.separators->second;
  } else if (o.indent != 0 && !std::isnan(o.indent)) {
    item_sep = ",";
  }
  const bool indent = o.indent != 0 && !std::isnan(o.indent);
  if (indent && o.indent < 0) return Err(at, "tojson: Invalid count value (negative indent)");
  if (indent && o.indent * (depth + 1) > static_cast<double>(lim_.max_output_bytes)) {
    return absl::ResourceExhaustedError("jinja: tojson: the indentation exceeds the output limit");
  }
  const std::string unit = indent ? std::string(static_cast<size_t>(o.indent), ' ') : "";
  std::string base = "\n";
  for (int i = 0; i < depth; ++i) base += unit;
  const std::string child = base + unit;
  const bool array = v.k == K::kArr;
  const size_t count = array ? v.a->size() : v.o->items.size();
  *out += array ? "[" : "{";
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  if (!array && o.sort_keys) {
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
      return LocaleLess(v.o->items[x].first, v.o->items[y].first);
    });
  }
  for (size_t i = 0; i < count; ++i) {
    if (i > 0) *out += item_sep;
    if (indent) *out += child;
    if (array) {
      RETURN_IF_ERROR(ToJson((*v.a)[i], o, depth + 1, undef_null, out, at));
    } else {
      const auto& [key, val] = v.o->items[order[i]];
      *out += JsonString(key, o.ascii);
      *out += key_sep;
      RETURN_IF_ERROR(ToJson(val, o, depth + 1, undef_null, out, at));
    }
  }
  if (indent && count > 0) *out += base;
  *out += array ? "]" : "}";
  return absl::OkStatus();
}

// `a.value == b.value` in JS.
StatusOr<bool> Interp::LooseEq(const Value& a, const Value& b, const Node& at) {
  const JsType ta = TypeOf(a), tb = TypeOf(b);
  if (ta == tb) return StrictEq(a, b);
  if (ta == JsType::kUndefined || tb == JsType::kUndefined) return false;
  if (ta == JsType::kNumber && tb == JsType::kString) return a.n == JsToNumber(b.str());
  if (ta == JsType::kString && tb == JsType::kNumber) return JsToNumber(a.str()) == b.n;
  if (ta == JsType::kBoolean) return LooseEq(Int(a.n), b, at);
  if (tb == JsType::kBoolean) return LooseEq(a, Int(b.n), at);
  if (ta == JsType::kObject) {  // ToPrimitive: the array's join(",") or "[object Map]"
    ASSIGN_OR_RETURN(std::string p, RawStr(a, at));
    return LooseEq(Str(std::move(p)), b, at);
  }
  ASSIGN_OR_RETURN(std::string p, RawStr(b, at));
  return LooseEq(a, Str(std::move(p)), at);
}

// compareRuntimeValues.
StatusOr<int> Interp::Compare(const Value& a, const Value& b, bool case_sensitive, const Node& at) {
  const auto cmp_err = [&](const char* what) {
    return Err(at, absl::StrCat("Cannot compare ", what, TypeName(a), " with ", TypeName(b)));
  };
  if (a.k == K::kNull && b.k == K::kNull) return 0;
  if (a.k == K::kNull || b.k == K::kNull) return cmp_err("");
  if (a.k == K::kUndef && b.k == K::kUndef) return 0;
  if (a.k == K::kUndef || b.k == K::kUndef) return cmp_err("");
  const auto numlike = [](const Value& v) { return IsNum(v) || v.k == K::kBool; };
  if (numlike(a) && numlike(b)) return a.n < b.n ? -1 : a.n > b.n ? 1 : 0;
  if (a.k != b.k) return cmp_err("different types: ");
  if (a.k != K::kStr) return cmp_err("type: ");
  return case_sensitive ? Utf16Compare(a.str(), b.str())
                        : Utf16Compare(CaseMap(a.str(), false), CaseMap(b.str(), false));
}

StatusOr<Value> Interp::Sort(const std::vector<Value>& items, bool reverse, bool case_sensitive,
                             const std::function<Value(const Value&)>& key, const Node& at) {
  RETURN_IF_ERROR(Step(static_cast<int64_t>(items.size()) * 8));
  std::vector<Value> out = items;
  Status err;
  std::stable_sort(out.begin(), out.end(), [&](const Value& x, const Value& y) {
    if (!err.ok()) return false;
    StatusOr<int> c = Compare(key(x), key(y), case_sensitive, at);
    if (!c.ok()) {
      err = c.status();
      return false;
    }
    return reverse ? *c > 0 : *c < 0;
  });
  RETURN_IF_ERROR(err);
  return Arr(std::move(out));
}

// ---- Tests, filters and methods.

StatusOr<bool> Interp::Test(const std::string& name, const Value& a, const Value* b,
                            const Node& at) {
  if (name == "boolean") return a.k == K::kBool;
  if (name == "callable") return a.k == K::kFn;
  if (name == "odd" || name == "even") {
    if (a.k != K::kInt) return Err(at, absl::StrCat("cannot ", name, " on ", TypeName(a)));
    return (std::fmod(a.n, 2) != 0) == (name == "odd");
  }
  if (name == "false" || name == "true") return a.k == K::kBool && (a.n != 0) == (name == "true");
  if (name == "none") return a.k == K::kNull;
  if (name == "string") return a.k == K::kStr;
  if (name == "number") return IsNum(a);
  if (name == "integer") return a.k == K::kInt;
  if (name == "iterable") return a.k == K::kArr || a.k == K::kStr;  // not a TupleValue
  if (name == "mapping") return IsMap(a);
  if (name == "sequence") return IsArr(a) || IsMap(a) || a.k == K::kStr;
  if (name == "lower" || name == "upper") {
    return a.k == K::kStr && a.str() == CaseMap(a.str(), name == "upper");
  }
  if (name == "defined") return a.k != K::kUndef;
  if (name == "undefined") return a.k == K::kUndef;
  if (name == "equalto" || name == "eq") {
    if (b == nullptr) return Err(at, absl::StrCat("test '", name, "' needs a value to compare"));
    return StrictEq(a, *b);
  }
  return Err(at, absl::StrCat("Unknown test: ", name));
}

Value Interp::Method(const Value& recv, std::string name) {
  static constexpr std::string_view kStrMethods[] = {"upper",      "lower",  "strip",  "title",
                                                     "capitalize", "rstrip", "lstrip", "startswith",
                                                     "endswith",   "split",  "replace"};
  static constexpr std::string_view kObjMethods[] = {"get", "items", "keys", "values", "dictsort"};
  if (recv.k == K::kStr && name == "length") return Int(static_cast<double>(Utf16Len(recv.str())));
  const bool known =
      recv.k == K::kStr
          ? std::find(std::begin(kStrMethods), std::end(kStrMethods), name) != std::end(kStrMethods)
          : std::find(std::begin(kObjMethods), std::end(kObjMethods), name) !=
                std::end(kObjMethods);
  if (!known) return Value();
  return Fn([recv, name](Interp& in, Args& args, const EnvP&, const Node& at) {
    return in.CallMethod(recv, name, args, at);
  });
}

StatusOr<Value> Interp::CallMethod(const Value& recv, const std::string& name, const Args& args,
                                   const Node& at) {
  if (recv.k == K::kStr) return StrMethod(recv.str(), name, args, at);
  return ObjMethod(recv, name, args, at);
}

StatusOr<Value> Interp::StrMethod(const std::string& s, const std::string& name, const Args& args,
                                  const Node& at) {
  if (name == "length") return Int(static_cast<double>(Utf16Len(s)));
  if (name == "upper" || name == "lower") return Built(CaseMap(s, name == "upper"));
  if (name == "strip" || name == "lstrip" || name == "rstrip") {  // arguments are ignored
    return Str(std::string(TrimJs(s, name != "rstrip", name != "lstrip")));
  }
  if (name == "title") return Str(TitleCase(s));
  if (name == "capitalize") {  // charAt(0).toUpperCase() + slice(1): the rest is unchanged
    if (s.empty()) return Str(s);
    size_t n;
    if (DecodeAt(s, 0, &n) >= 0x10000) return Str(s);
    return Built(CaseMap(s.substr(0, n), true) + s.substr(n));
  }
  if (name == "startswith" || name == "endswith") return StrAffix(s, name, args, at);
  if (name == "split") return StrSplit(s, args, at);
  if (name == "replace") return StrReplace(s, args, at);
  return Err(at, absl::StrCat("Unknown StringValue method: ", name));
}

// startswith / endswith: a string, or a tuple of strings any of which may match.
StatusOr<Value> Interp::StrAffix(const std::string& s, const std::string& name, const Args& args,
                                 const Node& at) const {
  if (args.empty()) return Err(at, absl::StrCat(name, "() requires at least one argument"));
  const auto test = [&](const std::string& p) {
    return s.size() >= p.size() &&
           s.compare(name == "startswith" ? 0 : s.size() - p.size(), p.size(), p) == 0;
  };
  if (args[0].k == K::kStr) return Bool(test(args[0].str()));
  if (!IsArr(args[0])) {
    return Err(at, absl::StrCat(name, "() argument must be a string or tuple of strings"));
  }
  for (const Value& p : *args[0].a) {
    if (p.k != K::kStr) return Err(at, absl::StrCat(name, "() tuple elements must be strings"));
    if (test(p.str())) return Bool(true);
  }
  return Bool(false);
}

// Python's str.split(sep=None, maxsplit=-1).
StatusOr<Value> Interp::StrSplit(const std::string& s, const Args& args, const Node& at) {
  const Value sep = args.size() > 0 ? args[0] : Make(K::kNull);
  if (sep.k != K::kStr && sep.k != K::kNull)
    return Err(at, "sep argument must be a string or null");
  const Value maxv = args.size() > 1 ? args[1] : Int(-1);
  if (maxv.k != K::kInt) return Err(at, "maxsplit argument must be a number");
  std::vector<std::string> parts;
  if (sep.k == K::kNull) {
    parts = SplitOnSpace(s, maxv.n);
  } else {
    if (sep.str().empty()) return Err(at, "empty separator");
    parts = SplitOn(s, sep.str(), maxv.n);
  }
  RETURN_IF_ERROR(Step(static_cast<int64_t>(parts.size())));
  std::vector<Value> items;
  for (std::string& p : parts) items.push_back(Str(std::move(p)));
  return Arr(std::move(items));
}

// replace(old, new, count=null): `count` may come as a keyword argument (the filter's call).
StatusOr<Value> Interp::StrReplace(const std::string& s, const Args& args, const Node& at) {
  if (args.size() < 2) return Err(at, "replace() requires at least two arguments");
  if (args[0].k != K::kStr || args[1].k != K::kStr)
    return Err(at, "replace() arguments must be strings");
  Value count = Make(K::kNull);
  if (args.size() > 2) {
    if (args[2].k == K::kKw) {
      const Value* c = args[2].o->Find("count");
      if (c) count = *c;
    } else {
      count = args[2];
    }
  }
  if (count.k != K::kInt && count.k != K::kNull) {
    return Err(at, "replace() count argument must be a number or null");
  }
  if (count.k == K::kInt && count.n == 0) return Str(s);
  double left = count.k == K::kNull || count.n < 0 ? HUGE_VAL : count.n;
  const std::string &from = args[0].str(), &to = args[1].str();
  std::string out;
  if (from.empty()) {  // /(?=)/gu: before every code point and at the end
    for (size_t i = 0, n;; i += n) {
      if (left > 0) {
        out += to;
        --left;
      }
      if (i >= s.size()) break;
      DecodeAt(s, i, &n);
      out.append(s, i, n);
      RETURN_IF_ERROR(Charge(to.size()));
    }
  } else {
    size_t i = 0;
    for (size_t j; left > 0 && (j = s.find(from, i)) != std::string::npos; --left) {
      out.append(s, i, j - i);
      out += to;
      i = j + from.size();
      RETURN_IF_ERROR(Charge(to.size()));
    }
    out.append(s, i, std::string::npos);
  }
  return Built(std::move(out));
}

StatusOr<Value> Interp::ObjMethod(const Value& recv, const std::string& name, const Args& args,
                                  const Node& at) {
  const Object& o = *recv.o;
  if (name == "get") {
    if (args.empty() || args[0].k != K::kStr) {
      return Err(at, absl::StrCat("Object key must be a string: got ",
                                  args.empty() ? "undefined" : TypeName(args[0])));
    }
    if (const Value* v = o.Find(args[0].str())) return *v;
    return args.size() > 1 ? args[1] : Make(K::kNull);
  }
  RETURN_IF_ERROR(Step(static_cast<int64_t>(o.items.size())));
  if (name == "items") return ItemsOf(o);
  if (name == "keys" || name == "values") {
    std::vector<Value> items;
    for (const auto& [k, v] : o.items) items.push_back(name == "keys" ? Str(k) : v);
    return Arr(std::move(items));
  }
  // dictsort(case_sensitive=false, by='key', reverse=false)
  Args pos;
  Object kw;
  for (const Value& a : args) {
    if (a.k == K::kKw) {
      kw = *a.o;
    } else {
      pos.push_back(a);
    }
  }
  const auto param = [&](size_t i, const char* key, Value def) {
    if (i < pos.size()) return pos[i];
    const Value* v = kw.Find(key);
    return v ? *v : def;
  };
  const Value cs = param(0, "case_sensitive", Bool(false));
  if (cs.k != K::kBool) return Err(at, "case_sensitive must be a boolean");
  const Value by = param(1, "by", Str("key"));
  if (by.k != K::kStr) return Err(at, "by must be a string");
  if (by.str() != "key" && by.str() != "value")
    return Err(at, "by must be either 'key' or 'value'");
  const Value rev = param(2, "reverse", Bool(false));
  if (rev.k != K::kBool) return Err(at, "reverse must be a boolean");
  const size_t idx = by.str() == "key" ? 0 : 1;
  return Sort(
      *ItemsOf(o).a, rev.n != 0, cs.n != 0, [idx](const Value& item) { return (*item.a)[idx]; },
      at);
}

StatusOr<Value> Interp::ApplyFilter(const Value& x, const Node& f, const EnvP& env) {
  if (f.kind == NK::kCall) return ApplyCallFilter(x, f, env);
  const std::string& name = f.str;
  const auto unknown = [&](const char* type) {
    return Err(f, absl::StrCat("Unknown ", type, " filter: ", name));
  };
  if (name == "safe") return x;
  if (name == "tojson") {
    std::string out;
    RETURN_IF_ERROR(ToJson(x, JsonOpts{}, 0, true, &out, f));
    return Built(std::move(out));
  }
  if (IsArr(x)) return ArrayFilter(x, name, f);
  if (x.k == K::kStr) return StringFilter(x, name, f);
  if (IsNum(x)) {
    if (name == "abs") return Num(std::fabs(x.n), x.k == K::kFloat);
    if (name == "int") return Int(std::floor(x.n));
    if (name == "float") return Float(x.n);
    if (name == "string") return Str(x.k == K::kFloat ? FloatStr(x.n) : JsNumber(x.n));
    return unknown("NumericValue");
  }
  if (IsMap(x)) {
    if (name == "items") return ItemsOf(*x.o);
    if (name == "length") return Int(static_cast<double>(x.o->items.size()));
    const Value m = Method(x, name);
    if (m.k == K::kFn) return ObjMethod(x, name, {}, f);
    return unknown("ObjectValue");
  }
  if (x.k == K::kBool) {
    if (name == "bool") return x;
    if (name == "int") return Int(x.n);
    if (name == "float") return Float(x.n);
    if (name == "string") return Str(x.n != 0 ? "true" : "false");
    return unknown("BooleanValue");
  }
  return CannotApplyFilter(*this, f, name, x);
}

// `x | name` without arguments on an array or a tuple.
StatusOr<Value> Interp::ArrayFilter(const Value& x, const std::string& name, const Node& f) {
  const std::vector<Value>& a = *x.a;
  if (name == "list") return x;
  if (name == "first" || name == "last") {
    if (a.empty()) return Make(K::kHole);
    return name == "first" ? a.front() : a.back();
  }
  if (name == "length") return Int(static_cast<double>(a.size()));
  if (name == "reverse") return Arr(std::vector<Value>(a.rbegin(), a.rend()));
  if (name == "sort")
    return Sort(
        a, false, false, [](const Value& v) { return v; }, f);
  if (name == "join") {
    ASSIGN_OR_RETURN(std::string s, JoinValues(*this, a, "", f));
    return Str(std::move(s));
  }
  if (name == "string") {
    std::string out;
    RETURN_IF_ERROR(ToJson(x, JsonOpts{}, 0, false, &out, f));
    return Built(std::move(out));
  }
  if (name == "unique") {
    std::vector<Value> out;
    for (const Value& v : a) {
      RETURN_IF_ERROR(Step(static_cast<int64_t>(out.size())));
      if (std::none_of(out.begin(), out.end(),
                       [&](const Value& u) { return StrictEq(u, v, /*same_value_zero=*/true); })) {
        out.push_back(v);
      }
    }
    return Arr(std::move(out));
  }
  return Err(f, absl::StrCat("Unknown ArrayValue filter: ", name));
}

// `x | name` without arguments on a string.
StatusOr<Value> Interp::StringFilter(const Value& x, const std::string& name, const Node& f) {
  const std::string& s = x.str();
  if (name == "length" || name == "upper" || name == "lower" || name == "title" ||
      name == "capitalize") {
    return StrMethod(s, name, {}, f);
  }
  if (name == "trim") return Str(std::string(TrimJs(s, true, true)));
  if (name == "indent") {
    std::string out;
    for (size_t i = 0, line = 0;; ++line) {
      const size_t j = s.find('\n', i);
      const std::string_view l = std::string_view(s).substr(i, j == std::string::npos ? j : j - i);
      if (line > 0 && !l.empty()) out += "    ";
      out.append(l);
      if (j == std::string::npos) break;
      out += '\n';
      i = j + 1;
    }
    return Built(std::move(out));
  }
  if (name == "join" || name == "string") return x;
  if (name == "int") {
    const double v = JsParseInt(s);
    return Int(std::isnan(v) ? 0 : v);
  }
  if (name == "float") {
    const double v = JsParseFloat(s);
    return Float(std::isnan(v) ? 0 : v);
  }
  return Err(f, absl::StrCat("Unknown StringValue filter: ", name));
}

StatusOr<Value> Interp::ApplyCallFilter(const Value& x, const Node& f, const EnvP& env) {
  const std::string& name = f.a[0]->str;
  if (name == "tojson") {  // keyword arguments only
    ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
    ASSIGN_OR_RETURN(const JsonOpts o, JsonOptions(args.second, f));
    std::string out;
    RETURN_IF_ERROR(ToJson(x, o, 0, true, &out, f));
    return Built(std::move(out));
  }
  if (name == "join") return JoinFilter(x, f, env);
  if (name == "int" || name == "float") {
    ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
    const bool is_int = name == "int";
    const Value def = FilterArg(args, 0, "default", is_int ? Int(0) : Float(0));
    if (x.k == K::kStr) {
      const double v = is_int ? JsParseInt(x.str()) : JsParseFloat(x.str());
      return std::isnan(v) ? def : Num(v, !is_int);
    }
    if (IsNum(x)) return x;
    if (x.k == K::kBool) return Num(x.n, !is_int);
    return CannotApplyFilter(*this, f, name, x);
  }
  if (name == "default") {
    ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
    const Value def = args.first.empty() ? Str("") : args.first[0];
    const Value boolean = FilterArg(args, 1, "boolean", Bool(false));
    if (boolean.k != K::kBool) return Err(f, "`default` filter flag must be a boolean");
    return x.k == K::kUndef || (boolean.n != 0 && !Truthy(x)) ? def : x;
  }
  if (IsArr(x)) return ArrayCallFilter(x, f, env);
  if (x.k == K::kStr) return StringCallFilter(x, f, env);
  if (IsMap(x) && Method(x, name).k == K::kFn) {
    ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
    if (!args.second.items.empty()) args.first.push_back(Obj(std::move(args.second), K::kKw));
    return ObjMethod(x, name, args.first, f);
  }
  if (IsMap(x)) return Err(f, absl::StrCat("Unknown ObjectValue filter: ", name));
  return CannotApplyFilter(*this, f, name, x);
}

// tojson(indent=none, ensure_ascii=false, sort_keys=false, separators=none).
StatusOr<JsonOpts> Interp::JsonOptions(const Object& kwargs, const Node& f) const {
  JsonOpts o;
  const Value indent = KwArg(kwargs, "indent", Make(K::kNull));
  if (indent.k != K::kInt && indent.k != K::kNull) return Err(f, "If set, indent must be a number");
  o.indent = indent.k == K::kInt ? indent.n : 0;
  const Value ascii = KwArg(kwargs, "ensure_ascii", Bool(false));
  if (ascii.k != K::kBool) return Err(f, "If set, ensure_ascii must be a boolean");
  o.ascii = ascii.n != 0;
  const Value sort = KwArg(kwargs, "sort_keys", Bool(false));
  if (sort.k != K::kBool) return Err(f, "If set, sort_keys must be a boolean");
  o.sort_keys = sort.n != 0;
  const Value seps = KwArg(kwargs, "separators", Make(K::kNull));
  if (IsArr(seps)) {
    if (seps.a->size() != 2 || (*seps.a)[0].k != K::kStr || (*seps.a)[1].k != K::kStr) {
      return Err(f, "separators must be a tuple of two strings");
    }
    o.separators = std::make_pair((*seps.a)[0].str(), (*seps.a)[1].str());
  } else if (seps.k != K::kNull) {
    return Err(f, "If set, separators must be a tuple of two strings");
  }
  return o;
}

// join(separator=""): an array's items, or a string's code points.
StatusOr<Value> Interp::JoinFilter(const Value& x, const Node& f, const EnvP& env) {
  if (x.k != K::kStr && !IsArr(x)) return CannotApplyFilter(*this, f, f.a[0]->str, x);
  ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
  const Value sep = FilterArg(args, 0, "separator", Str(""));
  if (sep.k != K::kStr) return Err(f, "separator must be a string");
  if (IsArr(x)) {
    ASSIGN_OR_RETURN(std::string s, JoinValues(*this, *x.a, sep.str(), f));
    return Str(std::move(s));
  }
  std::string out;
  const std::vector<std::string_view> cps = CodePoints(x.str());
  for (size_t i = 0; i < cps.size(); ++i) {
    if (i > 0) out += sep.str();
    out.append(cps[i]);
    RETURN_IF_ERROR(Charge(cps[i].size() + sep.str().size()));
  }
  return Str(std::move(out));
}

// `x | name(...)` on an array or a tuple: sort, selectattr / rejectattr, map.
StatusOr<Value> Interp::ArrayCallFilter(const Value& x, const Node& f, const EnvP& env) {
  const std::string& name = f.a[0]->str;
  const std::vector<Value>& a = *x.a;
  if (name == "sort") {
    ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
    const Value rev = FilterArg(args, 0, "reverse", Bool(false));
    if (rev.k != K::kBool) return Err(f, "reverse must be a boolean");
    const Value cs = FilterArg(args, 1, "case_sensitive", Bool(false));
    if (cs.k != K::kBool) return Err(f, "case_sensitive must be a boolean");
    const Value attr = FilterArg(args, 2, "attribute", Make(K::kNull));
    if (attr.k != K::kStr && attr.k != K::kInt && attr.k != K::kNull) {
      return Err(f, "attribute must be a string, integer, or null");
    }
    const std::string path = attr.k == K::kInt   ? JsNumber(attr.n)
                             : attr.k == K::kStr ? attr.str()
                                                 : "";
    return Sort(
        a, rev.n != 0, cs.n != 0,
        [&](const Value& v) { return attr.k == K::kNull ? v : GetAttribute(v, path); }, f);
  }
  if (name == "selectattr" || name == "rejectattr") return SelectAttr(a, f);
  if (name == "map") {
    ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
    const Value* attr = args.second.Find("attribute");
    if (attr == nullptr) {
      return Err(f, "`map` expressions without `attribute` set are not currently supported.");
    }
    if (attr->k != K::kStr) return Err(f, "attribute must be a string");
    const Value* def = args.second.Find("default");
    std::vector<Value> out;
    for (const Value& item : a) {
      RETURN_IF_ERROR(Step());
      if (!IsContainer(item)) return Err(f, "items in map must be an object");
      Value v = GetAttribute(item, attr->str());
      out.push_back(v.k == K::kUndef && def ? *def : v);
    }
    return Arr(std::move(out));
  }
  return Err(f, absl::StrCat("Unknown ArrayValue filter: ", name));
}

// selectattr / rejectattr(attribute, test?, value?): the arguments are string literals, taken as
// written rather than evaluated.
StatusOr<Value> Interp::SelectAttr(const std::vector<Value>& a, const Node& f) {
  const std::string& name = f.a[0]->str;
  if (!std::all_of(a.begin(), a.end(), IsContainer)) {
    return Err(f, absl::StrCat("`", name, "` can only be applied to array of objects"));
  }
  std::vector<Value> vals;
  for (size_t i = 1; i < f.a.size(); ++i) {
    if (f.a[i]->kind != NK::kStr)
      return Err(f, absl::StrCat("arguments of `", name, "` must be strings"));
    vals.push_back(Str(f.a[i]->str));
  }
  std::vector<Value> out;
  for (const Value& item : a) {
    RETURN_IF_ERROR(Step());
    const Value* v = vals.empty() ? nullptr : item.o->Find(vals[0].str());
    bool r = false;
    if (v != nullptr && vals.size() > 1) {
      ASSIGN_OR_RETURN(r, Test(vals[1].str(), *v, vals.size() > 2 ? &vals[2] : nullptr, f));
    } else if (v != nullptr) {
      r = Truthy(*v);
    }
    if (r == (name == "selectattr")) out.push_back(item);
  }
  return Arr(std::move(out));
}

// `x | name(...)` on a string: indent, replace.
StatusOr<Value> Interp::StringCallFilter(const Value& x, const Node& f, const EnvP& env) {
  const std::string& name = f.a[0]->str;
  ASSIGN_OR_RETURN(auto args, EvalArgs(f.a, 1, env));
  if (name == "indent") {
    const Value width = FilterArg(args, 0, "width", Int(4));
    if (width.k != K::kInt) return Err(f, "width must be a number");
    if (width.n < 0 || width.n > static_cast<double>(lim_.max_output_bytes)) {
      return Err(f, "indent: Invalid count value");
    }
    const bool first = TruthyRaw(FilterArg(args, 1, "first", Bool(false)));
    const bool blank = TruthyRaw(FilterArg(args, 2, "blank", Bool(false)));
    const std::string pad(static_cast<size_t>(width.n), ' ');
    const std::string& s = x.str();
    std::string out;
    for (size_t i = 0, line = 0;; ++line) {
      const size_t j = s.find('\n', i);
      const std::string_view l = std::string_view(s).substr(i, j == std::string::npos ? j : j - i);
      if ((first || line > 0) && (blank || !l.empty())) out += pad;
      out.append(l);
      RETURN_IF_ERROR(Charge(pad.size() + l.size()));
      if (j == std::string::npos) break;
      out += '\n';
      i = j + 1;
    }
    return Str(std::move(out));
  }
  if (name == "replace") {
    args.first.push_back(Obj(std::move(args.second), K::kKw));
    return StrMethod(x.str(), "replace", args.first, f);
  }
  return Err(f, absl::StrCat("Unknown StringValue filter: ", name));
}

// ---- Globals: namespace(), range(), raise_exception(), strftime_now().

StatusOr<Value> Interp::Namespace(Args& args, const Node& at) {
  Args pos = args;
  Object entries;
  std::optional<Object> kw;
  if (!pos.empty() && pos.back().k == K::kKw) {
    kw = *pos.back().o;
    pos.pop_back();
  }
  if (pos.size() > 1) {
    return Err(at, absl::StrCat("namespace expected at most 1 argument, got ", pos.size()));
  }
  if (pos.size() == 1) {
    const Value& src = pos[0];
    if (IsMap(src)) {
      for (const auto& [k, v] : src.o->items) entries.Set(k, v);
    } else if (IsArr(src)) {
      for (const Value& pair : *src.a) {
        std::vector<Value> kv;
        if (IsArr(pair)) kv = *pair.a;
        if (pair.k == K::kStr) {
          for (std::string_view c : CodePoints(pair.str())) kv.push_back(Str(std::string(c)));
        }
        if (kv.size() != 2) {
          return Err(at, "namespace expected an object or an iterable of [key, value] pairs");
        }
        if (kv[0].k != K::kStr) return Err(at, "namespace keys must be strings");
        entries.Set(kv[0].str(), kv[1]);
      }
    } else {
      return Err(at, absl::StrCat("'", TypeName(src), "' object is not iterable"));
    }
  }
  if (kw) {
    for (const auto& [k, v] : kw->items) entries.Set(k, v);
  }
  Value ns = Obj(std::move(entries), K::kNs);
  namespaces_.push_back(ns.o);
  return ns;
}

// range(start, stop?, step=1) over the arguments' raw JS values.
StatusOr<Value> Interp::Range(const Args& args, const Node& at) {
  const auto raw = [&](size_t i) -> std::optional<double> {
    if (i >= args.size() || TypeOf(args[i]) == JsType::kUndefined) return std::nullopt;
    const Value& v = args[i];
    if (IsNum(v) || v.k == K::kBool) return v.n;
    if (v.k == K::kStr) return JsToNumber(v.str());
    return std::nan("");
  };
  std::optional<double> start = raw(0), stop = raw(1);
  const double step = raw(2).value_or(1);
  if (!stop) {
    stop = start;
    start = 0.0;
  }
  if (step == 0) return Err(at, "range() step must not be zero");
  const double a = start.value_or(std::nan("")), b = stop.value_or(std::nan(""));
  std::vector<Value> items;
  for (double i = a; step > 0 ? i < b : i > b; i += step) {
    RETURN_IF_ERROR(Step());
    items.push_back(Num(i, std::trunc(i) != i));
  }
  return Arr(std::move(items));
}

void Interp::InstallGlobals(Env* g) {
  g->Set("false", Bool(false));
  g->Set("true", Bool(true));
  g->Set("none", Make(K::kNull));
  g->Set("raise_exception",
         Fn([](Interp& in, Args& args, const EnvP&, const Node& at) -> StatusOr<Value> {
           // new Error(message): the template's own message, without position.
           if (args.empty() || TypeOf(args[0]) == JsType::kUndefined) {
             return absl::InvalidArgumentError("");
           }
           ASSIGN_OR_RETURN(std::string msg, in.RawStr(args[0], at));
           return absl::InvalidArgumentError(msg);
         }));
  g->Set("range", Fn([](Interp& in, Args& args, const EnvP&, const Node& at) {
           return in.Range(args, at);
         }));
  g->Set("strftime_now",
         Fn([](Interp& in, Args& args, const EnvP&, const Node& at) -> StatusOr<Value> {
           if (args.empty() || args[0].k != K::kStr)
             return in.Err(at, "strftime_now needs a format string");
           return Str(StrftimeNow(args[0].str()));
         }));
  g->Set("True", Bool(true));
  g->Set("False", Bool(false));
  g->Set("None", Make(K::kNull));
}

// convertToRuntimeValues after JSON.parse: integral numbers are integers, and objects list
// integer-like keys first in ascending order, as JS objects do.
StatusOr<Value> Interp::FromJson(const nlohmann::ordered_json& j, int depth) {
  using J = nlohmann::ordered_json;
  if (depth > lim_.max_depth || StackUsed(stack_base_) > lim_.max_stack_bytes) {
    return absl::InvalidArgumentError("jinja: the context nests too deeply");
  }
  switch (j.type()) {
    case J::value_t::boolean:
      return Bool(j.get<bool>());
    case J::value_t::number_integer:
      return Int(static_cast<double>(j.get<int64_t>()));
    case J::value_t::number_unsigned:
      return Int(static_cast<double>(j.get<uint64_t>()));
    case J::value_t::number_float: {
      const double d = j.get<double>();
      return Num(d, !(std::isfinite(d) && std::trunc(d) == d));
    }
    case J::value_t::string:
      return Str(j.get<std::string>());
    case J::value_t::array: {
      RETURN_IF_ERROR(Step(static_cast<int64_t>(j.size())));
      std::vector<Value> items;
      for (const J& e : j) {
        ASSIGN_OR_RETURN(Value v, FromJson(e, depth + 1));
        items.push_back(std::move(v));
      }
      return Arr(std::move(items));
    }
    case J::value_t::object: {
      RETURN_IF_ERROR(Step(static_cast<int64_t>(j.size())));
      const auto index_key = [](const std::string& k) -> std::optional<uint64_t> {
        if (k.empty() || k.size() > 10 || (k.size() > 1 && k[0] == '0') ||
            !std::all_of(k.begin(), k.end(), [](char c) { return IsDigit(c); })) {
          return std::nullopt;
        }
        const uint64_t v = std::stoull(k);
        if (v >= 4294967295ull) return std::nullopt;
        return v;
      };
      std::vector<std::pair<uint64_t, const std::string*>> numeric;
      for (const auto& [k, v] : j.items()) {
        if (auto i = index_key(k)) numeric.emplace_back(*i, &k);
      }
      std::sort(numeric.begin(), numeric.end());
      Object o;
      for (const auto& [i, k] : numeric) {
        ASSIGN_OR_RETURN(Value v, FromJson(j.at(*k), depth + 1));
        o.Set(*k, std::move(v));
      }
      for (const auto& [k, v] : j.items()) {
        if (index_key(k)) continue;
        ASSIGN_OR_RETURN(Value val, FromJson(v, depth + 1));
        o.Set(k, std::move(val));
      }
      return Obj(std::move(o));
    }
    default:
      return Make(K::kNull);
  }
}

}  // namespace dmoe::gateway::jinja::internal
