// Every listening port of every process of a local cluster (`dmoe up`: router, 2 expert shards,
// 1 attention node, gateway) survives bad input: garbage and random bytes, unknown HTTP/1.1 paths
// and methods, a 1 MiB header, an HTTP/2 preface followed by broken frames, gRPC calls to methods
// that do not exist, a TLS ClientHello, UCX-framed garbage, half-open connections (silent, closed
// at once, reset) and slowloris connections. Ports are found from /proc (each process's listening
// TCP sockets), so a port nobody registered is attacked too. Afterwards every process must be
// alive, every gRPC port answer a health check, every /metrics answer, and a generation through
// the gateway equal the in-process one. Prints one line per port.
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "tests/process_util.h"

namespace dmoe {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// ---------------------------------------------------------------------------------------------
// Processes.

using testing::Runfile;
using testing::TmpDir;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs argv to completion (at most `timeout`); stdout to `out` (if not null). Returns the exit
// code, or -1 (killed, timed out).
int RunCommand(const std::vector<std::string>& argv, std::string* out,
               milliseconds timeout = milliseconds(120000)) {
  const std::string out_path = TmpDir() + "/run.out";
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  const auto end = Clock::now() + timeout;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (Clock::now() > end) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(milliseconds(20));
  }
  if (out != nullptr) *out = ReadFile(out_path);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool Alive(pid_t pid) {
  if (kill(pid, 0) != 0) return false;
  const std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] != 'Z';
}

// `dmoe down` for the state file, from the destructor and from SIGTERM (Bazel's timeout): the
// services run in their own sessions and would outlive the test.
const char* g_down_argv[4] = {nullptr, nullptr, nullptr, nullptr};
std::string g_dmoe, g_state;

void Down() {
  if (g_down_argv[0] == nullptr || access(g_state.c_str(), F_OK) != 0) return;
  const pid_t pid = fork();
  if (pid == 0) {
    const int null_fd = open("/dev/null", O_WRONLY);
    dup2(null_fd, 1);
    execv(g_down_argv[0], const_cast<char* const*>(g_down_argv));
    _exit(127);
  }
  int status;
  waitpid(pid, &status, 0);
}

void OnTerm(int) {
  Down();
  _exit(1);
}

// ---------------------------------------------------------------------------------------------
// Ports.

std::set<std::string> SocketInodes(pid_t pid) {
  std::set<std::string> inodes;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return inodes;
  while (dirent* e = readdir(d)) {
    char link[256];
    const ssize_t n = readlink((dir + "/" + e->d_name).c_str(), link, sizeof(link) - 1);
    if (n <= 0) continue;
    const std::string target(link, static_cast<size_t>(n));
    if (target.rfind("socket:[", 0) == 0) inodes.insert(target.substr(8, target.size() - 9));
  }
  closedir(d);
  return inodes;
}

// The TCP ports `pid` listens on (IPv4 and IPv6 sockets).
std::set<int> ListeningPorts(pid_t pid) {
  const std::set<std::string> inodes = SocketInodes(pid);
  std::set<int> ports;
  for (const char* table : {"tcp", "tcp6"}) {
    std::istringstream in(ReadFile("/proc/" + std::to_string(pid) + "/net/" + table));
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string sl, local, remote, state, queues, timer, retr, uid, timeout, inode;
      f >> sl >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >> inode;
      if (state != "0A" || !inodes.count(inode)) continue;  // 0A: LISTEN
      ports.insert(std::stoi(local.substr(local.rfind(':') + 1), nullptr, 16));
    }
  }
  return ports;
}

int PortOf(const std::string& host_port) {
  return std::atoi(host_port.substr(host_port.rfind(':') + 1).c_str());
}

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{1, 0};  // a server that stops reading must not block a send for long
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return fd;
}

void Reset(int fd) {  // close with RST instead of FIN
  linger l{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);
}

