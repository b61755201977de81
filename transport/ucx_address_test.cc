// Worker addresses from peers are checked before UCX sees them: Debian's UCX 1.13 aborts the whole
// process on an address whose header has a version it does not know (address.c:1051), and reads
// an address without knowing its length. Only the header can be checked here: see
// AddressHeadersUcxAbortsOnAreRefused. A node is given such bytes by a router's map, a
// listener's answer (client side) and a client's hello (server side). Over tcp on lo.
#include <ucp/api/ucp.h>

#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "transport/ucx.h"
#include "transport/ucx_worker.h"

namespace dmoe::transport {
namespace {

using ucx_internal::FromHex;
using ucx_internal::kAmHello;
using ucx_internal::kWorkerAddressPadding;
using ucx_internal::PeerWorkerAddress;
using ucx_internal::ToHex;

void UcxOnLoopback() {
  setenv("UCX_TLS", "tcp,self", 1);
  setenv("UCX_NET_DEVICES", "lo", 1);
  setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
}

std::vector<uint8_t> Bytes(const std::string& worker_address) {
  std::vector<uint8_t> b;
  EXPECT_TRUE(FromHex(worker_address.substr(9), &b));
  return b;
}

TEST(PeerWorkerAddress, RefusesHeadersUcxAbortsOnAndPadsTheRest) {
  const uint8_t v9[] = {0x09, 0x00, 0x01, 0x02};
  EXPECT_TRUE(PeerWorkerAddress(v9, sizeof(v9)).empty());
  const uint8_t one[] = {0x01};
  EXPECT_TRUE(PeerWorkerAddress(one, 1).empty());
  const uint8_t v2[] = {0x01, 0x10, 0x33};
  const std::vector<uint8_t> p = PeerWorkerAddress(v2, sizeof(v2));
  ASSERT_EQ(p.size(), sizeof(v2) + kWorkerAddressPadding);
  EXPECT_EQ(std::vector<uint8_t>(p.begin(), p.begin() + 3), std::vector<uint8_t>(v2, v2 + 3));
  for (size_t i = 3; i < p.size(); ++i) ASSERT_EQ(p[i], 0) << i;
}

// Connect to worker addresses whose header UCX would abort on (every version but V1 and V2, and
// addresses too short for a header): INVALID_ARGUMENT, never an abort (one wrong header byte
// aborted the process before). Forged content behind a valid header is not covered: UCX 1.13 may
// still abort on it, in its wireup (ucp_request.c:684 "got REP message" was seen with a random
// mutation of a real address), which is why only cluster-token holders' hellos reach it.
TEST(UcxClient, AddressHeadersUcxAbortsOnAreRefused) {
  UcxOnLoopback();
  auto server = NewUcxServer();
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Listen("127.0.0.1:0").ok());
  const std::vector<uint8_t> real = Bytes((*server)->WorkerAddress());
  auto client = NewUcxClient();
  ASSERT_TRUE(client.ok()) << client.status();
  std::mt19937 rng(7);
  std::vector<std::vector<uint8_t>> forged = {{0x01}, {0x00}};
  for (uint8_t header = 2; header < 16; ++header) {
    std::vector<uint8_t> a = real;
    a[0] = static_cast<uint8_t>((a[0] & 0xf0) | header);
    forged.push_back(a);
    std::vector<uint8_t> r(2 + rng() % 160);
    for (uint8_t& b : r) b = static_cast<uint8_t>(rng());
    r[0] = static_cast<uint8_t>((r[0] & 0xf0) | header);
    forged.push_back(r);
  }
  for (const std::vector<uint8_t>& a : forged) {
    auto peer = (*client)->Connect("ucx-addr:" + ToHex(a.data(), a.size()));
    EXPECT_EQ(peer.status().code(), absl::StatusCode::kInvalidArgument) << peer.status();
  }
  // (This process survived them. No connection to the real address here: one left mid-wireup
  // when the server shuts down can trip another of UCX's assertions, a race of its own.)
  (*server)->Shutdown();
}

// A raw UCX peer sends the server a hello whose address has a header UCX would abort on: the
// server counts a peer error and goes on serving.
TEST(UcxServer, HelloWithAForgedAddressIsAPeerErrorNotAnAbort) {
  UcxOnLoopback();
  auto server = NewUcxServer();
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Listen("127.0.0.1:0").ok());
  const std::vector<uint8_t> target = Bytes((*server)->WorkerAddress());

  ucp_config_t* config = nullptr;
  ASSERT_EQ(ucp_config_read(nullptr, nullptr, &config), UCS_OK);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM;
  ucp_context_h context = nullptr;
  ASSERT_EQ(ucp_init(&params, config, &context), UCS_OK);
  ucp_config_release(config);
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  ASSERT_EQ(ucp_worker_create(context, &wp, &worker), UCS_OK);
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
  ep.address = reinterpret_cast<const ucp_address_t*>(target.data());
  ucp_ep_h handle = nullptr;
  ASSERT_EQ(ucp_ep_create(worker, &ep, &handle), UCS_OK);
  std::vector<uint8_t> forged(64, 0x5a);
  forged[0] = 0x09;  // version 9
  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  prm.flags = UCP_AM_SEND_FLAG_REPLY;
  void* req = ucp_am_send_nbx(handle, kAmHello, nullptr, 0, forged.data(), forged.size(), &prm);
  ASSERT_FALSE(UCS_PTR_IS_ERR(req));
  const auto until = Clock::now() + std::chrono::seconds(20);
  while ((*server)->stats().peer_errors == 0 && Clock::now() < until) ucp_worker_progress(worker);
  EXPECT_EQ((*server)->stats().peer_errors, 1u);
  if (req != nullptr && UCS_PTR_IS_PTR(req)) {
    while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(req);
  }
  // The server still serves a real client.
  auto client = NewUcxClient();
  ASSERT_TRUE(client.ok());
  auto peer = (*client)->Connect((*server)->WorkerAddress());
  ASSERT_TRUE(peer.ok()) << peer.status();
  std::thread echo([&] {
    std::vector<ServerRequest> batch;
    for (int i = 0; i < 500 && batch.empty(); ++i) {
      (*server)->Receive(std::chrono::milliseconds(20), &batch);
    }
    for (ServerRequest& r : batch) (*server)->Reply(r.token, std::move(r.bytes));
  });
  auto id = (*client)->Post(*peer, std::vector<uint8_t>{1, 2, 3});
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<uint8_t> reply;
  EXPECT_TRUE((*client)->Wait(*id, Clock::now() + std::chrono::seconds(20), &reply).ok());
  echo.join();
  EXPECT_EQ(reply, (std::vector<uint8_t>{1, 2, 3}));
  ucp_request_param_t close{};
  close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  close.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* c = ucp_ep_close_nbx(handle, &close);
  if (c != nullptr && UCS_PTR_IS_PTR(c)) {
    while (ucp_request_check_status(c) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(c);
  }
  ucp_worker_destroy(worker);
  ucp_cleanup(context);
  (*server)->Shutdown();
}

}  // namespace
}  // namespace dmoe::transport
