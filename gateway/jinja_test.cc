#include "gateway/jinja.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway::jinja {
namespace {

// Expected strings below are worked out by hand from Jinja's semantics as @huggingface/jinja
// implements them (its source is the reference; tests/tokenizer/compare_chat_template.sh compares
// against it mechanically).

absl::StatusOr<std::string> Try(const std::string& tmpl, const std::string& context = "{}",
                                const Limits& limits = Limits()) {
  absl::StatusOr<Template> t = Template::Parse(tmpl);
  if (!t.ok()) return t.status();
  return t->Render(nlohmann::ordered_json::parse(context), limits);
}

std::string R(const std::string& tmpl, const std::string& context = "{}") {
  absl::StatusOr<std::string> r = Try(tmpl, context);
  EXPECT_TRUE(r.ok()) << tmpl << " -> " << r.status();
  return r.ok() ? *r : "<error>";
}

absl::Status E(const std::string& tmpl, const std::string& context = "{}") {
  absl::StatusOr<std::string> r = Try(tmpl, context);
  EXPECT_FALSE(r.ok()) << tmpl << " rendered " << (r.ok() ? *r : "");
  return r.status();
}

TEST(JinjaWhitespace, TextAndTrailingNewline) {
  EXPECT_EQ(R("plain text"), "plain text");
  EXPECT_EQ(R("x\n"), "x");  // one trailing newline is dropped
  EXPECT_EQ(R("x\n\n"), "x\n");
  EXPECT_EQ(R("{{ 'a' }}\n{{ 'b' }}"), "a\nb");  // expressions keep their newline
}

TEST(JinjaWhitespace, TrimAndLstripBlocks) {
  // trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation before it goes.
  EXPECT_EQ(R("{% if true %}\nyes\n{% endif %}\nend"), "yes\nend");
  EXPECT_EQ(R("  {% if true %}\n  yes\n  {% endif %}\nend"), "  yes\nend");
  EXPECT_EQ(R("a {% if true %}b{% endif %}"), "a b");  // not at line start: kept
  EXPECT_EQ(R("{# note #}\nx"), "x");
}

TEST(JinjaWhitespace, DashControl) {
  EXPECT_EQ(R("a  {%- if true -%}  b  {%- endif -%}  c"), "abc");
  EXPECT_EQ(R("a \n {{- 'b' -}} \n c"), "abc");
  EXPECT_EQ(R("a {#- gone -#} b"), "ab");
  EXPECT_EQ(R("a\u3000{{- 'b' }}"), "ab");  // JS \s includes U+3000
}

TEST(JinjaLiterals, Printing) {
  EXPECT_EQ(R("{{ 42 }}|{{ -7 }}|{{ 2.5 }}|{{ 3.0 }}|{{ 10 / 4 }}|{{ 10 / 5 }}"),
            "42|-7|2.5|3.0|2.5|2.0");
  EXPECT_EQ(R("{{ true }}|{{ false }}|{{ none }}|{{ True }}|{{ None }}|"), "true|false||true||");
  EXPECT_EQ(R("{{ [1, 'a', 2.0, none, true] }}"), "[1, \"a\", 2, null, true]");
  EXPECT_EQ(R("{{ {'b': 1, 'a': [2]} }}"), "{\"b\": 1, \"a\": [2]}");
  EXPECT_EQ(R("{{ 'it\\'s' }}|{{ \"tab\\there\" }}|{{ 'x\\u00e9' }}|{{ 'a' 'b' }}"),
            "it's|tab\there|xé|ab");
  EXPECT_EQ(R("{{ undefined_variable }}"), "");
}

TEST(JinjaLiterals, JsonNumbersFromTheContext) {
  // JSON.parse: 1.0 is the integer 1; 1e21 prints in exponent form.
  EXPECT_EQ(R("{{ a }}|{{ b }}|{{ c }}|{{ d }}", R"({"a": 1.0, "b": 0.5, "c": 1e21, "d": 1e-7})"),
            "1|0.5|1e+21|1e-7");
}

TEST(JinjaOperators, Arithmetic) {
  EXPECT_EQ(R("{{ 1 + 2 * 3 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ 7 % 3 }}|{{ 2 ** 10 }}|{{ 1.5 + 1 }}"),
            "7|3|-4|1|1024|2.5");
  EXPECT_EQ(R("{{ 2 ** -1 }}|{{ -3 }}|{{ -(2) }}"), "0.5|-3|-2");
}

TEST(JinjaOperators, StringsAndConcatenation) {
  EXPECT_EQ(R("{{ 'a' + 'b' }}|{{ 'n' + 1 }}|{{ 'x' ~ 2 ~ true }}"), "ab|n1|x2true");
  EXPECT_FALSE(E("{{ 'a' ~ missing }}").ok());  // undefined operands are an error there
  EXPECT_FALSE(E("{{ 'a' + none }}").ok());
}

TEST(JinjaOperators, ComparisonsAndLogic) {
  EXPECT_EQ(R("{{ 1 < 2 }}|{{ 2 >= 3 }}|{{ 'a' == 'a' }}|{{ 1 != 1 }}|{{ 1 == '1' }}"),
            "true|false|true|false|true");  // `==` is JS loose equality
  EXPECT_EQ(R("{{ 0 or 'x' }}|{{ 1 and 'y' }}|{{ '' and 'z' }}|{{ not [] }}"), "x|y||true");
  EXPECT_EQ(R("{{ 2 in [1, 2] }}|{{ 'b' in 'abc' }}|{{ 'k' in {'k': 1} }}|{{ 3 not in [1] }}"),
            "true|true|true|true");
  EXPECT_EQ(R("{{ 'a' in missing }}"), "false");
}

TEST(JinjaAccess, MembersIndexesAndSlices) {
  const std::string ctx = R"({"m": {"role": "user", "n": [10, 20, 30]}, "s": "héllo"})";
  EXPECT_EQ(R("{{ m.role }}|{{ m['role'] }}|{{ m.n[1] }}|{{ m.n[-1] }}|{{ m.missing }}", ctx),
            "user|user|20|30|");
  EXPECT_EQ(R("{{ m.n[::-1] }}|{{ m.n[1:] }}|{{ m.n[:-1] }}|{{ s[1:3] }}|{{ s[::-1] }}", ctx),
            "[30, 20, 10]|[20, 30]|[10, 20]|él|olléh");
  EXPECT_EQ(R("{{ m.missing.deeper }}", ctx), "");
}

TEST(JinjaControl, IfElifElse) {
  const std::string t = "{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %}";
  EXPECT_EQ(R(t, R"({"x": 1})"), "one");
  EXPECT_EQ(R(t, R"({"x": 2})"), "two");
  EXPECT_EQ(R(t, R"({"x": 5})"), "many");
}

TEST(JinjaControl, ForLoopVariables) {
  EXPECT_EQ(R("{% for x in ['a', 'b', 'c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}"
              "{{ x }}{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %}"
              "{{ loop.length }};{% endfor %}"),
            "103aF3;212b3;321cL3;");
  EXPECT_EQ(R("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(R("{% for x in [1, 2, 3, 4] if x is even %}{{ x }}/{{ loop.length }} {% endfor %}"),
            "2/2 4/2 ");
}

TEST(JinjaControl, TupleUnpackingOverItems) {
  EXPECT_EQ(
      R("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}", R"({"d": {"b": 1, "a": 2}})"),
      "b=1,a=2,");
  // As in JS objects, integer-like keys come first, in ascending order.
  EXPECT_EQ(R("{% for k in d %}{{ k }}{% endfor %}", R"({"d": {"b": 1, "10": 2, "2": 3}})"),
            "210b");
}

TEST(JinjaControl, BreakAndContinue) {
  // The iteration that breaks or continues loses what it rendered (as in @huggingface/jinja).
  EXPECT_EQ(R("{% for x in [1, 2, 3, 4] %}<{{ x }}{% if x == 2 %}{% continue %}{% endif %}"
              "{% if x == 3 %}{% break %}{% endif %}>{% endfor %}"),
            "<1>");
}

TEST(JinjaControl, ScopesAndNamespace) {
  EXPECT_EQ(R("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}"), "21");
  EXPECT_EQ(
      R("{% set ns = namespace(n=0, s='') %}{% for i in [1, 2, 3] %}"
        "{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.n }} {{ ns.s }}"),
      "6 123");
  EXPECT_EQ(R("{% set a, b = [1, 2] %}{{ b }}{{ a }}"), "21");
  EXPECT_EQ(R("{% set block %}x{{ 1 + 1 }}{% endset %}[{{ block }}]"), "[x2]");
  EXPECT_FALSE(E("{% set d = {} %}{% set d.x = 1 %}").ok());  // only namespaces take attributes
}

TEST(JinjaMacros, DefaultsKeywordsAndCaller) {
  EXPECT_EQ(R("{% macro tag(name, cls='c', close=true) %}<{{ name }} {{ cls }}>"
              "{% if close %}</{{ name }}>{% endif %}{% endmacro %}"
              "{{ tag('a') }}|{{ tag('b', 'x') }}|{{ tag('i', close=false) }}"),
            "<a c></a>|<b x></b>|<i c>");
  EXPECT_EQ(R("{% macro wrap() %}[{{ caller() }}]{% endmacro %}{% call wrap() %}in{% endcall %}"),
            "[in]");
  EXPECT_EQ(R("{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
              "{{ f(3) }}"),
            "321");
  EXPECT_FALSE(E("{% macro f(a) %}{% endmacro %}{{ f(1, 2) }}").ok());
}

TEST(JinjaFilters, Strings) {
  EXPECT_EQ(R("{{ '  hi  '|trim }}|{{ 'Hi'|upper }}|{{ 'Hi'|lower }}|{{ 'hello big-world'|title }}"
              "|{{ 'hello World'|capitalize }}|{{ 'abc'|length }}"),
            "hi|HI|hi|Hello Big-World|Hello World|3");
  EXPECT_EQ(R("{{ 'a-b-c'|replace('-', '+') }}|{{ '42'|int + 1 }}|{{ 'x'|int }}|{{ '2.5'|float }}"),
            "a+b+c|43|0|2.5");
  EXPECT_EQ(R("{{ 'a\nb'|indent(2) }}"), "a\n  b");
  EXPECT_EQ(R("{{ '🚀'|length }}"), "2");  // UTF-16 code units, as JS counts
}

TEST(JinjaFilters, Lists) {
  EXPECT_EQ(R("{{ [3, 1, 2]|first }}{{ [3, 1, 2]|last }}{{ [3, 1, 2]|length }}"
              "|{{ [3, 1, 2]|sort }}|{{ [3, 1, 2]|reverse }}|{{ [1, 1, 2]|unique }}"),
            "323|[1, 2, 3]|[2, 1, 3]|[1, 2]");
  EXPECT_EQ(R("{{ ['a', 'b']|join }}|{{ ['a', 'b']|join(', ') }}|{{ [1, 2]|list }}"),
            "ab|a, b|[1, 2]");
  const std::string users =
      R"({"u": [{"name": "ann", "admin": true}, {"name": "bob"}, {"name": "cy", "admin": false}]})";
  EXPECT_EQ(R("{{ u|selectattr('admin')|map(attribute='name')|join(',') }}", users), "ann");
  EXPECT_EQ(R("{{ u|rejectattr('admin')|map(attribute='name')|join(',') }}", users), "bob,cy");
  EXPECT_EQ(R("{{ u|selectattr('name', 'equalto', 'bob')|list|length }}", users), "1");
  EXPECT_EQ(R("{{ u|map(attribute='admin', default='?')|list }}", users), "[true, \"?\", false]");
}

TEST(JinjaFilters, DefaultAndNumbers) {
  EXPECT_EQ(R("{{ missing|default('d') }}|{{ ''|default('d') }}|{{ ''|default('d', true) }}"),
            "d||d");
  EXPECT_EQ(R("{{ -3|abs }}|{{ 3.7|int }}|{{ 2|float }}|{{ 2|string }}"), "3|3|2.0|2");
}

TEST(JinjaFilters, Mappings) {
  const std::string ctx = R"({"d": {"b": 2, "a": 1}})";
  EXPECT_EQ(R("{{ d|items }}|{{ d|length }}|{{ d|dictsort }}", ctx),
            "[[\"b\", 2], [\"a\", 1]]|2|[[\"a\", 1], [\"b\", 2]]");
}

TEST(JinjaFilters, ToJson) {
  const std::string ctx = R"({"x": {"name": "é \"q\"", "n": [1, 2.5], "e": {}, "z": null}})";
  EXPECT_EQ(R("{{ x|tojson }}", ctx),
            "{\"name\": \"é \\\"q\\\"\", \"n\": [1, 2.5], \"e\": {}, \"z\": null}");
  EXPECT_EQ(R("{{ x|tojson(indent=2) }}", ctx),
            "{\n  \"name\": \"é \\\"q\\\"\",\n  \"n\": [\n    1,\n    2.5\n  ],\n  \"e\": {},\n"
            "  \"z\": null\n}");
  EXPECT_EQ(R("{{ x.n|tojson(separators=(',', ':')) }}|{{ 'é'|tojson(ensure_ascii=true) }}", ctx),
            "[1,2.5]|\"\\u00e9\"");
  EXPECT_EQ(R("{{ 'a\nb'|tojson }}"), "\"a\\nb\"");
}

