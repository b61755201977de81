#include "gateway/http_front.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "gateway/fake_attention.h"
#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "model/tokenizer_testing.h"
#include "nlohmann/json.hpp"

namespace dmoe::gateway {
namespace {

int ConnectTo(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &a.sin_addr);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

// GET /version on `fd`: the status line of the answer ("" when none came).
std::string GetVersion(int fd) {
  const std::string req = "GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) return "";
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) got.append(buf, static_cast<size_t>(n));
  return got.substr(0, got.find("\r\n"));
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Out of file descriptors, the listener cannot accept: it waits and tries again, rather than
// re-arming at once (which spun a core at 100 % for as long as the process had no descriptor to
// spare), and the connection waiting in the backlog is served once descriptors are free again.
TEST(HttpFront, OutOfDescriptorsTheListenerBacksOffAndRecovers) {
  NodePool pool({});
  ApiKeys keys;
  GatewayService service(&pool, &keys, GatewayOptions());
  HttpFrontOptions o;
  o.version = "test";
  HttpFront front(&service, o);
  auto addr = front.Start();
  ASSERT_TRUE(addr.ok()) << addr.status();
  {  // served as usual first
    const int fd = ConnectTo(*addr);
    ASSERT_GE(fd, 0);
    EXPECT_EQ(GetVersion(fd), "HTTP/1.1 200 OK");
    close(fd);
  }
  // Use up every descriptor but one, which the client's socket takes: the server's accept then
  // fails with EMFILE while the connection waits in the backlog.
  rlimit lim{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &lim), 0);
  const rlimit low{256, lim.rlim_max};
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<int> hogs;
  for (int fd; (fd = open("/dev/null", O_RDONLY)) >= 0;) hogs.push_back(fd);
  ASSERT_FALSE(hogs.empty());
  close(hogs.back());
  hogs.pop_back();
  const int waiting = ConnectTo(*addr);
  ASSERT_GE(waiting, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the accept fails from now on
  const double cpu0 = CpuSeconds();
  const auto t0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = CpuSeconds() - cpu0;
  std::printf("out of descriptors: %.3f s of CPU in %.3f s\n", cpu, wall);
  EXPECT_LT(cpu, 0.25 * wall);  // spinning used a whole core (about 1 s)
  for (int fd : hogs) close(fd);
  EXPECT_EQ(GetVersion(waiting), "HTTP/1.1 200 OK");  // accepted once descriptors are free
  close(waiting);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &lim), 0);
  front.Stop();
}

// Reads from `fd` until `count` complete HTTP responses (headers and Content-Length body) have
// come, the peer closes, or the socket's receive timeout passes; returns their status lines.
std::vector<std::string> ReadResponses(int fd, size_t count) {
  std::vector<std::string> got;
  std::string buf;
  char chunk[4096];
  while (got.size() < count) {
    const size_t head_end = buf.find("\r\n\r\n");
    if (head_end != std::string::npos) {
      const size_t cl = buf.find("Content-Length: ");
      const size_t length = cl < head_end ? std::stoul(buf.substr(cl + 16)) : 0;
      if (buf.size() >= head_end + 4 + length) {
        got.push_back(buf.substr(0, buf.find("\r\n")));
        buf.erase(0, head_end + 4 + length);
        continue;
      }
    }
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n <= 0) break;
    buf.append(chunk, static_cast<size_t>(n));
  }
  return got;
}

// Sends `req` (which asks the server to close) and returns the whole reply.
std::string Exchange(const std::string& address, const std::string& req) {
  const int fd = ConnectTo(address);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  std::string reply;
  char buf[4096];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;)
    reply.append(buf, static_cast<size_t>(n));
  close(fd);
  return reply;
}

