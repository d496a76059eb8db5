// The host-side rendezvous of the IPC test fabric (openep/testing.hpp, IpcFabric): numbered all-to-all exchanges of
// one value and optionally one file descriptor between the processes of a world, over Unix-domain sockets in one
// directory. Every rank listens on <dir>/openep-ipc-<rank>.sock; an exchange sends one message to every peer
// (connect, sendmsg with SCM_RIGHTS, close), then accepts one from every peer, keeping messages of a later exchange
// that arrive early. Every wait is bounded by the rendezvous timeout. No CUDA: tests/cpu checks it with fork().
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "openep/testing.hpp"

namespace openep::detail {

class IpcEndpoint {
 public:
  struct Received {
    uint64_t value = 0;
    int fd = -1;  // -1: none; otherwise the receiver's to close
  };

  // Binds and listens on this rank's socket. Throws openep::Error (kInvalidArgument: path too long or directory
  // unusable; kInternal: a socket call failed).
  explicit IpcEndpoint(const testing::IpcFabricOptions& o);
  ~IpcEndpoint();  // closes the socket, removes its file, closes unclaimed descriptors
  IpcEndpoint(const IpcEndpoint&) = delete;
  IpcEndpoint& operator=(const IpcEndpoint&) = delete;

  int rank() const noexcept { return o_.rank; }
  int num_ranks() const noexcept { return o_.num_ranks; }
  int device() const noexcept { return o_.device; }

  // All-to-all of (value, fd) with every peer (fd -1: none; the caller keeps its own fd). Returns what each rank
  // sent, in rank order (own entry: `value`, fd -1). Throws kTimeout naming `what` and the ranks that did not
  // arrive (or could not be reached) within the rendezvous timeout.
  std::vector<Received> exchange(uint64_t value, int fd, const char* what);

 private:
  std::string socket_path(int rank) const;
  void send_to(int peer, uint64_t seq, uint64_t value, int fd, std::chrono::steady_clock::time_point deadline,
               const char* what);
  void receive_one();

  testing::IpcFabricOptions o_;
  int listen_fd_ = -1;
  uint64_t seq_ = 0;
  std::map<std::pair<uint64_t, int>, Received> stash_;
};

}  // namespace openep::detail