TEST(JinjaTests, Builtins) {
  EXPECT_EQ(R("{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 's' is string }}"
              "{{ 1.5 is number }}{{ {} is mapping }}{{ [] is iterable }}{{ 'a' is sequence }}"
              "{{ true is true }}{{ 1 is true }}{{ false is false }}{{ x is not none }}",
              R"({"x": 1})"),
            "truetruetruetruetruetruetruetruetruefalsetruetrue");
}

TEST(JinjaMethods, StringsAndDicts) {
  EXPECT_EQ(R("{{ ' a '.strip() }}|{{ ' a '.lstrip() }}|{{ ' a '.rstrip() }}|{{ 'a,b'.split(',') }}"
              "|{{ ' x  y '.split() }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith('x') }}"),
            "a|a | a|[\"a\", \"b\"]|[\"x\", \"y\"]|true|false");
  EXPECT_EQ(
      R("{{ 'Ab'.upper() }}{{ 'Ab'.lower() }}{{ 'ab cd'.title() }}{{ 'aa'.replace('a', 'b') }}"),
      "ABabAb Cdbb");
  const std::string ctx = R"({"d": {"k": "v"}})";
  EXPECT_EQ(R("{{ d.get('k') }}|{{ d.get('x', 'dflt') }}|{{ d.get('x') }}|{{ d.keys() }}"
              "|{{ d.values() }}",
              ctx),
            "v|dflt||[\"k\"]|[\"v\"]");
}

