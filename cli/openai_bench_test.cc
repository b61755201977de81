// GCC's ThreadSanitizer build (--config=tsan) warns that Asio's atomic_thread_fence is not
// supported (-Wtsan, an error under -Werror); each io_context here is used by one thread only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__SANITIZE_THREAD__)
#pragma GCC diagnostic ignored "-Wtsan"
#endif

#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cmath>
#include <mutex>
#include <sstream>
#include <thread>

#include "cli/openai_bench_internal.h"
#include "gtest/gtest.h"

namespace dmoe::cli::bench {
namespace {

// ---- Percentiles ------------------------------------------------------------------------------

std::vector<double> OneTo(int n) {
  std::vector<double> v;
  for (int i = 1; i <= n; ++i) v.push_back(i);
  return v;
}

TEST(PercentileTest, LinearInterpolationOfOneToHundred) {
  // numpy.percentile(range(1, 101), [50, 90, 99]) = [50.5, 90.1, 99.01]: rank q/100 * 99.
  const std::vector<double> v = OneTo(100);
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 50.5);
  EXPECT_DOUBLE_EQ(Percentile(v, 90), 90.1);
  EXPECT_DOUBLE_EQ(Percentile(v, 99), 99.01);
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 100);
}

TEST(PercentileTest, SmallAndEmpty) {
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(Percentile({0, 10}, 90), 9);  // rank 0.9 between 0 and 10
  EXPECT_DOUBLE_EQ(Percentile({1, 2, 3, 4}, 50), 2.5);
}

TEST(PercentileTest, SummarizeSortsAndAverages) {
  const Stats s = Summarize({4, 1, 3, 2});
  EXPECT_EQ(s.count, 4u);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.p50, 2.5);
  EXPECT_DOUBLE_EQ(s.p90, 3.7);   // rank 2.7: 3 + 0.7
  EXPECT_DOUBLE_EQ(s.p99, 3.97);  // rank 2.97
  const Stats empty = Summarize({});
  EXPECT_EQ(empty.count, 0u);
  EXPECT_EQ(empty.mean, 0);
}

// ---- SSE --------------------------------------------------------------------------------------

TEST(SseParserTest, SplitsEventsAndDone) {
  SseParser p;
  std::vector<std::string> ev;
  p.Feed("data: {\"a\":1}\n\ndata: [DONE]\n\n", &ev);
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0], "{\"a\":1}");
  EXPECT_EQ(ev[1], "[DONE]");
}

TEST(SseParserTest, ChunksSplitAnywhereGiveTheSameEvents) {
  const std::string body =
      "data: {\"x\":\"first\"}\r\n\r\n: a comment\n\nevent: message\ndata:no-space\n\n"
      "data: line1\ndata: line2\n\ndata: [DONE]\r\n\r\n";
  const std::vector<std::string> want = {"{\"x\":\"first\"}", "no-space", "line1\nline2", "[DONE]"};
  for (size_t cut = 0; cut <= body.size(); ++cut) {
    SseParser p;
    std::vector<std::string> ev;
    p.Feed(body.substr(0, cut), &ev);
    p.Feed(body.substr(cut), &ev);
    EXPECT_EQ(ev, want) << "cut at " << cut;
  }
  SseParser bytewise;
  std::vector<std::string> ev;
  for (char c : body) bytewise.Feed(std::string(1, c), &ev);
  EXPECT_EQ(ev, want);
}

TEST(SseParserTest, EventWaitsForItsBlankLineAndFinishFlushes) {
  SseParser p;
  std::vector<std::string> ev;
  p.Feed("data: [DONE]\n", &ev);
  EXPECT_TRUE(ev.empty());
  p.Finish(&ev);
  EXPECT_EQ(ev, std::vector<std::string>{"[DONE]"});

  SseParser partial;  // a line without its end is dropped
  ev.clear();
  partial.Feed("data: [DO", &ev);
  partial.Finish(&ev);
  EXPECT_TRUE(ev.empty());
}

