// A Jinja interpreter for chat templates (tokenizer_config.json's `chat_template`) that renders
// exactly like Hugging Face's `@huggingface/jinja` 0.5 (the JS renderer of transformers.js), quirks
// included: its lexer options (trim_blocks, lstrip_blocks, one trailing newline dropped, the
// `{% generation %}` tag removed), JS number formatting and loose `==`, its filter/test/method
// set, its JSON (tojson) output and its errors (e.g. `'a' ~ undefined` is an error there, as is
// `'a' < 'b'`). Reference: .cache/npm/node_modules/@huggingface/jinja/src
// (scripts/fetch_tokenizer.sh).
//
// Supported: {{ }}, {% %}, {# #}, `-` whitespace control; if/elif/else, for (tuple targets,
// `if` filter, else, loop.*, break/continue), set (block set, tuple, `ns.x =` on namespace()),
// macro (defaults, varargs/kwargs), call blocks (caller), filter blocks; all operators,
// slices, literals, string/dict methods, the filters and tests @huggingface/jinja has, and the
// globals namespace, range, raise_exception, strftime_now, true/false/none (also True/False/None).
// A tag, filter or test that @huggingface/jinja lacks (include, extends, raw, `round`,
// `divisibleby`...) fails at parse time naming it.
//
// Strings are UTF-8. Lengths and integer indexes count UTF-16 code units and slices count code
// points, as in JS; a lone surrogate (indexing into an astral character) is kept WTF-8 encoded.
// Known gaps against the JS engine: an unknown filter/test in a branch that never runs fails here
// at parse time (the JS fails only if it runs); nesting past Limits (about 100 levels of macro
// recursion) fails where the JS would go on; upper/lower use the simple Unicode case mapping
// (plus ß) without JS's context-dependent rules (final sigma); tojson(sort_keys=true)
// approximates `localeCompare` (case-insensitive, lowercase first); a function converted to a
// string prints "function" instead of its JS source; error messages are worded differently.
//
// Errors are absl::Status, never exceptions: INVALID_ARGUMENT "jinja: line L:C: ..." for syntax
// and runtime errors (L:C in the original template, 1-based, C counting code points),
// INVALID_ARGUMENT with exactly the message for raise_exception(message), RESOURCE_EXHAUSTED when
// a render exceeds its Limits.
#ifndef DMOE_GATEWAY_JINJA_H_
#define DMOE_GATEWAY_JINJA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway::jinja {

// Bounds on one render, so that a hostile template cannot hang, exhaust memory or overflow the
// stack. A realistic chat template with a long conversation stays far below them.
struct Limits {
  size_t max_output_bytes = size_t{64} << 20;  // the rendered text and any single string
  size_t max_total_bytes = size_t{512} << 20;  // all strings built during the render, summed
  int64_t max_steps = 20'000'000;              // evaluated nodes + loop iterations + elements made
  int max_depth = 500;                         // nested evaluation incl. macro calls, JSON nesting
  // Stack a render may use below Render()'s own frame (measured, so it holds whatever the frame
  // sizes); the calling thread needs this much plus ~64 KiB. Parse() uses at most the default.
  size_t max_stack_bytes = size_t{256} << 10;
};

struct Program;

// A parsed template. Immutable; Render may be called from several threads at once.
class Template {
 public:
  // INVALID_ARGUMENT "jinja: line L:C: ..." for a syntax error or an unsupported construct, or for
  // source that is not valid UTF-8.
  static absl::StatusOr<Template> Parse(std::string_view source);

  // Renders with each member of `context` (a JSON object) as a global variable, as
  // `new Template(source).render(context)` does in JS (integral JSON numbers become integers,
  // object members keep their order, except that integer-like keys come first as in JS objects).
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context,
                                     const Limits& limits = Limits()) const;

 private:
  explicit Template(std::shared_ptr<const Program> program) : program_(std::move(program)) {}
  std::shared_ptr<const Program> program_;
};

// JSON.stringify of a string: `"` and `\` escaped, \b \f \n \r \t, other controls as \u00xx, lone
// surrogates (WTF-8) as \udxxx, everything else (non-ASCII included) verbatim.
std::string JsonQuote(std::string_view utf8);

}  // namespace dmoe::gateway::jinja

#endif  // DMOE_GATEWAY_JINJA_H_
