#include "pool/region_share.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cinttypes>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

namespace flexkv {
namespace {

// The sockaddr of the abstract name "@rest": sun_path is a NUL then `rest`, with no terminator.
socklen_t abstract_address(const std::string& name, sockaddr_un* addr) {
  if (name.size() < 2 || name[0] != '@' || name.size() > sizeof addr->sun_path) {
    throw std::invalid_argument("'" + name + "' is not an abstract socket name (\"@...\", at most " +
                                std::to_string(sizeof addr->sun_path) + " bytes)");
  }
  std::memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  std::memcpy(addr->sun_path + 1, name.data() + 1, name.size() - 1);
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + name.size());
}

std::string random_hex16() {
  std::random_device rd;  // getrandom(2): names are not guessable ahead of time
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016" PRIx64, v);
  return buf;
}

void close_all(std::vector<int>& fds) {
  for (int fd : fds) ::close(fd);
  fds.clear();
}

// Regions whose servers share them with mappers of this process, by server name.
struct LocalShare {
  MemfdRegion region;
  RegionGeometry geometry;
};
std::mutex local_mu;
std::map<std::string, LocalShare>& local_shares() {
  static auto* shares = new std::map<std::string, LocalShare>();  // never destroyed: servers outlive exit order
  return *shares;
}

// "size=... num_blocks=... block_stride=... block_bytes=...": the geometry as the server's answer carries it.
std::string geometry_text(const RegionGeometry& g) {
  char text[160];
  std::snprintf(text, sizeof text, "size=%" PRIu64 " num_blocks=%" PRId64 " block_stride=%" PRIu64
                " block_bytes=%" PRIu64, g.size, g.num_blocks, g.block_stride, g.block_bytes);
  return text;
}

// Throws unless `got` (what the owner announces) is `expected` (what the mapper was told) in every field.
void check_geometry(const std::string& name, const RegionGeometry& got, const RegionGeometry& expected) {
  if (got.size != expected.size || got.num_blocks != expected.num_blocks || got.block_stride != expected.block_stride ||
      got.block_bytes != expected.block_bytes) {
    throw std::runtime_error("the memory at " + name + " has " + geometry_text(got) + ", not the " +
                             geometry_text(expected) + " this process was told: its tier info belongs to another "
                             "cache");
  }
}

}  // namespace

RegionServer::RegionServer(int fd, const RegionGeometry& geometry, const std::string& prefix, uid_t owner_uid)
    : geometry_(geometry), owner_uid_(owner_uid) {
  auto fail = [this](const std::string& what) {
    const int err = errno;
    stop();
    return std::runtime_error("cannot share the memory: " + what + ": " + std::strerror(err));
  };
  fd_ = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (fd_ < 0) throw fail("dup");
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) throw fail("eventfd");
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) throw fail("socket");
  for (int attempt = 0;; ++attempt) {  // a random name taken already (vanishingly rare): draw another
    name_ = "@" + prefix + "-" + std::to_string(::getpid()) + "-" + random_hex16();
    sockaddr_un addr;
    const socklen_t len = abstract_address(name_, &addr);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), len) == 0) break;
    if (errno != EADDRINUSE || attempt == 8) throw fail("bind " + name_);
  }
  if (::listen(listen_fd_, 64) != 0) throw fail("listen");
  thread_ = std::thread([this] { serve(); });
}

RegionServer::~RegionServer() { stop(); }

void RegionServer::share_in_process(const MemfdRegion& owner) {
  std::lock_guard<std::mutex> lock(local_mu);
  local_shares()[name_] = LocalShare{owner.alias(), geometry_};
}

void RegionServer::stop() {
  {
    std::lock_guard<std::mutex> lock(local_mu);
    local_shares().erase(name_);
  }
  if (thread_.joinable()) {
    const uint64_t one = 1;
    // The eventfd is non-blocking and its counter far from full: this write cannot block or fail.
    [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof one);
    thread_.join();
  }
  for (int* f : {&listen_fd_, &wake_fd_, &fd_}) {
    if (*f >= 0) ::close(std::exchange(*f, -1));
  }
}

void RegionServer::serve() {
  for (;;) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;  // cannot happen with valid descriptors; the name is unbound at stop()
    }
    if (p[1].revents != 0) return;
    const int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (conn < 0) {
      // Out of descriptors (EMFILE, ENFILE, ENOBUFS): back off instead of spinning on the pending peer.
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
        pollfd w{wake_fd_, POLLIN, 0};
        if (::poll(&w, 1, 100) > 0) return;
      }
      continue;
    }
    answer(conn);
    ::close(conn);
  }
}

