// The IPC test fabric's host rendezvous (runtime/ipc_rendezvous.hpp).
#include "runtime/ipc_rendezvous.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "runtime/check.hpp"

namespace openep::detail {
namespace {

using Clock = std::chrono::steady_clock;

// The message of one exchange: who, which exchange, the value, whether a descriptor rides along.
struct Header {
  uint32_t magic = 0x4f504950;  // "OPIP"
  int32_t from = -1;
  uint64_t seq = 0;
  uint64_t value = 0;
  int32_t has_fd = 0;
};

sockaddr_un address(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return a;
}

}  // namespace

IpcEndpoint::IpcEndpoint(const testing::IpcFabricOptions& o) : o_(o) {
  const std::string path = socket_path(o.rank);
  OPENEP_CHECK_ARG(path.size() < sizeof(sockaddr_un::sun_path), "IpcFabricOptions::rendezvous_dir is too long for a "
                   "Unix socket path (", path.size(), " bytes with the file name, at most ",
                   sizeof(sockaddr_un::sun_path) - 1, "): ", path);
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  OPENEP_CHECK(listen_fd_ >= 0, ErrorCode::kInternal, "IPC fabric: socket(): ", std::strerror(errno));
  ::unlink(path.c_str());
  const sockaddr_un a = address(path);
  if (::bind(listen_fd_, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) != 0 || ::listen(listen_fd_, 256) != 0) {
    const int err = errno;
    ::close(listen_fd_);
    listen_fd_ = -1;
    OPENEP_CHECK_ARG(false, "IpcFabricOptions::rendezvous_dir must be an existing, writable directory: binding ", path,
                     " failed: ", std::strerror(err));
  }
}

IpcEndpoint::~IpcEndpoint() {
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    ::unlink(socket_path(o_.rank).c_str());
  }
  for (auto& [key, r] : stash_)
    if (r.fd >= 0) ::close(r.fd);
}

std::string IpcEndpoint::socket_path(int rank) const {
  return o_.rendezvous_dir + "/openep-ipc-" + std::to_string(rank) + ".sock";
}

std::vector<IpcEndpoint::Received> IpcEndpoint::exchange(uint64_t value, int fd, const char* what) {
  const uint64_t seq = ++seq_;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(o_.rendezvous_timeout_seconds));
  for (int peer = 0; peer < o_.num_ranks; ++peer)
    if (peer != o_.rank) send_to(peer, seq, value, fd, deadline, what);
  for (;;) {
    std::vector<int> missing;
    for (int peer = 0; peer < o_.num_ranks; ++peer)
      if (peer != o_.rank && stash_.find({seq, peer}) == stash_.end()) missing.push_back(peer);
    if (missing.empty()) break;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) {
      std::string names;
      for (int m : missing) names += (names.empty() ? "" : ", ") + std::to_string(m);
      OPENEP_CHECK(false, ErrorCode::kTimeout, "IPC fabric: rank ", o_.rank, " waited ", o_.rendezvous_timeout_seconds,
                   " s in ", what, " (exchange ", seq, ") for rank(s) ", names);
    }
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1000))) > 0) receive_one();
  }
  std::vector<Received> out(o_.num_ranks);
  out[o_.rank].value = value;
  for (int peer = 0; peer < o_.num_ranks; ++peer) {
    if (peer == o_.rank) continue;
    auto it = stash_.find({seq, peer});
    out[peer] = it->second;
    stash_.erase(it);
  }
  return out;
}

void IpcEndpoint::send_to(int peer, uint64_t seq, uint64_t value, int fd, Clock::time_point deadline,
                          const char* what) {
  const std::string path = socket_path(peer);
  const sockaddr_un a = address(path);
  for (;;) {
    const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    OPENEP_CHECK(s >= 0, ErrorCode::kInternal, "IPC fabric: socket(): ", std::strerror(errno));
    if (::connect(s, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0) {
      Header h;
      h.from = o_.rank;
      h.seq = seq;
      h.value = value;
      h.has_fd = fd >= 0 ? 1 : 0;
      iovec io{&h, sizeof(h)};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
      msghdr m{};
      m.msg_iov = &io;
      m.msg_iovlen = 1;
      if (fd >= 0) {
        m.msg_control = control;
        m.msg_controllen = sizeof(control);
        cmsghdr* c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
      }
      const ssize_t n = ::sendmsg(s, &m, MSG_NOSIGNAL);
      const int err = errno;
      ::close(s);
      OPENEP_CHECK(n == static_cast<ssize_t>(sizeof(h)), ErrorCode::kInternal, "IPC fabric: rank ", o_.rank,
                   " could not send to rank ", peer, " in ", what, ": ", std::strerror(err));
      return;
    }
    const int err = errno;
    ::close(s);
    // The peer has not bound its socket yet (ENOENT), is gone (ECONNREFUSED) or its backlog is full: retry.
    OPENEP_CHECK(Clock::now() < deadline, ErrorCode::kTimeout, "IPC fabric: rank ", o_.rank, " could not reach rank ",
                 peer, " at ", path, " within ", o_.rendezvous_timeout_seconds, " s in ", what, " (last error: ",
                 std::strerror(err), ")");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void IpcEndpoint::receive_one() {
  const int s = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (s < 0) return;
  Header h;
  iovec io{&h, sizeof(h)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr m{};
  m.msg_iov = &io;
  m.msg_iovlen = 1;
  m.msg_control = control;
  m.msg_controllen = sizeof(control);
  const ssize_t n = ::recvmsg(s, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC);
  ::close(s);
  int fd = -1;
  for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  if (n != static_cast<ssize_t>(sizeof(h)) || h.magic != Header{}.magic || h.from < 0 || h.from >= o_.num_ranks ||
      h.from == o_.rank || (h.has_fd != 0) != (fd >= 0) || stash_.count({h.seq, h.from}) != 0) {
    if (fd >= 0) ::close(fd);
    std::fprintf(stderr, "OpenEP IPC fabric: rank %d dropped a malformed rendezvous message\n", o_.rank);
    return;
  }
  stash_[{h.seq, h.from}] = Received{h.value, fd};
}

}  // namespace openep::detail