TEST(JinjaErrors, RaiseExceptionIsInvalidArgumentWithTheMessage) {
  const absl::Status st =
      E("{% if x %}{{ raise_exception('Roles must alternate!') }}{% endif %}", R"({"x": true})");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "Roles must alternate!");
}

TEST(JinjaErrors, UnsupportedConstructsFailAtParseTimeWithPosition) {
  absl::StatusOr<Template> t = Template::Parse("a\nb\n  x {% include 'other.j2' %}");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t.status().message(), "jinja: line 3:8: unsupported tag 'include'");
  t = Template::Parse("{{ x|round }}");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message(), "jinja: line 1:6: unsupported filter 'round'");
  t = Template::Parse("{% if x is divisibleby(3) %}{% endif %}");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message(), "jinja: line 1:12: unsupported test 'divisibleby'");
  t = Template::Parse("{% for x in y %}");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("endfor"), absl::string_view::npos) << t.status();
  EXPECT_FALSE(Template::Parse("{{ 'unterminated }}").ok());
  EXPECT_FALSE(Template::Parse("\xff").ok());  // not UTF-8
}

TEST(JinjaErrors, RuntimeErrorsNameTheirPosition) {
  const absl::Status st = E("line one\n{{ 'x' + missing }}");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "jinja: line 2:8: Cannot perform operation + on undefined values");
}

