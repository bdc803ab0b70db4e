#include "transfer/job_table.h"

#include <chrono>
#include <stdexcept>
#include <utility>
#include <vector>

namespace flexkv {
namespace {

// Waits on `cv` until `ready()`, for at most timeout_us (negative: no limit).
// Returns ready(). Timeouts beyond a day count as no limit, so that the
// deadline arithmetic cannot overflow.
template <class Ready>
bool wait_for(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, int64_t timeout_us, Ready ready) {
  constexpr int64_t kDayUs = int64_t{86400} * 1000 * 1000;
  if (timeout_us < 0 || timeout_us > kDayUs) {
    cv.wait(lk, ready);
    return true;
  }
  return cv.wait_for(lk, std::chrono::microseconds(timeout_us), ready);
}

}  // namespace

JobTable::~JobTable() = default;

uint64_t JobTable::add(uint64_t tag, std::shared_ptr<void> payload) {
  std::lock_guard<std::mutex> g(mu_);
  const uint64_t id = next_id_++;
  Entry& e = jobs_[id];
  e.tag = tag;
  e.payload = std::move(payload);
  ++in_flight_;
  return id;
}

void JobTable::finish(uint64_t job, std::string error) {
  // Notifies with the mutex held: once the last job is finished, a drain() may return and
  // the table be destroyed, which must not happen while this call still touches cv_.
  std::lock_guard<std::mutex> g(mu_);
  auto it = jobs_.find(job);
  if (it == jobs_.end() || it->second.finished) return;  // an engine bug; nothing sane to do in a callback
  it->second.finished = true;
  it->second.error = std::move(error);
  order_.push_back(job);
  ++ready_;
  --in_flight_;
  cv_.notify_all();
}

void JobTable::check_issued(uint64_t job) const {
  if (job == 0 || job >= next_id_) {
    throw std::out_of_range("copy job " + std::to_string(job) + " was never submitted to this engine");
  }
}

bool JobTable::wait(uint64_t job, int64_t timeout_us, std::string* error) {
  std::shared_ptr<void> dropped;  // released after the mutex: a payload's destructor may call CUDA
  {
    std::unique_lock<std::mutex> lk(mu_);
    check_issued(job);
    if (jobs_.find(job) == jobs_.end()) {
      throw std::out_of_range("copy job " + std::to_string(job) + " was already collected");
    }
    const bool done = wait_for(cv_, lk, timeout_us, [&] {
      auto it = jobs_.find(job);
      return it == jobs_.end() || it->second.finished;
    });
    auto it = jobs_.find(job);
    if (it == jobs_.end()) {
      throw std::out_of_range("copy job " + std::to_string(job) + " was collected by another caller");
    }
    if (!done) return false;
    if (error != nullptr) *error = std::move(it->second.error);
    dropped = std::move(it->second.payload);
    jobs_.erase(it);
    --ready_;
    // Completion order keeps the id until next_completion() passes it; drop such ids from the
    // front, and compact when they pile up (a caller that only ever uses wait()).
    while (!order_.empty() && jobs_.find(order_.front()) == jobs_.end()) order_.pop_front();
    if (order_.size() > 2 * ready_ + 64) {
      std::deque<uint64_t> kept;
      for (uint64_t id : order_) {
        if (jobs_.find(id) != jobs_.end()) kept.push_back(id);
      }
      order_.swap(kept);
    }
  }
  return true;
}

std::optional<CopyCompletion> JobTable::next_completion(int64_t timeout_us) {
  std::shared_ptr<void> dropped;
  CopyCompletion out;
  {
    std::unique_lock<std::mutex> lk(mu_);
    wait_for(cv_, lk, timeout_us, [&] { return interrupted_ || ready_ > 0; });
    if (interrupted_ || ready_ == 0) return std::nullopt;
    for (;;) {
      const uint64_t id = order_.front();
      order_.pop_front();
      auto it = jobs_.find(id);
      if (it == jobs_.end()) continue;  // collected by wait()
      out.job = id;
      out.tag = it->second.tag;
      out.error = std::move(it->second.error);
      dropped = std::move(it->second.payload);
      jobs_.erase(it);
      --ready_;
      break;
    }
  }
  return out;
}

void JobTable::interrupt() {
  std::lock_guard<std::mutex> g(mu_);
  interrupted_ = true;
  cv_.notify_all();
}

void JobTable::resume() {
  std::lock_guard<std::mutex> g(mu_);
  interrupted_ = false;
}

size_t JobTable::in_flight() const {
  std::lock_guard<std::mutex> g(mu_);
  return in_flight_;
}

void JobTable::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return in_flight_ == 0; });
}

void JobTable::wait_finished(uint64_t job) {
  std::unique_lock<std::mutex> lk(mu_);
  check_issued(job);
  cv_.wait(lk, [&] {
    auto it = jobs_.find(job);
    return it == jobs_.end() || it->second.finished;
  });
}

void JobTable::release_payloads() {
  std::vector<std::shared_ptr<void>> dropped;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [id, e] : jobs_) dropped.push_back(std::move(e.payload));
  }
}

std::shared_ptr<void> JobTable::payload_if_running(uint64_t job) const {
  std::lock_guard<std::mutex> g(mu_);
  check_issued(job);
  auto it = jobs_.find(job);
  if (it == jobs_.end() || it->second.finished) return nullptr;
  return it->second.payload;
}

}  // namespace flexkv