class HttpFrontWithANode : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&node_);
    server_ = b.BuildAndStart();
    pool_ =
        std::make_unique<NodePool>(std::vector<std::string>{"127.0.0.1:" + std::to_string(port)});
    for (int i = 0; i < 300 && pool_->healthy() == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_EQ(pool_->healthy(), 1u);
    service_ = std::make_unique<GatewayService>(pool_.get(), &keys_, GatewayOptions());
    HttpFrontOptions o;
    o.read_timeout = std::chrono::milliseconds(500);
    front_ = std::make_unique<HttpFront>(service_.get(), o);
    auto addr = front_->Start();
    ASSERT_TRUE(addr.ok()) << addr.status();
    address_ = *addr;
  }
  void TearDown() override {
    front_->Stop();
    server_->Shutdown();
  }
  static std::string Completion(
      const std::string& body = R"({"prompt": [1, 2], "max_tokens": 3})") {
    return "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           "Content-Length: " +
           std::to_string(body.size()) + "\r\n\r\n" + body;
  }

  FakeAttention node_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<NodePool> pool_;
  ApiKeys keys_;
  std::unique_ptr<GatewayService> service_;
  std::unique_ptr<HttpFront> front_;
  std::string address_;
};

// A keep-alive connection left idle after a completion is closed after the read timeout, like
// one idle after any other request. (It waits in a read that watches for a disconnect, which
// kept the expiry it started with: none. Such connections were never closed.)
TEST_F(HttpFrontWithANode, AConnectionIdleAfterACompletionIsClosedAfterTheReadTimeout) {
  const int fd = ConnectTo(address_);
  ASSERT_GE(fd, 0);
  const std::string req = Completion();
  ASSERT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  EXPECT_EQ(ReadResponses(fd, 1), std::vector<std::string>{"HTTP/1.1 200 OK"});
  const auto t0 = std::chrono::steady_clock::now();
  char c;
  EXPECT_EQ(recv(fd, &c, 1, 0), 0) << "not closed within the socket's 10 s receive timeout";
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("closed %.2f s after the response (read timeout 0.5 s)\n", s);
  EXPECT_LT(s, 5.0);
  close(fd);
}

// A client that sends its next request before the response to a completion is out (pipelining)
// gets both answers. The next request's bytes arrived in the disconnect watch, which then waited
// for more and never parsed them: the client hung.
TEST_F(HttpFrontWithANode, APipelinedRequestAfterACompletionIsAnswered) {
  const int fd = ConnectTo(address_);
  ASSERT_GE(fd, 0);
  const std::string reqs = Completion() + "GET /version HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(send(fd, reqs.data(), reqs.size(), MSG_NOSIGNAL), static_cast<ssize_t>(reqs.size()));
  EXPECT_EQ(ReadResponses(fd, 2), (std::vector<std::string>{"HTTP/1.1 200 OK", "HTTP/1.1 200 OK"}));
  close(fd);
}

// A request without max_tokens goes to the node with max_tokens_up_to_cache (the node lowers its
// default to what its KV cache holds instead of refusing it); one with max_tokens does not. And
// /v1/models's max_model_len is what the smallest node's cache holds (100 blocks of 16 tokens)
// when that is less than the context (none known here).
TEST_F(HttpFrontWithANode, ADefaultMaxTokensMayBeLoweredToTheNodesCache) {
  for (const bool given : {true, false}) {
    const int fd = ConnectTo(address_);
    ASSERT_GE(fd, 0);
    const std::string req =
        Completion(given ? R"({"prompt": [1, 2], "max_tokens": 3})" : R"({"prompt": [1, 2]})");
    ASSERT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
    EXPECT_EQ(ReadResponses(fd, 1), std::vector<std::string>{"HTTP/1.1 200 OK"});
    close(fd);
    const internal::SamplingParams s = node_.last_sampling();
    EXPECT_EQ(s.max_tokens_up_to_cache(), !given) << (given ? "max_tokens given" : "no max_tokens");
    EXPECT_EQ(s.max_tokens(), given ? 3 : 16);  // OpenAI's default for completions
  }
  const std::string reply =
      Exchange(address_, "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_NE(reply.find("\"max_model_len\":1600"), std::string::npos) << reply;
}