// Connects, sends `bytes` (a server that closes early is fine), reads until EOF or `read_ms`,
// closes (with RST when `rst`). Returns the bytes received.
void SendAll(int fd, const std::string& bytes) {
  for (size_t at = 0; at < bytes.size();) {
    const ssize_t n = send(fd, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
    if (n <= 0) return;
    at += static_cast<size_t>(n);
  }
}

// Sends `bytes`, then (if any) `then` 100 ms later, so that the server reads them apart; reads
// the answer for read_ms.
std::string Exchange(int port, const std::string& bytes, int read_ms, bool rst = false,
                     const std::string& then = "") {
  const int fd = Connect(port);
  if (fd < 0) return "";
  SendAll(fd, bytes);
  if (!then.empty()) {
    std::this_thread::sleep_for(milliseconds(100));
    SendAll(fd, then);
  }
  std::string got;
  const auto end = Clock::now() + milliseconds(read_ms);
  char buf[8192];
  for (;;) {
    const auto left = std::chrono::duration_cast<milliseconds>(end - Clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) != 1) break;
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    if (got.size() < 65536) got.append(buf, static_cast<size_t>(n));
  }
  rst ? Reset(fd) : (void)close(fd);
  return got;
}

// ---------------------------------------------------------------------------------------------
// Inputs.

std::string Frame(uint32_t length, uint8_t type, uint8_t flags, uint32_t stream,
                  const std::string& payload) {
  std::string f;
  f.push_back(static_cast<char>(length >> 16));
  f.push_back(static_cast<char>(length >> 8));
  f.push_back(static_cast<char>(length));
  f.push_back(static_cast<char>(type));
  f.push_back(static_cast<char>(flags));
  for (int s = 24; s >= 0; s -= 8) f.push_back(static_cast<char>(stream >> s));
  return f + payload;
}
std::string Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  return Frame(static_cast<uint32_t>(payload.size()), type, flags, stream, payload);
}

// HPACK "literal header field without indexing, new name", no Huffman (strings < 127 bytes).
std::string Hpack(const std::vector<std::pair<std::string, std::string>>& headers) {
  std::string out;
  for (const auto& [name, value] : headers) {
    out.push_back('\0');
    out.push_back(static_cast<char>(name.size()));
    out += name;
    out.push_back(static_cast<char>(value.size()));
    out += value;
  }
  return out;
}