TEST(StreamChunkTest, ChoicesUsageDoneAndErrors) {
  auto c = ParseStreamChunk(R"({"choices":[{"index":0,"text":""}]})");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->has_choice);  // an empty delta is still one output event
  EXPECT_FALSE(c->has_usage);

  c = ParseStreamChunk(R"({"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}})");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->has_choice);
  EXPECT_TRUE(c->has_usage);
  EXPECT_EQ(c->prompt_tokens, 7);
  EXPECT_EQ(c->completion_tokens, 3);

  c = ParseStreamChunk(R"({"choices":[{"delta":{}}],"usage":null})");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->has_choice);
  EXPECT_FALSE(c->has_usage);

  c = ParseStreamChunk(R"({"choices":[{"delta":{"role":"assistant"}}]})");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->has_choice);  // a role announcement is not a generated step
  c = ParseStreamChunk(R"({"choices":[{"delta":{"role":"assistant","content":""}}]})");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->has_choice);

  c = ParseStreamChunk("[DONE]");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->done);

  EXPECT_TRUE(absl::IsInvalidArgument(ParseStreamChunk("{not json").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(ParseStreamChunk("[1,2]").status()));
  auto e = ParseStreamChunk(R"({"error":{"message":"overloaded"}})");
  EXPECT_TRUE(absl::IsFailedPrecondition(e.status()));
  EXPECT_NE(e.status().message().find("overloaded"), std::string::npos);
}

// ---- URLs -------------------------------------------------------------------------------------

TEST(ParseUrlTest, Forms) {
  auto t = ParseUrl("http://localhost:8000");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->host, "localhost");
  EXPECT_EQ(t->port, "8000");
  EXPECT_EQ(t->base_path, "");

  t = ParseUrl("http://127.0.0.1:9/v1/");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->port, "9");
  EXPECT_EQ(t->base_path, "");

  t = ParseUrl("http://example.com/proxy/v1");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->host, "example.com");
  EXPECT_EQ(t->port, "80");
  EXPECT_EQ(t->base_path, "/proxy");

  t = ParseUrl("HTTP://[::1]:8080/v1");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->host, "::1");
  EXPECT_EQ(t->port, "8080");
}

TEST(ParseUrlTest, Errors) {
  for (const char* bad :
       {"https://host:443", "host:8000", "http://", "http://:80", "http://h:0", "http://h:99999",
        "http://h:x", "http://h:", "http://[::1:80", "http://h:80/v1?x=1"}) {
    auto t = ParseUrl(bad);
    EXPECT_TRUE(absl::IsInvalidArgument(t.status())) << bad;
    EXPECT_EQ(t.status().message().substr(0, 7), "--url: ") << bad;
  }
  EXPECT_NE(ParseUrl("https://h").status().message().find("https"), std::string::npos);
}

// ---- Datasets ---------------------------------------------------------------------------------

TEST(DatasetTest, GoodLines) {
  auto r = ParseDatasetLine(R"({"prompt": "hi there"})", 1, 16);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompt, "hi there");
  EXPECT_EQ(r->output_len, 16);
  EXPECT_EQ(r->prompt_len, 0);

  r = ParseDatasetLine(R"({"prompt": [1, 2, 3], "output_len": 5, "other": true})", 2, 16);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompt, nlohmann::json({1, 2, 3}));
  EXPECT_EQ(r->prompt_len, 3);
  EXPECT_EQ(r->output_len, 5);
}

TEST(DatasetTest, BadLinesNameTheLine) {
  for (const char* bad :
       {"not json", "[1]", R"({"text": "x"})", R"({"prompt": 5})", R"({"prompt": ""})",
        R"({"prompt": []})", R"({"prompt": [1, -2]})", R"({"prompt": [1, "a"]})",
        R"({"prompt": "x", "output_len": 0})", R"({"prompt": "x", "output_len": "9"})"}) {
    auto r = ParseDatasetLine(bad, 42, 16);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << bad;
    EXPECT_NE(r.status().message().find("--dataset line 42:"), std::string::npos)
        << bad << ": " << r.status();
  }
}

