// FaultInjectingEnv: fails or tears chosen requests of another env, so the
// SSD tier's handling of I/O errors and torn writes can be tested without a
// failing disk (the model is LevelDB's fault_injection_test).
#include <cerrno>
#include <stdexcept>
#include <utility>
#include <vector>

#include "transfer/io_env.h"

namespace flexkv {

FaultInjectingEnv::FaultInjectingEnv(std::unique_ptr<IoEnv> base) : base_(std::move(base)) {
  if (!base_) throw std::invalid_argument("FaultInjectingEnv needs a base env");
}

void FaultInjectingEnv::fail_writes(int err, int64_t after, int64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  writes_ = Rule{err, after < 0 ? 0 : after, count};
}

void FaultInjectingEnv::fail_reads(int err, int64_t after, int64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  reads_ = Rule{err, after < 0 ? 0 : after, count};
}

void FaultInjectingEnv::tear_writes(int64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  tear_ = count;
}

void FaultInjectingEnv::fail_open(int err) {
  std::lock_guard<std::mutex> lock(mu_);
  open_err_ = err;
}

void FaultInjectingEnv::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  writes_ = Rule{};
  reads_ = Rule{};
  tear_ = 0;
  open_err_ = 0;
}

std::string FaultInjectingEnv::name() const { return "fault(" + base_->name() + ")"; }

void FaultInjectingEnv::run(const IoRequest* reqs, size_t n, int64_t* results) {
  run_with_hooks(reqs, n, results, IoHooks{});
}

void FaultInjectingEnv::run_with_hooks(const IoRequest* reqs, size_t n, int64_t* results, const IoHooks& hooks) {
  if (n == 0) return;
  // Decide each request's fate up front, in order.
  std::vector<size_t> failed;
  std::vector<size_t> passed;        // index in reqs of each request handed to the base
  std::vector<IoRequest> sub;        // what the base runs
  std::vector<int64_t> full;         // per passed request: the bytes to report for a torn write, else -1
  // The shortened iovecs of torn writes; moving an inner vector keeps its buffer, so sub may point into them.
  std::vector<std::vector<struct iovec>> torn_iov;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < n; ++i) {
      const IoRequest& q = reqs[i];
      Rule& rule = q.write ? writes_ : reads_;
      if (rule.count != 0 && rule.after == 0) {
        results[i] = -static_cast<int64_t>(rule.err);
        if (rule.count > 0) --rule.count;
        failed.push_back(i);
        continue;
      }
      if (rule.count != 0) --rule.after;
      passed.push_back(i);
      sub.push_back(q);
      full.push_back(-1);
      if (q.write && tear_ != 0 && q.iovcnt > 0) {
        if (tear_ > 0) --tear_;
        uint64_t total = 0;
        for (int k = 0; k < q.iovcnt; ++k) total += q.iov[k].iov_len;
        uint64_t keep = (total / 2) & ~uint64_t{4095};
        std::vector<struct iovec> iov;
        for (int k = 0; k < q.iovcnt && keep > 0; ++k) {
          const uint64_t len = q.iov[k].iov_len < keep ? q.iov[k].iov_len : keep;
          iov.push_back({q.iov[k].iov_base, static_cast<size_t>(len)});
          keep -= len;
        }
        full.back() = static_cast<int64_t>(total);
        torn_iov.push_back(std::move(iov));
        sub.back().iov = torn_iov.back().data();
        sub.back().iovcnt = static_cast<int>(torn_iov.back().size());
      }
    }
  }
  for (size_t i : failed) {
    if (hooks.prepare) hooks.prepare(i);
    if (hooks.complete) hooks.complete(i, results[i]);
  }
  if (sub.empty()) return;

  // A torn write that the base completed reports the full length.
  auto reported = [&](size_t j, int64_t r) { return full[j] >= 0 && r >= 0 ? full[j] : r; };
  std::vector<int64_t> sub_results(sub.size());
  IoHooks sub_hooks;
  if (hooks.prepare) sub_hooks.prepare = [&](size_t j) { hooks.prepare(passed[j]); };
  if (hooks.complete) sub_hooks.complete = [&](size_t j, int64_t r) { hooks.complete(passed[j], reported(j, r)); };
  base_->run_with_hooks(sub.data(), sub.size(), sub_results.data(), sub_hooks);
  for (size_t j = 0; j < sub.size(); ++j) results[passed[j]] = reported(j, sub_results[j]);
}

int FaultInjectingEnv::open_file(const std::string& path, uint64_t size) {
  int err;
  {
    std::lock_guard<std::mutex> lock(mu_);
    err = open_err_;
  }
  if (err != 0) throw io_detail::open_file_error(path, size, err);
  return base_->open_file(path, size);
}

void FaultInjectingEnv::close_file(int fd) { base_->close_file(fd); }

}  // namespace flexkv
