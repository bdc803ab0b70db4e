#include "transfer/copy_engine_base.h"

#include <stdexcept>
#include <utility>

namespace flexkv {
namespace {

bool overlap(uint64_t a, uint64_t a_bytes, uint64_t b, uint64_t b_bytes) { return a < b + b_bytes && b < a + a_bytes; }

}  // namespace

CopyEngineBase::Range* CopyEngineBase::range_containing(uint64_t base, uint64_t bytes) {
  for (Range& r : ranges_) {
    if (base >= r.base && base + bytes <= r.base + r.bytes) return &r;
  }
  return nullptr;
}

bool CopyEngineBase::overlaps_pending(uint64_t base, uint64_t bytes) const {
  for (const Range& r : ranges_) {
    if (r.pending && overlap(base, bytes, r.base, r.bytes)) return true;
  }
  return false;
}

void CopyEngineBase::register_host(uint64_t base, uint64_t bytes) {
  if (base == 0 || bytes == 0) throw std::invalid_argument("register_host: empty range");
  if (base + bytes < base) throw std::invalid_argument("register_host: the range wraps around the address space");
  uint64_t generation;
  {
    std::unique_lock<std::mutex> lk(mu_);
    ranges_cv_.wait(lk, [&] { return !overlaps_pending(base, bytes); });
    if (range_containing(base, bytes) != nullptr) return;
    for (const Range& r : ranges_) {
      if (overlap(base, bytes, r.base, r.bytes)) {
        throw std::invalid_argument("register_host: the range overlaps a registered range without lying inside it");
      }
    }
    generation = next_generation_++;
    ranges_.push_back(Range{base, bytes, Pinned{}, generation, true});
  }
  Pinned pinned;
  try {
    pinned = pin(base, bytes);
  } catch (...) {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = ranges_.begin(); it != ranges_.end(); ++it) {
      if (it->generation == generation) {
        ranges_.erase(it);
        break;
      }
    }
    ranges_cv_.notify_all();
    throw;
  }
  std::lock_guard<std::mutex> g(mu_);
  for (Range& r : ranges_) {
    if (r.generation == generation) {
      r.pinned = pinned;
      r.pending = false;
    }
  }
  ranges_cv_.notify_all();
}

void CopyEngineBase::unregister_host(uint64_t base) {
  Range removed;
  std::vector<std::shared_ptr<const Layout>> forgotten;  // released with no lock held
  {
    std::unique_lock<std::mutex> lk(mu_);
    ranges_cv_.wait(lk, [&] {
      for (const Range& r : ranges_) {
        if (r.base == base && r.pending) return false;
      }
      return true;
    });
    Range* r = nullptr;
    for (Range& x : ranges_) {
      if (x.base == base) r = &x;
    }
    if (r == nullptr) throw std::invalid_argument("unregister_host: no range registered at this address");
    r->pending = true;  // no new layout on it; a new registration of it waits until it is unpinned
    removed = *r;
    for (auto it = layouts_.begin(); it != layouts_.end();) {
      if (layout_range_[it->first] == removed.generation) {
        forgotten.push_back(std::move(it->second));
        layout_range_.erase(it->first);
        it = layouts_.erase(it);
      } else {
        ++it;
      }
    }
  }
  forgotten.clear();
  jobs_.drain();  // every job that can touch the range was added before its layouts were forgotten
  unpin(removed.base, removed.pinned);
  std::lock_guard<std::mutex> g(mu_);
  for (auto it = ranges_.begin(); it != ranges_.end(); ++it) {
    if (it->generation == removed.generation) {
      ranges_.erase(it);
      break;
    }
  }
  ranges_cv_.notify_all();
}

int32_t CopyEngineBase::register_layout(const EngineLayout& layout, const HostRegion& host) {
  validate_layout(layout, host);
  if (host.num_blocks <= 0) throw std::invalid_argument("the host region has no blocks");
  const uint64_t host_bytes = host.block_bytes * static_cast<uint64_t>(host.num_blocks);
  auto made = std::make_shared<Layout>();
  made->layout = layout;
  made->host = host;
  uint64_t generation;
  {
    std::lock_guard<std::mutex> g(mu_);
    const Range* r = range_containing(host.base, host_bytes);
    if (r == nullptr || r->pending) {
      throw std::invalid_argument("the host region is not registered with the " + name() +
                                  " copy engine; call register_host on the CPU tier's memory first");
    }
    made->host_device_base = r->pinned.device_base + (host.base - r->base);
    generation = r->generation;
  }
  made->engine_data = prepare_layout(*made);
  std::lock_guard<std::mutex> g(mu_);
  bool still = false;
  for (const Range& r : ranges_) still |= r.generation == generation && !r.pending;
  if (!still) throw std::invalid_argument("register_layout: its host range was unregistered meanwhile");
  const int32_t id = next_layout_++;
  layouts_[id] = std::move(made);
  layout_range_[id] = generation;
  return id;
}

void CopyEngineBase::unregister_layout(int32_t layout_id) {
  std::shared_ptr<const Layout> forgotten;
  std::lock_guard<std::mutex> g(mu_);
  auto it = layouts_.find(layout_id);
  if (it == layouts_.end()) {
    throw std::invalid_argument("unregister_layout: unknown layout id " + std::to_string(layout_id));
  }
  forgotten = std::move(it->second);
  layouts_.erase(it);
  layout_range_.erase(layout_id);
}

std::shared_ptr<const CopyEngineBase::Layout> CopyEngineBase::find_layout(int32_t layout_id) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = layouts_.find(layout_id);
  if (it == layouts_.end()) {
    throw std::invalid_argument("unknown layout id " + std::to_string(layout_id) +
                                " (never registered, unregistered, or its host range was unregistered)");
  }
  return it->second;
}

uint64_t CopyEngineBase::add_job(int32_t layout_id, uint64_t tag, std::shared_ptr<void> payload) {
  std::lock_guard<std::mutex> g(mu_);
  if (layouts_.find(layout_id) == layouts_.end()) {
    throw std::invalid_argument("layout id " + std::to_string(layout_id) + " was unregistered during the submit");
  }
  return jobs_.add(tag, std::move(payload));
}

void CopyEngineBase::shut_down_registry() {
  jobs_.drain();
  std::vector<Range> ranges;
  std::unordered_map<int32_t, std::shared_ptr<const Layout>> layouts;
  {
    std::lock_guard<std::mutex> g(mu_);
    ranges.swap(ranges_);
    layouts.swap(layouts_);
    layout_range_.clear();
  }
  layouts.clear();
  jobs_.release_payloads();
  for (const Range& r : ranges) {
    if (!r.pending) unpin(r.base, r.pinned);
  }
}

bool CopyEngineBase::wait(uint64_t job, int64_t timeout_us, std::string* error) {
  return jobs_.wait(job, timeout_us, error);
}

std::optional<CopyCompletion> CopyEngineBase::next_completion(int64_t timeout_us) {
  return jobs_.next_completion(timeout_us);
}

void CopyEngineBase::interrupt() { jobs_.interrupt(); }
void CopyEngineBase::resume() { jobs_.resume(); }
size_t CopyEngineBase::in_flight() const { return jobs_.in_flight(); }

}  // namespace flexkv