void RegionServer::answer(int conn) {
  ucred cred{};
  socklen_t len = sizeof cred;
  char line[256];
  const bool known = ::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0;
  if (!known || cred.uid != owner_uid_) {
    std::snprintf(line, sizeof line, "refused peer uid %s: the memory belongs to uid %u\n",
                  known ? std::to_string(cred.uid).c_str() : "unknown", static_cast<unsigned>(owner_uid_));
    ++refused_;
    // The peer may never read: MSG_DONTWAIT, and a new connection's buffer always takes one line.
    [[maybe_unused]] const ssize_t n = ::send(conn, line, std::strlen(line), MSG_DONTWAIT | MSG_NOSIGNAL);
    return;
  }
  std::snprintf(line, sizeof line, "ok %s\n", geometry_text(geometry_).c_str());
  iovec iov{line, std::strlen(line)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd_, sizeof(int));
  // Once queued, the descriptor travels with the peer's socket: it is the peer's to take or to drop.
  if (::sendmsg(conn, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) > 0) ++served_;
}

MemfdRegion map_shared_region(const std::string& name, const RegionGeometry& expected, double timeout_s) {
  {
    std::lock_guard<std::mutex> lock(local_mu);
    auto it = local_shares().find(name);
    if (it != local_shares().end()) {
      check_geometry(name, it->second.geometry, expected);
      return it->second.region.alias();
    }
  }
  sockaddr_un addr;
  const socklen_t addr_len = abstract_address(name, &addr);
  const int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0) throw std::runtime_error(std::string("cannot create a socket: ") + std::strerror(errno));
  std::vector<int> fds;
  auto fail = [&](const std::string& why) {
    close_all(fds);
    ::close(sock);
    return std::runtime_error(why);
  };
  timeval tv{};
  const double t = std::max(0.001, timeout_s);
  tv.tv_sec = static_cast<time_t>(t);
  tv.tv_usec = static_cast<suseconds_t>((t - std::floor(t)) * 1e6);
  ::setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);  // bounds connect() on a full backlog
  if (::connect(sock, reinterpret_cast<sockaddr*>(&addr), addr_len) != 0) {
    const int err = errno;
    if (err == ECONNREFUSED || err == ENOENT) {
      throw fail("nothing listens at " + name + ": the process that owns the memory has exited or closed it "
                 "(its pid is the number after the prefix); start the engine again");
    }
    throw fail("cannot connect to " + name + ": " + std::strerror(err));
  }
  std::string reply;
  for (;;) {
    char buf[256];
    iovec iov{buf, sizeof buf};
    alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        throw fail("the process behind " + name + " did not answer within " + std::to_string(timeout_s) +
                   " s; it may be stopped or overloaded");
      }
      throw fail("cannot read from " + name + ": " + std::strerror(err));
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds.push_back(fd);
      }
    }
    reply.append(buf, static_cast<size_t>(n));
    if (n == 0 || reply.find('\n') != std::string::npos || reply.size() > 1024) break;
  }
  reply = reply.substr(0, reply.find('\n'));
  if (reply.compare(0, 8, "refused ") == 0) {
    throw fail("the owner of " + name + " refused this process (" + reply.substr(8) + "); run it as the same "
               "user as the process that owns the memory");
  }
  long long num_blocks = 0;
  unsigned long long size = 0, stride = 0, bytes = 0;
  if (std::sscanf(reply.c_str(), "ok size=%llu num_blocks=%lld block_stride=%llu block_bytes=%llu", &size,
                  &num_blocks, &stride, &bytes) != 4 || fds.size() != 1) {
    throw fail("unexpected answer from " + name + ": '" + reply + "' with " + std::to_string(fds.size()) +
               " descriptor(s)");
  }
  const RegionGeometry got{size, num_blocks, stride, bytes};
  try {
    check_geometry(name, got, expected);
  } catch (const std::runtime_error& e) {
    throw fail(e.what());
  }
  if (got.size < static_cast<uint64_t>(got.num_blocks) * got.block_stride || got.block_bytes > got.block_stride) {
    throw fail("the memory at " + name + " announces an impossible geometry: " + reply);
  }
  try {
    MemfdRegion region = MemfdRegion::map(fds[0], got.size);
    close_all(fds);
    ::close(sock);
    region.prefault_in_background();  // this process copies into it
    return region;
  } catch (const std::exception& e) {
    throw fail("cannot map the memory from " + name + ": " + e.what());
  }
}

}  // namespace flexkv