TEST(DatasetTest, FileSkipsBlankLinesAndReportsTheBadOne) {
  std::istringstream good("{\"prompt\": \"a\"}\n\n{\"prompt\": [4]}\n");
  auto all = ParseDataset(good, 8);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[1].prompt, nlohmann::json({4}));

  std::istringstream bad("{\"prompt\": \"a\"}\n\n{\"prompt\": 1}\n");
  auto r = ParseDataset(bad, 8);
  EXPECT_NE(r.status().message().find("line 3"), std::string::npos) << r.status();

  std::istringstream empty("\n\n");
  EXPECT_FALSE(ParseDataset(empty, 8).ok());
}

// ---- Prompts and schedules --------------------------------------------------------------------

TEST(RandomRequestsTest, SeededLengthsAndIds) {
  RandomPromptOptions o;
  o.num = 200;
  o.input_len = 100;
  o.output_len = 20;
  o.range_ratio = 0.5;
  o.vocab_size = 50;
  o.seed = 3;
  const auto a = RandomRequests(o);
  const auto b = RandomRequests(o);
  ASSERT_EQ(a.size(), 200u);
  bool lengths_vary = false;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt, b[i].prompt);
    EXPECT_GE(a[i].prompt_len, 50);
    EXPECT_LE(a[i].prompt_len, 150);
    EXPECT_GE(a[i].output_len, 10);
    EXPECT_LE(a[i].output_len, 30);
    ASSERT_EQ(a[i].prompt.size(), static_cast<size_t>(a[i].prompt_len));
    for (const auto& id : a[i].prompt) {
      EXPECT_GE(id.get<int>(), 0);
      EXPECT_LT(id.get<int>(), 50);
    }
    lengths_vary |= a[i].prompt_len != a[0].prompt_len;
  }
  EXPECT_TRUE(lengths_vary);
  o.seed = 4;
  EXPECT_NE(RandomRequests(o)[0].prompt, a[0].prompt);

  o.range_ratio = 0;
  o.text = true;
  o.num = 1;
  o.input_len = 3;
  const auto t = RandomRequests(o);
  EXPECT_EQ(t[0].prompt, "hello hello hello");
  EXPECT_EQ(t[0].prompt_len, 3);
  EXPECT_EQ(t[0].output_len, 20);
}

TEST(PoissonArrivalsTest, SeededAndMeanGap) {
  const auto a = PoissonArrivals(20001, 4.0, 7);
  EXPECT_EQ(a, PoissonArrivals(20001, 4.0, 7));
  EXPECT_NE(a, PoissonArrivals(20001, 4.0, 8));
  EXPECT_EQ(a[0], 0);
  for (size_t i = 1; i < a.size(); ++i) ASSERT_GE(a[i], a[i - 1]);
  // 20000 exponential gaps of mean 0.25 s: the sample mean's standard error is 0.25/sqrt(20000)
  // = 0.0018; 3% (0.0075) is 4 standard errors.
  const double mean_gap = a.back() / 20000.0;
  EXPECT_NEAR(mean_gap, 0.25, 0.0075);
  for (double t : PoissonArrivals(5, std::numeric_limits<double>::infinity(), 7)) EXPECT_EQ(t, 0);
}

// ---- Load runner and report -------------------------------------------------------------------

