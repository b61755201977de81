// Fuzzes what the HTTP front reads from a client: the raw HTTP/1.1 request through Beast's parser
// (with the front's limits) and the body through the OpenAI request parser of either endpoint,
// and writes the error object of every rejection. No input may crash, hang or leak.
#include <algorithm>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "gateway/openai.h"

namespace {

namespace beast = boost::beast;
namespace http = beast::http;

void ParseBody(std::string_view body) {
  for (auto e :
       {dmoe::gateway::openai::Endpoint::kChat, dmoe::gateway::openai::Endpoint::kCompletions}) {
    auto r = dmoe::gateway::openai::ParseRequest(e, body);
    if (!r.ok()) {
      (void)dmoe::gateway::openai::ErrorFromStatus(r.status()).Json();
    } else {
      dmoe::gateway::openai::ResponseWriter w(*r, "id", 0, "m", nullptr, r->n);
      dmoe::v1::GenerateResponse last;
      last.add_token_ids(1);
      last.add_logprobs(-0.5f);
      last.set_text_delta("x");
      last.set_finish_reason("length");
      (void)w.Chunk(0, last);
      (void)(r->stream ? w.End() : w.Body());
    }
  }
}

// Feeds `in` to a fresh parser the way the front's http::async_read does (Beast's read_some):
// put() gets every byte not yet consumed; after need_more it is called again only with more bytes
// (never twice on the same ones: Beast's chunk parser asserts that it got more); at the end of the
// input (the client closing) put_eof() where some of a message came, which Beast follows with an
// assertion that the message is done. The bytes arrive in pieces of `piece` bytes, as TCP reads
// may cut them.
void ParseHttp(std::string_view in, size_t piece) {
  http::request_parser<http::string_body> parser;
  parser.body_limit(1 << 16);
  parser.header_limit(1 << 14);
  parser.eager(true);
  beast::error_code ec;
  std::string buffer;
  size_t next = 0;
  while (!ec && !parser.is_done()) {
    if (!buffer.empty()) {
      const size_t used = parser.put(boost::asio::buffer(buffer), ec);
      buffer.erase(0, used);
      if (ec != http::error::need_more) {  // an error ends it; else put again
        // (no progress without an error, on bytes it has: the front's read would spin)
        if (!ec && used == 0 && !buffer.empty() && !parser.is_done()) __builtin_trap();
        continue;
      }
      ec = {};
    }
    if (next == in.size()) {  // the client closed
      if (parser.got_some()) {
        parser.put_eof(ec);
        if (!ec && !parser.is_done()) __builtin_trap();  // Beast's read_some asserts this
      }
      return;
    }
    const size_t n = std::min(piece, in.size() - next);
    buffer.append(in.data() + next, n);
    next += n;
  }
  if (parser.is_done()) ParseBody(parser.get().body());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  // As a whole HTTP request (what the front's parser sees), arriving at once and in pieces of
  // 1-13 bytes ...
  ParseHttp(in, in.size() + 1);
  ParseHttp(in, size % 13 + 1);
  // ... and as a request body.
  ParseBody(in);
  return 0;
}
