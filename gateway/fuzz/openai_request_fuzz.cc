// Fuzzes what the HTTP front reads from a client: the raw HTTP/1.1 request through Beast's parser
// (with the front's limits) and the body through the OpenAI request parser of either endpoint,
// and writes the error object of every rejection. No input may crash, hang or leak.
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstddef>
#include <cstdint>
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  // As a whole HTTP request (what the front's parser sees) ...
  http::request_parser<http::string_body> parser;
  parser.body_limit(1 << 16);
  parser.header_limit(1 << 14);
  parser.eager(true);
  beast::error_code ec;
  size_t used = 0;
  while (used < in.size() && !ec && !parser.is_done()) {
    const size_t n = parser.put(boost::asio::buffer(in.data() + used, in.size() - used), ec);
    if (ec == http::error::need_more) ec = {};
    if (n == 0) break;
    used += n;
  }
  if (parser.is_done()) ParseBody(parser.get().body());
  // ... and as a request body.
  ParseBody(in);
  return 0;
}