class SleepyClient : public BenchClient {
 public:
  SleepyClient(std::atomic<int>* in_flight, std::atomic<int>* max_seen)
      : in_flight_(in_flight), max_seen_(max_seen) {}
  RequestResult Send(const BenchRequest& r) override {
    const int now = ++*in_flight_;
    int seen = max_seen_->load();
    while (now > seen && !max_seen_->compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    --*in_flight_;
    RequestResult out;
    out.ok = true;
    out.events = r.output_len;  // lets the test see which request this result belongs to
    return out;
  }

 private:
  std::atomic<int>* in_flight_;
  std::atomic<int>* max_seen_;
};

TEST(RunLoadTest, AtMostOnePerClientAndResultsInOrder) {
  std::atomic<int> in_flight{0}, max_seen{0};
  std::vector<std::unique_ptr<SleepyClient>> owned;
  std::vector<BenchClient*> clients;
  for (int i = 0; i < 3; ++i) {
    owned.push_back(std::make_unique<SleepyClient>(&in_flight, &max_seen));
    clients.push_back(owned.back().get());
  }
  std::vector<BenchRequest> reqs(12);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].output_len = static_cast<int64_t>(i);
    reqs[i].prompt_len = 100 + static_cast<int64_t>(i);
  }
  std::atomic<int> progress_calls{0};
  size_t last_done = 0;
  const LoadResult r = RunLoad(reqs, std::vector<double>(reqs.size(), 0.0), clients,
                               [&](size_t done, size_t total, double) {
                                 ++progress_calls;
                                 last_done = done;
                                 EXPECT_EQ(total, 12u);
                               });
  EXPECT_LE(max_seen.load(), 3);
  EXPECT_GE(max_seen.load(), 1);
  ASSERT_EQ(r.results.size(), 12u);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(r.results[i].events, static_cast<int64_t>(i));
    EXPECT_EQ(r.results[i].prompt_len, 100 + static_cast<int64_t>(i));
  }
  EXPECT_GE(progress_calls.load(), 1);
  EXPECT_EQ(last_done, 12u);
}

TEST(RunLoadTest, WaitsForArrivals) {
  std::atomic<int> in_flight{0}, max_seen{0};
  SleepyClient client(&in_flight, &max_seen);
  const LoadResult r = RunLoad(std::vector<BenchRequest>(2), {0.0, 0.15}, {&client}, nullptr);
  EXPECT_GE(r.duration_s, 0.15);
}