// --model-id "NAME,ALIAS": requests naming the alias are served (their responses carry the name
// they used), /v1/models/ALIAS answers; other names are 404 model_not_found. An empty name in the
// flag is an error naming it.
TEST_F(HttpFrontWithANode, AModelAnswersToItsAliases) {
  GatewayOptions go;
  ASSERT_TRUE(go.SetModelNames("dmoe,deepseek-ai/DeepSeek-V3").ok());
  EXPECT_EQ(go.model_id, "dmoe");
  EXPECT_EQ(go.SetModelNames("a,,b").code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(go.SetModelNames("dmoe, deepseek-ai/DeepSeek-V3").ok());  // blanks dropped
  EXPECT_EQ(go.model_aliases, std::vector<std::string>{"deepseek-ai/DeepSeek-V3"});
  GatewayService service(pool_.get(), &keys_, go);
  HttpFront front(&service, HttpFrontOptions());
  auto addr = front.Start();
  ASSERT_TRUE(addr.ok()) << addr.status();
  auto exchange = [&](const std::string& req) { return Exchange(*addr, req); };
  const std::string close = "Connection: close\r\n";
  auto completion = [&](const std::string& model) {
    const std::string body = R"({"prompt": [1, 2], "max_tokens": 3, "model": ")" + model + "\"}";
    return exchange("POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + close +
                    "Content-Type: application/json\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  for (const std::string model : {"dmoe", "deepseek-ai/DeepSeek-V3"}) {
    const std::string reply = completion(model);
    EXPECT_EQ(reply.rfind("HTTP/1.1 200", 0), 0u) << reply;
    EXPECT_NE(reply.find("\"model\":\"" + model + "\""), std::string::npos) << reply;
  }
  const std::string other = completion("gpt-4o");
  EXPECT_EQ(other.rfind("HTTP/1.1 404", 0), 0u) << other;
  EXPECT_NE(other.find("model_not_found"), std::string::npos) << other;
  const std::string get =
      exchange("GET /v1/models/deepseek-ai/DeepSeek-V3 HTTP/1.1\r\nHost: x\r\n" + close + "\r\n");
  EXPECT_EQ(get.rfind("HTTP/1.1 200", 0), 0u) << get;
  EXPECT_NE(get.find("\"id\":\"deepseek-ai/DeepSeek-V3\""), std::string::npos) << get;
  const std::string list = exchange("GET /v1/models HTTP/1.1\r\nHost: x\r\n" + close + "\r\n");
  EXPECT_NE(list.find("\"id\":\"dmoe\""), std::string::npos) << list;  // every name listed
  EXPECT_NE(list.find("\"id\":\"deepseek-ai/DeepSeek-V3\""), std::string::npos) << list;
  front.Stop();
}

// A FakeAttention served on 127.0.0.1 and a pool that has seen it healthy (or given up after 3 s).
struct ServedNode {
  explicit ServedNode(FakeAttention* node) : server(Build(node, &port)), pool({Address()}) {
    for (int i = 0; i < 300 && pool.healthy() == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  ~ServedNode() { server->Shutdown(); }
  static std::unique_ptr<grpc::Server> Build(FakeAttention* node, int* port) {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), port);
    b.RegisterService(node);
    return b.BuildAndStart();
  }
  std::string Address() const { return "127.0.0.1:" + std::to_string(port); }
  int port = 0;
  std::unique_ptr<grpc::Server> server;
  NodePool pool;
};

// POSTs completion `bodies` through a gateway (the byte-level tokenizer with "<eos>" and "<tool>")
// in front of `node`; returns each answer's JSON (null where the status is not 200).
std::vector<nlohmann::json> Completions(FakeAttention* node,
                                        const std::vector<std::string>& bodies) {
  std::vector<nlohmann::json> out;
  ServedNode served(node);
  auto tok = Tokenizer::FromJson(testing::ByteLevelTokenizerJson(/*with_added=*/true));
  EXPECT_TRUE(tok.ok()) << tok.status();
  if (served.pool.healthy() != 1 || !tok.ok()) return out;
  ApiKeys keys;
  GatewayOptions o;
  o.tokenizer = tok->get();
  GatewayService service(&served.pool, &keys, o);
  HttpFront front(&service, HttpFrontOptions());
  auto addr = front.Start();
  EXPECT_TRUE(addr.ok()) << addr.status();
  for (const std::string& body : bodies) {
    const std::string reply =
        Exchange(*addr,
                 "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 "Content-Type: application/json\r\nContent-Length: " +
                     std::to_string(body.size()) + "\r\n\r\n" + body);
    EXPECT_EQ(reply.rfind("HTTP/1.1 200", 0), 0u) << reply;
    out.push_back(reply.rfind("HTTP/1.1 200", 0) == 0
                      ? nlohmann::json::parse(reply.substr(reply.find("\r\n\r\n") + 4))
                      : nlohmann::json());
  }
  front.Stop();
  return out;
}

// The OpenAI API leaves special tokens (here "<eos>", as under ignore_eos) out of the text unless
// the request says skip_special_tokens false, as vLLM; added tokens that are not special stay.
TEST(HttpFrontSpecialTokens, AreLeftOutOfTheTextUnlessAsked) {
  FakeAttention node(false, 0, {'a', 256, 257, 'b'}, "length");
  const std::vector<std::string> bodies = {
      R"({"prompt": [1, 2], "max_tokens": 4})",
      R"({"prompt": [1, 2], "max_tokens": 4, "skip_special_tokens": true})",
      R"({"prompt": [1, 2], "max_tokens": 4, "skip_special_tokens": false})"};
  const std::vector<nlohmann::json> got = Completions(&node, bodies);
  ASSERT_EQ(got.size(), bodies.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i]["choices"][0]["text"], i == 2 ? "a<eos><tool>b" : "a<tool>b") << bodies[i];
    EXPECT_EQ(got[i]["usage"]["completion_tokens"], 4) << bodies[i];
  }
}

