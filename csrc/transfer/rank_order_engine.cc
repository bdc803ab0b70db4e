#include "transfer/rank_order_engine.h"

#include <chrono>
#include <stdexcept>
#include <utility>

namespace flexkv {

RankOrderEngine::~RankOrderEngine() { close(); }

void RankOrderEngine::close() {
  std::vector<uint64_t> open;
  {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
    urgent_.clear();
    orders_.clear();
    for (const auto& [job, unused] : open_jobs_) open.push_back(job);
    open_jobs_.clear();
  }
  orders_cv_.notify_all();
  for (uint64_t job : open) jobs_.finish(job, "the FlexKV control plane shut down before the ranks copied");
}

void RankOrderEngine::register_host(uint64_t, uint64_t) {}
void RankOrderEngine::unregister_host(uint64_t) {}

int32_t RankOrderEngine::register_layout(const EngineLayout& layout, const HostRegion& host) {
  if (layout.num_blocks <= 0) throw std::invalid_argument("the ranks' KV memory has no blocks");
  std::lock_guard<std::mutex> g(mu_);
  const int32_t id = next_layout_++;
  layouts_[id] = LayoutInfo{layout.num_blocks, static_cast<int64_t>(host.num_blocks)};
  return id;
}

void RankOrderEngine::unregister_layout(int32_t layout_id) {
  std::lock_guard<std::mutex> g(mu_);
  layouts_.erase(layout_id);
}

uint64_t RankOrderEngine::submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks,
                                 const int64_t* host_blocks, size_t n, bool urgent, bool layerwise, uint64_t tag) {
  RankOrder order;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = layouts_.find(layout_id);
    if (it == layouts_.end()) throw std::invalid_argument("unknown layout id " + std::to_string(layout_id));
    for (size_t i = 0; i < n; ++i) {
      if (engine_blocks[i] < 0 || engine_blocks[i] >= it->second.num_blocks) {
        throw std::out_of_range("engine block id " + std::to_string(engine_blocks[i]) + " outside [0, " +
                                std::to_string(it->second.num_blocks) + ")");
      }
      if (host_blocks[i] < 0 || host_blocks[i] >= it->second.host_blocks) {
        throw std::out_of_range("host block id " + std::to_string(host_blocks[i]) + " outside [0, " +
                                std::to_string(it->second.host_blocks) + ")");
      }
    }
    if (closed_) throw std::invalid_argument("the ranks' order queue is closed");
  }
  const uint64_t job = jobs_.add(tag);
  if (n == 0) {
    jobs_.finish(job, "");
    return job;
  }
  order.job = job;
  order.tag = tag;
  order.layout_id = layout_id;
  order.direction = dir;
  order.layerwise = layerwise;
  order.engine_blocks.assign(engine_blocks, engine_blocks + n);
  order.host_blocks.assign(host_blocks, host_blocks + n);
  {
    std::lock_guard<std::mutex> g(mu_);
    open_jobs_[job] = true;
    (urgent ? urgent_ : orders_).push_back(std::move(order));
  }
  orders_cv_.notify_one();
  return job;
}

std::optional<RankOrder> RankOrderEngine::next_order(int64_t timeout_us) {
  std::unique_lock<std::mutex> lk(mu_);
  auto ready = [&] { return closed_ || !urgent_.empty() || !orders_.empty(); };
  if (timeout_us < 0) {
    orders_cv_.wait(lk, ready);
  } else if (!orders_cv_.wait_for(lk, std::chrono::microseconds(timeout_us), ready)) {
    return std::nullopt;
  }
  if (closed_) return std::nullopt;
  auto& q = urgent_.empty() ? orders_ : urgent_;
  RankOrder out = std::move(q.front());
  q.pop_front();
  return out;
}

void RankOrderEngine::finish(uint64_t job, const std::string& error) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (open_jobs_.erase(job) == 0) return;
  }
  jobs_.finish(job, error);
}

bool RankOrderEngine::wait(uint64_t job, int64_t timeout_us, std::string* error) {
  return jobs_.wait(job, timeout_us, error);
}

std::optional<CopyCompletion> RankOrderEngine::next_completion(int64_t timeout_us) {
  return jobs_.next_completion(timeout_us);
}

void RankOrderEngine::interrupt() { jobs_.interrupt(); }
void RankOrderEngine::resume() { jobs_.resume(); }
size_t RankOrderEngine::in_flight() const { return jobs_.in_flight(); }
void RankOrderEngine::wait_group(uint64_t job, int32_t) { jobs_.wait_finished(job); }

void RankOrderEngine::stream_wait_group(uint64_t, int32_t, void*) {
  throw std::logic_error("the ranks' copies run in their own processes: wait_layer with a stream is theirs");
}

}  // namespace flexkv
