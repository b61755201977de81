// Writes N varied test strings (one JSON string per line) to stdout, deterministically: English,
// Chinese, Japanese, Russian, code, numbers, emoji, unusual whitespace, special tokens. Only
// characters assigned by Unicode 14 (PCRE2 10.42's tables) are used.
let seed = 12345;
function rnd(n) { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; }
function pick(a) { return a[rnd(a.length)]; }
const words = {
  en: ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "World", "don't",
       "I'm", "it's", "we'll", "they've", "CamelCase", "snake_case", "A", "a", "e.g.", "U.S.A."],
  zh: ["你好", "世界", "深度", "求索", "模型", "专家", "注意力", "缓存", "中文", "测试", "，", "。"],
  ja: ["こんにちは", "カタカナ", "ひらがな", "日本語", "テスト", "東京", "です", "。"],
  ru: ["Привет", "мир", "модель", "эксперт", "внимание", "тест", "Москва", "ёлка"],
  code: ["int main() {", "return 0;", "}", "for (i = 0; i < n; ++i)", "x += y * 2;", "def f(x):",
         "    return x**2", "#include <stdio.h>", "std::vector<int> v;", "if (a && b) { c(); }",
         "\"quoted\"", "'single'", "a->b", "// comment", "/* block */", "0x1F", "$HOME", "@decorator"],
  num: ["0", "1", "12", "123", "1234", "12345", "123456789", "3.14159", "-42", "1e10", "2026",
        "１２３", "٣٤٥", "½", "Ⅻ"],
  emoji: ["😀", "😂", "👍", "🎉", "❤️", "🚀", "👨‍👩‍👧", "🇫🇷", "✨", "🔥"],
  ws: [" ", "  ", "\t", "\n", "\r\n", "\n\n", "   \n", "\u00a0", "\u3000", "\u2009", "\u000b",
       "\u000c", "\u0085", "\u2028"],
  special: ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<｜fim▁hole｜>", "<think>", "</think>"],
  misc: ["é", "ñ", "ü", "ß", "Ω", "π", "∑", "→", "©", "®", "™", "•", "…", "—", "«", "»", "¿", "¡"],
};
// Every code point where PCRE2 10.42's \s, \h or \v (with PCRE2_UCP) and Unicode's White_Space
// property (which Hugging Face's Oniguruma uses) can disagree: the union of those four sets, plus
// zero-width characters that are not White_Space, and hex digits (Oniguruma's \h), in contexts.
const disputed = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x180E, 0x2000, 0x2001,
                  0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028,
                  0x2029, 0x202F, 0x205F, 0x3000, 0x200B, 0xFEFF, 0x30, 0x61, 0x46, 0x67];
for (const cp of disputed) {
  const c = String.fromCodePoint(cp);
  for (const s of ["a" + c + "b", "a " + c, c + c + "x", "x " + c + " y", "\n" + c + "\n", c,
                   c + "Hello", "你" + c + "好", "12" + c + "34"]) {
    console.log(JSON.stringify(s));
  }
}
const kinds = Object.keys(words);
const n = Number(process.argv[2] || 2200);
for (let i = 0; i < n; ++i) {
  const len = 1 + rnd(i < 200 ? 3 : 25);
  let s = "";
  const main = pick(kinds);
  for (let k = 0; k < len; ++k) {
    const kind = rnd(3) === 0 ? pick(kinds) : main;
    s += pick(words[kind]);
    if (rnd(3) === 0) s += pick([" ", " ", " ", "", "\n", "  ", "\t"]);
  }
  console.log(JSON.stringify(s));
}