TEST(ReportTest, NumbersFromHandComputedResults) {
  LoadResult load;
  load.duration_s = 2.0;
  RequestResult a;  // 5 tokens: TPOT (0.5 - 0.1) / 4 = 0.1 s
  a.ok = true;
  a.ttft_s = 0.1;
  a.e2e_s = 0.5;
  a.itl = {0.1, 0.1, 0.1, 0.1};
  a.events = 5;
  a.has_usage = true;
  a.prompt_tokens = 10;
  a.completion_tokens = 5;
  RequestResult b;  // no usage: 1 token (its events), prompt_len 7; no TPOT
  b.ok = true;
  b.ttft_s = 0.2;
  b.e2e_s = 0.2;
  b.events = 1;
  b.prompt_len = 7;
  RequestResult f;
  f.error = "http_429";
  load.results = {a, b, f, f};
  const nlohmann::json r = MakeReport(load, {{"seed", 1}});
  EXPECT_EQ(r["completed"], 2);
  EXPECT_EQ(r["failed"], 2);
  EXPECT_EQ(r["total_input_tokens"], 17);
  EXPECT_EQ(r["total_output_tokens"], 6);
  EXPECT_DOUBLE_EQ(r["request_throughput"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(r["output_throughput"].get<double>(), 3.0);
  EXPECT_DOUBLE_EQ(r["total_token_throughput"].get<double>(), 11.5);
  EXPECT_NEAR(r["ttft_ms"]["mean"].get<double>(), 150, 1e-9);
  EXPECT_NEAR(r["ttft_ms"]["p90"].get<double>(), 190, 1e-9);
  EXPECT_NEAR(r["tpot_ms"]["mean"].get<double>(), 100, 1e-9);
  EXPECT_EQ(r["tpot_ms"]["count"], 1);
  EXPECT_EQ(r["itl_ms"]["count"], 4);
  EXPECT_NEAR(r["e2el_ms"]["p50"].get<double>(), 350, 1e-9);
  EXPECT_EQ(r["errors"], nlohmann::json({{"http_429", 2}}));
  EXPECT_EQ(r["config"]["seed"], 1);
  const std::string table = ReportTable(r);
  EXPECT_NE(table.find("Successful requests:"), std::string::npos);
  EXPECT_NE(table.find("Mean TPOT (ms):"), std::string::npos);
  EXPECT_NE(table.find("100.00"), std::string::npos);
  EXPECT_NE(table.find("http_429:"), std::string::npos);
}

// ---- End to end against a fake OpenAI server --------------------------------------------------

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

// A tiny OpenAI-compatible server on 127.0.0.1:0: GET /v1/models, and POST /v1/completions
// streamed in the way `mode` says. One thread per connection, keep-alive.
class FakeOpenAiServer {
 public:
  enum class Mode { kStream, k429, kNoDone, kMalformed, kCloseAfterResponse };

  explicit FakeOpenAiServer(Mode mode) : mode_(mode), acceptor_(ioc_) {
    tcp::endpoint ep(net::ip::make_address("127.0.0.1"), 0);
    acceptor_.open(ep.protocol());
    acceptor_.bind(ep);
    acceptor_.listen();
    port_ = acceptor_.local_endpoint().port();
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }

  ~FakeOpenAiServer() {
    ::shutdown(acceptor_.native_handle(), SHUT_RDWR);  // wakes the blocked accept
    accept_thread_.join();
    {
      std::lock_guard<std::mutex> l(mu_);
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (std::thread& t : sessions_) t.join();
  }

  int port() const { return port_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/v1"; }
  int connections() const { return connections_.load(); }
  nlohmann::json last_body() {
    std::lock_guard<std::mutex> l(mu_);
    return nlohmann::json::parse(last_body_);
  }
  std::string last_authorization() {
    std::lock_guard<std::mutex> l(mu_);
    return last_auth_;
  }

 private:
  void AcceptLoop() {
    for (;;) {
      tcp::socket s(ioc_);
      beast::error_code ec;
      acceptor_.accept(s, ec);
      if (ec) return;
      ++connections_;
      std::lock_guard<std::mutex> l(mu_);
      fds_.push_back(s.native_handle());
      sessions_.emplace_back([this, s = std::move(s)]() mutable { Session(std::move(s)); });
    }
  }

  static void WriteChunk(tcp::socket& s, const std::string& data) {
    std::ostringstream os;
    os << std::hex << data.size() << "\r\n" << data << "\r\n";
    beast::error_code ec;
    net::write(s, net::buffer(os.str()), ec);
  }

  static void Pause(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

  void Stream(tcp::socket& s) {
    beast::error_code ec;
    net::write(s,
               net::buffer(std::string("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                       "Transfer-Encoding: chunked\r\n\r\n")),
               ec);
    if (mode_ == Mode::kMalformed) {
      WriteChunk(s, "data: {not json\n\n");
      WriteChunk(s, "data: [DONE]\n\n");
      WriteChunk(s, "");
      return;
    }
    Pause(60);  // TTFT >= 60 ms
    // The first event split inside its JSON, across two chunks.
    WriteChunk(s, "data: {\"id\":\"c\",\"choices\":[{\"index\":0,");
    Pause(5);
    WriteChunk(s, "\"text\":\"a\",\"finish_reason\":null}]}\n\n");
    Pause(40);  // an event with an empty text still counts
    WriteChunk(s, "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"text\":\"\"}]}\n\n");
    Pause(40);
    WriteChunk(s,
               "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"text\":\"c\","
               "\"finish_reason\":\"length\"}]}\r\n\r\n");
    WriteChunk(s,
               "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,"
               "\"completion_tokens\":3,\"total_tokens\":8}}\n\n");
    if (mode_ != Mode::kNoDone) WriteChunk(s, "data: [DONE]\n\n");
    WriteChunk(s, "");  // the last chunk
  }

  void Session(tcp::socket s) {
    Serve(s);
    std::lock_guard<std::mutex> l(mu_);  // before the socket closes and its fd can be reused
    fds_.erase(std::remove(fds_.begin(), fds_.end(), s.native_handle()), fds_.end());
  }

  void Serve(tcp::socket& s) {
    beast::flat_buffer buf;
    for (;;) {
      http::request<http::string_body> req;
      beast::error_code ec;
      http::read(s, buf, req, ec);
      if (ec) return;
      {
        std::lock_guard<std::mutex> l(mu_);
        last_body_ = req.body();
        last_auth_ = std::string(req[http::field::authorization]);
      }
      if (req.target() == "/v1/models") {
        http::response<http::string_body> res(http::status::ok, 11);
        res.set(http::field::content_type, "application/json");
        res.body() = R"({"object":"list","data":[{"id":"fake-model","vocab_size":321}]})";
        res.prepare_payload();
        http::write(s, res, ec);
      } else if (mode_ == Mode::k429) {
        http::response<http::string_body> res(http::status::too_many_requests, 11);
        res.body() = R"({"error":{"message":"slow down"}})";
        res.prepare_payload();
        http::write(s, res, ec);
      } else {
        Stream(s);
      }
      if (mode_ == Mode::kCloseAfterResponse) return;  // without saying so: a stale connection
    }
  }

  const Mode mode_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  int port_ = 0;
  std::atomic<int> connections_{0};
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> sessions_;
  std::string last_body_, last_auth_;
  std::thread accept_thread_;
};

OpenAiOptions OptionsFor(const FakeOpenAiServer& server) {
  OpenAiOptions o;
  o.target = *ParseUrl(server.url());
  o.model = "fake-model";
  o.api_key = "k";
  o.timeout_s = 10;
  return o;
}

BenchRequest IdsRequest() {
  BenchRequest r;
  r.prompt = {1, 2, 3, 4, 5};
  r.prompt_len = 5;
  r.output_len = 3;
  return r;
}

TEST(OpenAiClientTest, StreamTimingAndUsage) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::kStream);
  auto client = NewOpenAiClient(OptionsFor(server));
  for (int round = 0; round < 2; ++round) {
    const RequestResult r = client->Send(IdsRequest());
    ASSERT_TRUE(r.ok) << r.error << ": " << r.detail;
    EXPECT_EQ(r.events, 3);
    EXPECT_GE(r.ttft_s, 0.055);
    ASSERT_EQ(r.itl.size(), 2u);
    EXPECT_GE(r.itl[0], 0.035);
    EXPECT_GE(r.itl[1], 0.035);
    EXPECT_GE(r.e2e_s, r.ttft_s + r.itl[0] + r.itl[1] - 1e-9);
    EXPECT_TRUE(r.has_usage);
    EXPECT_EQ(r.prompt_tokens, 5);
    EXPECT_EQ(r.completion_tokens, 3);
  }
  EXPECT_EQ(server.connections(), 1);  // keep-alive
  const nlohmann::json body = server.last_body();
  EXPECT_EQ(body["model"], "fake-model");
  EXPECT_EQ(body["prompt"], nlohmann::json({1, 2, 3, 4, 5}));
  EXPECT_EQ(body["max_tokens"], 3);
  EXPECT_EQ(body["temperature"], 0);
  EXPECT_EQ(body["stream"], true);
  EXPECT_EQ(body["ignore_eos"], true);
  EXPECT_EQ(body["stream_options"]["include_usage"], true);
  EXPECT_EQ(server.last_authorization(), "Bearer k");
}

TEST(OpenAiClientTest, ChatBodyHasMessages) {
  OpenAiOptions o;
  o.chat = true;
  o.model = "m";
  BenchRequest r;
  r.prompt = "hello hello";
  r.output_len = 4;
  const nlohmann::json body = OpenAiRequestBody(o, r);
  EXPECT_EQ(body["messages"],
            nlohmann::json::parse(R"([{"role":"user","content":"hello hello"}])"));
  EXPECT_FALSE(body.contains("prompt"));
  EXPECT_EQ(body["max_tokens"], 4);
}

TEST(OpenAiClientTest, ListsModels) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::kStream);
  auto models = ListOpenAiModels(OptionsFor(server));
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->size(), 1u);
  EXPECT_EQ((*models)[0].id, "fake-model");
  EXPECT_EQ((*models)[0].vocab_size, 321);
}

TEST(OpenAiClientTest, Http429IsCountedAndTheConnectionKept) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::k429);
  auto client = NewOpenAiClient(OptionsFor(server));
  for (int round = 0; round < 2; ++round) {
    const RequestResult r = client->Send(IdsRequest());
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.error, "http_429");
    EXPECT_NE(r.detail.find("slow down"), std::string::npos) << r.detail;
  }
  EXPECT_EQ(server.connections(), 1);
  LoadResult load;
  load.results = {client->Send(IdsRequest())};
  load.duration_s = 1;
  const nlohmann::json report = MakeReport(load, {});
  EXPECT_EQ(report["failed"], 1);
  EXPECT_EQ(report["completed"], 0);
  EXPECT_EQ(report["errors"]["http_429"], 1);
}