// The token that ended a generation (an eos, a stop_token_ids token) is returned and counted but
// adds no text, as vLLM's (here "<tool>", not special, so only the stop mark leaves it out).
TEST(HttpFrontSpecialTokens, TheStopTokenAddsNoText) {
  FakeAttention node(false, 0, {'a', 'b', 257}, "stop");
  node.last_is_stop = true;
  const std::vector<nlohmann::json> got =
      Completions(&node, {R"({"prompt": [1, 2], "max_tokens": 4, "logprobs": 0})"});
  ASSERT_EQ(got.size(), 1u);
  const nlohmann::json& j = got[0];
  EXPECT_EQ(j["choices"][0]["text"], "ab");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["choices"][0]["logprobs"]["tokens"].size(), 3u);
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
}

// End to end over HTTP with --tool-call-parser deepseek_v3 and the shipped tools template: a node
// answering DeepSeek-V3's tool-call markup (the byte-level test tokenizer: token id = byte) gives
// the client message.tool_calls and finish_reason "tool_calls", streamed or not; the prompt the
// node got describes the tool. Without the parser the same request is a 400 naming `tools`.
TEST(HttpFrontToolCalls, AnAnswersToolCallsReachTheClient) {
  const std::string answer =
      "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
  std::vector<int32_t> ids;
  for (unsigned char c : answer) ids.push_back(c);
  FakeAttention node(false, 0, ids, "stop");
  ServedNode served(&node);
  NodePool& pool = served.pool;
  ASSERT_EQ(pool.healthy(), 1u);
  auto tok = Tokenizer::FromJson(testing::ByteLevelTokenizerJson());
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto tmpl = ChatTemplate::BuiltinDefault().WithTemplateFile(
      "deploy/chat_templates/deepseek_v3_tools.jinja");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  const std::string body_start =
      R"({"messages":[{"role":"user","content":"Weather in Paris?"}],"max_tokens":200,)"
      R"("tools":[{"type":"function","function":{"name":"get_weather","parameters":)"
      R"({"type":"object","properties":{"city":{"type":"string"}}}}}])";
  auto chat = [](const std::string& address, const std::string& body) {
    return Exchange(address,
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    "Content-Type: application/json\r\nContent-Length: " +
                        std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  for (const std::string parser : {"deepseek_v3", "none"}) {
    ApiKeys keys;
    GatewayOptions o;
    o.tokenizer = tok->get();
    o.chat_template = &*tmpl;
    ASSERT_TRUE(o.SetToolCallParser(parser).ok());
    GatewayService service(&pool, &keys, o);
    HttpFront front(&service, HttpFrontOptions());
    auto addr = front.Start();
    ASSERT_TRUE(addr.ok()) << addr.status();
    const std::string whole = chat(*addr, body_start + "}");
    if (parser == "none") {
      EXPECT_EQ(whole.rfind("HTTP/1.1 400", 0), 0u) << whole;
      EXPECT_NE(whole.find(R"("param":"tools")"), std::string::npos) << whole;
      front.Stop();
      continue;
    }
    ASSERT_EQ(whole.rfind("HTTP/1.1 200", 0), 0u) << whole;
    const auto j = nlohmann::json::parse(whole.substr(whole.find("\r\n\r\n") + 4));
    const auto& choice = j["choices"][0];
    EXPECT_EQ(choice["finish_reason"], "tool_calls") << j.dump();
    EXPECT_TRUE(choice["message"]["content"].is_null()) << j.dump();
    ASSERT_TRUE(choice["message"].contains("tool_calls")) << j.dump();
    ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u) << j.dump();
    EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["name"], "get_weather");
    EXPECT_EQ(choice["message"]["tool_calls"][0]["function"]["arguments"], R"({"city": "Paris"})");
    EXPECT_EQ(j["usage"]["completion_tokens"], static_cast<int64_t>(answer.size()));
    // The prompt the node got: the tool described, the conversation after it.
    const std::string prompt = tok->get()->Decode(node.last_prompt());
    EXPECT_NE(prompt.find("### get_weather\nParameters: "), std::string::npos) << prompt;

    const std::string streamed = chat(*addr, body_start + R"(,"stream":true})");
    ASSERT_EQ(streamed.rfind("HTTP/1.1 200", 0), 0u) << streamed;
    std::string name, args, finish;
    for (size_t at = streamed.find("data: {"); at != std::string::npos;
         at = streamed.find("data: {", at + 1)) {
      const auto e =
          nlohmann::json::parse(streamed.substr(at + 6, streamed.find('\n', at) - at - 6));
      const auto& c = e["choices"][0];
      if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
      if (!c["delta"].contains("tool_calls")) continue;
      const auto& call = c["delta"]["tool_calls"][0];
      EXPECT_EQ(call["index"], 0);
      if (call["function"].contains("name")) name += call["function"]["name"].get<std::string>();
      args += call["function"]["arguments"].get<std::string>();
    }
    EXPECT_EQ(name, "get_weather") << streamed;
    EXPECT_EQ(args, R"({"city": "Paris"})") << streamed;
    EXPECT_EQ(finish, "tool_calls") << streamed;
    // A named tool_choice: the prompt ends inside that function's call (the model goes on with
    // its arguments).
    const std::string named =
        chat(*addr, body_start +
                        R"(,"tool_choice":{"type":"function","function":{"name":"get_weather"}}})");
    EXPECT_EQ(named.rfind("HTTP/1.1 200", 0), 0u) << named;
    const std::string opening =
        "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_"
        "weather\n"
        "```json\n";
    const std::string named_prompt = tok->get()->Decode(node.last_prompt());
    ASSERT_GT(named_prompt.size(), opening.size());
    EXPECT_EQ(named_prompt.substr(named_prompt.size() - opening.size()), opening) << named_prompt;
    front.Stop();
  }
}

}  // namespace
}  // namespace dmoe::gateway