TEST(JinjaLimits, HostileTemplatesStopWithAnError) {
  Limits small;
  small.max_steps = 100000;
  small.max_output_bytes = 1 << 20;
  small.max_total_bytes = 8 << 20;
  // A huge loop, exponential string growth, unbounded recursion: bounded errors, no hang/crash.
  for (const std::string t :
       {"{% for i in range(100000000) %}x{% endfor %}",
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% set ns = namespace() %}{% set ns.self = ns %}{{ ns|tojson }}"}) {
    absl::StatusOr<std::string> r = Try(t, "{}", small);
    EXPECT_FALSE(r.ok()) << t;
  }
  // Deep nesting fails at parse time instead of overflowing the stack.
  EXPECT_FALSE(
      Template::Parse("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").ok());
  EXPECT_FALSE(
      Template::Parse("{{ " + std::string(5000, '[') + std::string(5000, ']') + " }}").ok());
  EXPECT_FALSE(Template::Parse("{{ " + std::string(5000, '-') + "1 }}").ok());
  std::string nested;
  for (int i = 0; i < 1000; ++i) nested += "{% if true %}";
  EXPECT_FALSE(Template::Parse(nested).ok());
}

TEST(JinjaContext, NamesThatClashWithGlobalsAreRejected) {
  absl::StatusOr<Template> t = Template::Parse("{{ range }}");
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->Render(nlohmann::ordered_json::parse(R"({"range": 1})")).ok());
}

TEST(JinjaJsonQuote, LikeJsonStringify) {
  EXPECT_EQ(JsonQuote("a\"b\\c\n\x01é🚀/"), "\"a\\\"b\\\\c\\n\\u0001é🚀/\"");
}

}  // namespace
}  // namespace dmoe::gateway::jinja