TEST(OpenAiClientTest, StreamWithoutDoneFails) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::kNoDone);
  const RequestResult r = NewOpenAiClient(OptionsFor(server))->Send(IdsRequest());
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error, "no_done");
}

TEST(OpenAiClientTest, MalformedSseFails) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::kMalformed);
  const RequestResult r = NewOpenAiClient(OptionsFor(server))->Send(IdsRequest());
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error, "bad_sse");
}

TEST(OpenAiClientTest, StaleKeepAliveConnectionIsReopened) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::kCloseAfterResponse);
  auto client = NewOpenAiClient(OptionsFor(server));
  for (int round = 0; round < 2; ++round) {
    const RequestResult r = client->Send(IdsRequest());
    EXPECT_TRUE(r.ok) << round << ": " << r.error << ": " << r.detail;
  }
  EXPECT_EQ(server.connections(), 2);
}

TEST(OpenAiClientTest, RefusedConnectionIsAConnectError) {
  int port;
  {
    net::io_context ioc;
    tcp::acceptor a(ioc, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
    port = a.local_endpoint().port();
  }  // closed: nothing listens there now
  OpenAiOptions o;
  o.target = *ParseUrl("http://127.0.0.1:" + std::to_string(port));
  o.timeout_s = 5;
  const RequestResult r = NewOpenAiClient(o)->Send(IdsRequest());
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error, "connect");
  EXPECT_FALSE(ListOpenAiModels(o).ok());
}

TEST(OpenAiClientTest, LoadThroughTheRealClientReportsEverything) {
  FakeOpenAiServer server(FakeOpenAiServer::Mode::kStream);
  std::vector<std::unique_ptr<BenchClient>> owned;
  std::vector<BenchClient*> clients;
  for (int i = 0; i < 2; ++i) {
    owned.push_back(NewOpenAiClient(OptionsFor(server)));
    clients.push_back(owned.back().get());
  }
  const std::vector<BenchRequest> reqs(4, IdsRequest());
  const LoadResult load = RunLoad(reqs, std::vector<double>(4, 0.0), clients, nullptr);
  const nlohmann::json r = MakeReport(load, {});
  EXPECT_EQ(r["completed"], 4);
  EXPECT_EQ(r["total_output_tokens"], 12);
  EXPECT_EQ(r["total_input_tokens"], 20);
  EXPECT_EQ(r["itl_ms"]["count"], 8);
  EXPECT_GE(r["ttft_ms"]["p50"].get<double>(), 55);
  EXPECT_EQ(server.connections(), 2);
}

}  // namespace
}  // namespace dmoe::cli::bench
