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