const std::string kPreface("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24);
const std::string kSettings = Frame(4, 0, 0, "");

std::string GrpcCall(const std::string& method, const std::string& path) {
  const std::string headers = Hpack({{":method", method},
                                     {":scheme", "http"},
                                     {":path", path},
                                     {":authority", "x"},
                                     {"content-type", "application/grpc"},
                                     {"te", "trailers"}});
  std::string msg("\0\0\0\0\x05hello", 10);  // a 5-byte gRPC message that is no protobuf
  return kPreface + kSettings + Frame(1, 4, 1, headers) + Frame(0, 1, 1, msg);
}

struct Input {
  Input(std::string n, std::string b, bool r = false, std::string t = "")
      : name(std::move(n)), bytes(std::move(b)), rst(r), then(std::move(t)) {}
  std::string name;
  std::string bytes;
  bool rst = false;
  std::string then;  // sent in a second write, 100 ms after `bytes`
};

std::vector<Input> Inputs(std::mt19937* rng) {
  auto random_bytes = [&](size_t n) {
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>((*rng)() & 0xff);
    return s;
  };
  std::vector<Input> in;
  // Garbage.
  in.push_back({"zeros", std::string(5000, '\0')});
  in.push_back({"ones", std::string(3000, '\xff')});
  in.push_back({"crlf", "\r\n\r\n\r\n\r\n"});
  in.push_back({"text", "hello, who is there?\n"});
  // HTTP/1.1: unknown paths and methods, bad request lines, oversized headers.
  for (const std::string path : {"/", "/nope", "/favicon.ico", "/../../etc/passwd"}) {
    in.push_back({"GET " + path, "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n"});
  }
  in.push_back({"GET 10 KiB path", "GET /" + std::string(10240, 'a') + " HTTP/1.1\r\n\r\n"});
  in.push_back({"POST", "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"});
  in.push_back({"POST chunked", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"});
  in.push_back(
      {"POST chunked, last chunk ends in LF",  // (Beast asserts if put() is misused)
       "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\n\r\n"});
  // A body that is only the final chunk "0\r\n", read with the headers, then one or two bytes in
  // a second read. Beast's chunk parser takes the second call for "\r\n0\r\n" and asserts it has
  // 5 bytes: with assertions on, the first two aborted the gateway (seen; third_party/BUILD).
  const std::string chunked_head =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n";
  for (const std::string then : {"\r", "x", "\r\n"}) {
    in.push_back({"POST chunked, final chunk, then " + std::to_string(then.size()) + " byte(s)",
                  chunked_head, false, then});
  }
  {
    // A chat request whose content nests a million arrays deep (2 MB): copying or printing such
    // a value recurses per level, which overflowed the gateway's stack (SIGSEGV).
    const std::string body = R"({"messages":[{"role":"user","content":)" +
                             std::string(1000000, '[') + std::string(1000000, ']') + "}]}";
    in.push_back({"POST chat, content nested 10^6 deep",
                  "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  "application/json\r\nContent-Length: " +
                      std::to_string(body.size()) + "\r\n\r\n" + body});
  }
  in.push_back({"PUT", "PUT /metrics HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" +
                           std::string(100000, 'p')});
  in.push_back({"DELETE", "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n"});
  in.push_back({"BREW", "BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n"});
  in.push_back({"CONNECT", "CONNECT example.com:443 HTTP/1.1\r\n\r\n"});
  in.push_back({"HTTP/9.9", "GET /metrics HTTP/9.9\r\n\r\n"});
  in.push_back({"request line garbage", std::string("\x01\x02\xff garbage \x7f\r\n\r\n", 17)});
  in.push_back({"no CRLF 64 KiB", std::string(65536, 'G')});
  in.push_back({"1 MiB header", "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " +
                                    std::string(1 << 20, 'h') + "\r\n\r\n"});
  {
    std::string many = "GET /metrics HTTP/1.1\r\n";
    for (int i = 0; i < 5000; ++i) many += "X-" + std::to_string(i) + ": y\r\n";
    in.push_back({"5000 headers", many + "\r\n"});
  }
  in.push_back({"h2c upgrade",
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"});
  // HTTP/2: the preface, then broken frames.
  in.push_back({"h2 preface only", kPreface});
  in.push_back({"h2 preface cut", kPreface.substr(0, 10)});
  in.push_back({"h2 SETTINGS bad length", kPreface + Frame(5, 4, 0, 0, "\xff\xff\xff\xff\xff")});
  in.push_back({"h2 SETTINGS on stream 1", kPreface + Frame(4, 0, 1, std::string(6, '\0'))});
  in.push_back({"h2 frame 16 MiB", kPreface + kSettings + Frame(0xffffff, 0, 0, 1, "x")});
  in.push_back({"h2 HEADERS garbage HPACK",
                kPreface + kSettings +
                    Frame(1, 5, 1, std::string("\xff\xff\xff\x7f", 4) + random_bytes(200))});
  in.push_back({"h2 HEADERS even stream", kPreface + kSettings + Frame(1, 5, 2, Hpack({}))});
  in.push_back({"h2 DATA on stream 0", kPreface + kSettings + Frame(0, 1, 0, "data")});
  in.push_back({"h2 DATA idle stream", kPreface + kSettings + Frame(0, 1, 7, "data")});
  in.push_back({"h2 CONTINUATION alone", kPreface + kSettings + Frame(9, 4, 1, "\x82")});
  in.push_back({"h2 WINDOW_UPDATE 0", kPreface + kSettings + Frame(8, 0, 0, std::string(4, '\0'))});
  in.push_back({"h2 WINDOW_UPDATE overflow", kPreface + kSettings +
                                                 Frame(8, 0, 0, "\x7f\xff\xff\xff") +
                                                 Frame(8, 0, 0, "\x7f\xff\xff\xff")});
  in.push_back({"h2 PING short", kPreface + kSettings + Frame(6, 0, 0, "abc")});
  in.push_back({"h2 RST idle stream", kPreface + kSettings + Frame(3, 0, 9, std::string(4, '\0'))});
  in.push_back({"h2 GOAWAY garbage", kPreface + kSettings + Frame(7, 0, 0, random_bytes(3))});
  in.push_back({"h2 PRIORITY self", kPreface + kSettings + Frame(2, 0, 3, "\0\0\0\x03\x10")});
  in.push_back({"h2 unknown type", kPreface + kSettings + Frame(0xee, 0xff, 5, random_bytes(64))});
  in.push_back({"h2 random frames", kPreface + random_bytes(4096)});
  // gRPC: methods and HTTP methods that do not exist.
  in.push_back({"grpc unknown method", GrpcCall("POST", "/dmoe.v1.Nope/Nope")});
  in.push_back({"grpc GET", GrpcCall("GET", "/grpc.health.v1.Health/Check")});
  in.push_back({"grpc bad message", GrpcCall("POST", "/grpc.health.v1.Health/Check")});
  in.push_back({"grpc 1 MiB header",
                kPreface + kSettings +
                    Frame(1, 5, 1,
                          Hpack({{":method", "POST"}, {":path", "/dmoe.v1.Dmoe/Generate"}}) +
                              std::string("\0\x7f\x81\x7f", 4) + std::string(1 << 20, 'v'))});
  // TLS.
  {
    std::string hello = random_bytes(32);
    std::string body =
        std::string("\x03\x03", 2) + hello + std::string("\0\0\x02\x13\x01\x01\0", 7);
    std::string handshake = std::string("\x01\0", 2) + static_cast<char>(body.size() >> 8) +
                            static_cast<char>(body.size()) + body;
    in.push_back({"TLS ClientHello", std::string("\x16\x03\x01", 3) +
                                         static_cast<char>(handshake.size() >> 8) +
                                         static_cast<char>(handshake.size()) + handshake});
  }
  // UCX's sockaddr connection manager framing (8-byte length, status, padding), with garbage.
  for (const uint64_t n : {uint64_t{0}, uint64_t{1}, uint64_t{100}, uint64_t{1} << 40}) {
    std::string header(16, '\0');
    std::memcpy(&header[0], &n, sizeof(n));
    in.push_back({"UCX-framed " + std::to_string(n), header + random_bytes(n < 1000 ? n : 64)});
  }
  // Random binary, and connections closed at once (with FIN and with RST).
  for (int i = 0; i < 12; ++i) {
    in.push_back({"random", random_bytes(1 + (*rng)() % 20000), i % 3 == 0});
  }
  in.push_back({"connect, close", ""});
  in.push_back({"connect, reset", "", true});
  return in;
}

// ---------------------------------------------------------------------------------------------
// The test.

struct Port {
  std::string role;
  pid_t pid;
  int port;
  std::string kind;
  int inputs = 0;
  int connections = 0;
};

class Cluster {
 public:
  Cluster() {
    dmoe_ = Runfile("cli/dmoe");
    bin_ = std::string(std::getenv("TEST_SRCDIR") ? std::getenv("TEST_SRCDIR") : ".") + "/dmoe";
    model_ = TmpDir() + "/model";
    state_ = TmpDir() + "/up.json";
    logs_ = TmpDir() + "/logs";
    g_dmoe = dmoe_;
    g_state = state_;
    g_down_argv[0] = g_dmoe.c_str();
    g_down_argv[1] = "down";
    g_down_argv[2] = "--state-file";
    g_down_argv[3] = nullptr;
    static std::string flag;
    flag = "--state-file=" + state_;  // one argv slot: Flags accepts --name=value
    g_down_argv[2] = flag.c_str();
    signal(SIGTERM, OnTerm);
  }
  ~Cluster() { Down(); }

  const std::string& dmoe() const { return dmoe_; }
  const std::string& model() const { return model_; }
  const std::string& logs() const { return logs_; }

  bool Up(std::string* out) {
    return RunCommand({dmoe_, "up", "--model", model_, "--experts", "2", "--attention", "1",
                       "--state-file", state_, "--log-dir", logs_, "--bin-dir", bin_},
                      out) == 0;
  }
  nlohmann::json State() const { return nlohmann::json::parse(ReadFile(state_), nullptr, false); }

 private:
  std::string dmoe_, bin_, model_, state_, logs_;
};

bool MetricsAnswer(int port) {
  const std::string r = Exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 3000);
  return r.rfind("HTTP/1.1 200", 0) == 0 && r.find("# TYPE") != std::string::npos;
}

// The grpc.health.v1 Check of the server as a whole answers (SERVING or not: readiness may
// legitimately say NOT_SERVING; a dead or wedged server does not answer at all).
bool HealthAnswers(const std::string& address, std::string* status) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse reply;
  const grpc::Status st = stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &reply);
  *status = st.ok() ? grpc::health::v1::HealthCheckResponse::ServingStatus_Name(reply.status())
                    : st.error_message();
  return st.ok();
}

TEST(BadInput, EveryPortOfEveryProcessSurvives) {
  const auto t0 = Clock::now();
  rlimit nofile;
  getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  setrlimit(RLIMIT_NOFILE, &nofile);

  Cluster cluster;
  std::string up;
  ASSERT_TRUE(cluster.Up(&up)) << "dmoe up failed:\n" << up;
  std::printf("%s", up.c_str());
  const nlohmann::json state = cluster.State();
  ASSERT_FALSE(state.is_discarded());
  const std::string gateway = state["gateway"].get<std::string>();

  // Every listening port of every process, named by what the state and ready files say it is.
  std::set<int> ucx_listeners;
  for (int i = 0; i < 2; ++i) {
    auto ready = nlohmann::json::parse(
        ReadFile(cluster.logs() + "/expert" + std::to_string(i) + ".ready"), nullptr, false);
    ASSERT_FALSE(ready.is_discarded());
    ucx_listeners.insert(PortOf(ready.value("ucx", ":0")));
  }
  std::vector<Port> ports;
  std::map<pid_t, std::string> grpc_of;
  std::vector<int> metrics_ports;
  for (const auto& p : state["processes"]) {
    const pid_t pid = p["pid"].get<pid_t>();
    const std::string role = p["role"].get<std::string>();
    const int grpc = PortOf(p["grpc"].get<std::string>());
    const int metrics = PortOf(p["metrics"].get<std::string>());
    grpc_of[pid] = p["grpc"].get<std::string>();
    metrics_ports.push_back(metrics);
    const std::set<int> listening = ListeningPorts(pid);
    EXPECT_TRUE(listening.count(grpc)) << role << ": gRPC port " << grpc << " not found";
    EXPECT_TRUE(listening.count(metrics)) << role << ": metrics port " << metrics << " not found";
    for (int port : listening) {
      const std::string kind = port == grpc                              ? "gRPC"
                               : port == metrics                         ? "metrics HTTP"
                               : ucx_listeners.count(port)               ? "UCX listener"
                               : role == "expert" || role == "attention" ? "UCX tcp transport"
                                                                         : "other";
      ports.push_back(Port{role, pid, port, kind});
    }
  }
  ASSERT_GE(ports.size(), 12u);

  // 1. Every input to every port, the ports in parallel.
  const auto attack_start = Clock::now();
  std::mt19937 rng(20240614);
  const std::vector<Input> inputs = Inputs(&rng);
  {
    std::vector<std::thread> threads;
    for (Port& p : ports) {
      threads.emplace_back([&p, &inputs] {
        for (const Input& in : inputs) {
          Exchange(p.port, in.bytes, 150, in.rst, in.then);
          ++p.inputs;
          ++p.connections;
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  const double inputs_s = std::chrono::duration<double>(Clock::now() - attack_start).count();

  // 2. Half-open and slowloris: on every port at once, kSilent connections that send nothing and
  // kSlow that send an HTTP request one byte per 100 ms, for 3 s; then all are closed.
  constexpr int kSilent = 8, kSlow = 16;
  const std::string slow_bytes =
      "GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\nX-a: bbbbbbbbbbbbbbbbbbbbbbbb";
  {
    std::vector<int> silent, slow;
    for (Port& p : ports) {
      for (int i = 0; i < kSilent; ++i) silent.push_back(Connect(p.port));
      for (int i = 0; i < kSlow; ++i) slow.push_back(Connect(p.port));
      p.connections += kSilent + kSlow;
      p.inputs += 2;
    }
    for (size_t k = 0; k < 30; ++k) {  // 3 s
      for (int fd : slow) {
        if (fd >= 0) send(fd, &slow_bytes[k % slow_bytes.size()], 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      std::this_thread::sleep_for(milliseconds(100));
    }
    for (int fd : silent) {
      if (fd >= 0) close(fd);
    }
    for (int fd : slow) {
      if (fd >= 0) close(fd);
    }
  }
  const double attack_s = std::chrono::duration<double>(Clock::now() - attack_start).count();

  // 3. Every process alive, every gRPC port and /metrics answering, the generation unchanged.
  std::this_thread::sleep_for(milliseconds(300));
  std::map<pid_t, bool> alive;
  std::map<pid_t, std::string> health;
  std::map<pid_t, bool> health_ok;
  for (const auto& [pid, grpc] : grpc_of) {
    alive[pid] = Alive(pid);
    health_ok[pid] = alive[pid] && HealthAnswers(grpc, &health[pid]);
  }
  std::map<int, bool> metrics_ok;
  for (int port : metrics_ports) {
    // civetweb drops what is left of the slow connections within its 2 s request timeout.
    bool ok = false;
    for (int attempt = 0; attempt < 4 && !ok; ++attempt) {
      ok = MetricsAnswer(port);
      if (!ok) std::this_thread::sleep_for(milliseconds(500));
    }
    metrics_ok[port] = ok;
  }
  std::string via, local;
  const int via_rc =
      RunCommand({cluster.dmoe(), "generate", "--target", gateway, "--tokens", "1,2,3",
                  "--max-tokens", "8", "--temperature", "0", "--print-token-ids"},
                 &via, milliseconds(30000));
  const int local_rc =
      RunCommand({cluster.dmoe(), "generate", "--model", cluster.model(), "--tokens", "1,2,3",
                  "--max-tokens", "8", "--temperature", "0", "--print-token-ids"},
                 &local, milliseconds(30000));

  int total_inputs = 0, total_connections = 0;
  std::printf("\n%-10s %-7s %-6s %-18s %7s %6s %6s  %s\n", "process", "pid", "port", "kind",
              "inputs", "conns", "alive", "answers after");
  for (const Port& p : ports) {
    std::string answers = "-";
    if (p.kind == "gRPC") answers = "health: " + health[p.pid];
    if (p.kind == "metrics HTTP") answers = metrics_ok[p.port] ? "/metrics: 200" : "/metrics: NO";
    std::printf("%-10s %-7d %-6d %-18s %7d %6d %6s  %s\n", p.role.c_str(), p.pid, p.port,
                p.kind.c_str(), p.inputs, p.connections, alive[p.pid] ? "yes" : "NO",
                answers.c_str());
    total_inputs += p.inputs;
    total_connections += p.connections;
  }
  int processes_alive = 0;
  for (const auto& [pid, ok] : alive) processes_alive += ok;
  std::printf(
      "\n%d inputs (%d connections) on %zu ports of %zu processes in %.1f s (inputs %.1f s, "
      "half-open/slowloris 3 s); %d/%zu processes alive; generation through the gateway: %s\n",
      total_inputs, total_connections, ports.size(), alive.size(), attack_s, inputs_s,
      processes_alive, alive.size(), via_rc == 0 ? via.c_str() : "FAILED\n");

  for (const auto& [pid, ok] : alive) {
    EXPECT_TRUE(ok) << "process " << pid << " died";
    EXPECT_TRUE(health_ok[pid]) << "gRPC of " << pid << " does not answer: " << health[pid];
  }
  for (const auto& [port, ok] : metrics_ok) EXPECT_TRUE(ok) << "/metrics on " << port;
  EXPECT_EQ(via_rc, 0) << via;
  EXPECT_EQ(local_rc, 0) << local;
  EXPECT_EQ(via, local) << "the cluster's generation differs from the in-process one";
  EXPECT_EQ(std::count(via.begin(), via.end(), ','), 7) << via;
  if (::testing::Test::HasFailure()) {
    for (const auto& p : state["processes"]) {
      const std::string log = ReadFile(p["log"].get<std::string>());
      std::printf("--- %s (last 3000 bytes)\n%s\n", p["log"].get<std::string>().c_str(),
                  log.substr(log.size() > 3000 ? log.size() - 3000 : 0).c_str());
    }
  }
  std::printf("dmoe up, attack, checks: %.1f s (dmoe down follows)\n",
              std::chrono::duration<double>(Clock::now() - t0).count());
}

}  // namespace
}  // namespace dmoe
