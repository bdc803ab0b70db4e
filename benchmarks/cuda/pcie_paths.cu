// PCIe paths for scattered KV blocks, standalone (no FlexKV): which way of moving them between pinned host
// memory and a GPU comes nearest one contiguous cudaMemcpyAsync, in each direction and in both at once.
//
// Layout: the Qwen-32B shape in vLLM's per-layer layout, so a block is 128 chunks (64 layers x K|V) spread
// over the engine buffer (chunk (s, b) at (s * blocks + b) * chunk), and one contiguous block in host memory
// (chunk s at s * chunk), registered with cudaHostRegister as the CPU tier is. Engine and host block ids are
// random permutations; a direction moves --total-mib.
//
// Paths:
//   contiguous   one cudaMemcpyAsync of all the bytes (the ceiling every ratio divides by)
//   kernel/N     SM loads and stores across PCIe, one warp per chunk, on N thread blocks of 1024 threads
//   staged/N     the DMA engine moves whole host blocks (contiguous, >= 512 KiB) between the host and a ring
//                of device staging slots; a kernel on N thread blocks scatters (loads) or gathers (stores)
//                the chunks between the slots and the engine's blocks, device to device, pipelined
//   split/F      loads only: the fraction F of the blocks by kernel/8 and the rest by staged/4, in parallel
// Both directions at once: a load path on a high-priority stream and a store path on a low-priority one.
//
// Every path is first checked byte for byte (destinations poisoned, fresh random data, seed printed), then
// timed: best of --repeat, host clock around the submits and the final synchronize.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 benchmarks/cuda/pcie_paths.cu -o pcie_paths && ./pcie_paths
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kSegs = 64 * 2;  // layers x K|V
constexpr int kThreads = 1024;
constexpr uint8_t kPoison = 0xA5;

void check(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "line %d: %s failed: %s\n", line, what, cudaGetErrorString(e));
    std::exit(1);
  }
}
#define CK(x) check((x), #x, __LINE__)

__device__ __forceinline__ uint4 load_host(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

template <int U>
__device__ __forceinline__ void copy_chunk(uint8_t* dst, const uint8_t* src, uint64_t bytes, int lane) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint64_t count = bytes / 16;
  uint64_t i = lane;
  for (; i + (U - 1) * 32 < count; i += U * 32) {
    uint4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) r[u] = load_host(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) __stcs(d + i + u * 32, r[u]);
  }
  for (; i < count; i += 32) __stcs(d + i, load_host(s + i));
}

struct Geometry {
  uint8_t* engine;
  int64_t engine_blocks;
  uint64_t chunk;
  uint64_t block_bytes;  // = kSegs * chunk
};

// kernel/N: chunk (s, i) between engine block e[i] and host block h[i], segment-major as FlexKV's kernel.
template <bool kLoad>
__global__ void __launch_bounds__(kThreads) direct_kernel(Geometry g, uint8_t* host, const int64_t* e,
                                                          const int64_t* h, int64_t n) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t item = warp; item < n * kSegs; item += warps) {
    const int64_t s = item / n, i = item - s * n;
    uint8_t* eng = g.engine + (s * g.engine_blocks + e[i]) * g.chunk;
    uint8_t* hst = host + h[i] * g.block_bytes + s * g.chunk;
    if (kLoad) {
      copy_chunk<8>(eng, hst, g.chunk, lane);
    } else {
      copy_chunk<8>(hst, eng, g.chunk, lane);
    }
  }
}

// staged/N: chunk (s, j) between engine block e[j] and slot block j (host format), block-major.
template <bool kLoad>
__global__ void __launch_bounds__(kThreads) stage_kernel(Geometry g, uint8_t* slot, const int64_t* e, int64_t m) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t item = warp; item < m * kSegs; item += warps) {
    const int64_t j = item / kSegs, s = item - j * kSegs;
    uint8_t* eng = g.engine + (s * g.engine_blocks + e[j]) * g.chunk;
    uint8_t* st = slot + j * g.block_bytes + s * g.chunk;
    if (kLoad) {
      copy_chunk<4>(eng, st, g.chunk, lane);
    } else {
      copy_chunk<4>(st, eng, g.chunk, lane);
    }
  }
}

__global__ void fill_random(uint64_t* p, uint64_t words, uint64_t seed) {
  for (uint64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 29, x *= 0x94D049BB133111EBull, x ^= x >> 32;
    p[i] = x;
  }
}

// Counts the chunks of blocks e[i] <-> h[i] whose bytes differ.
__global__ void count_mismatches(Geometry g, const uint8_t* host, const int64_t* e, const int64_t* h, int64_t n,
                                 unsigned long long* bad) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t item = warp; item < n * kSegs; item += warps) {
    const int64_t s = item / n, i = item - s * n;
    const uint4* a = reinterpret_cast<const uint4*>(g.engine + (s * g.engine_blocks + e[i]) * g.chunk);
    const uint4* b = reinterpret_cast<const uint4*>(host + h[i] * g.block_bytes + s * g.chunk);
    bool differs = false;
    for (uint64_t k = lane; k < g.chunk / 16; k += 32) {
      const uint4 x = a[k], y = b[k];
      differs |= x.x != y.x || x.y != y.y || x.z != y.z || x.w != y.w;
    }
    if (__any_sync(0xffffffffu, differs) && lane == 0) atomicAdd(bad, 1ull);
  }
}

struct Streams {
  cudaStream_t a, b, c;  // a path's streams (the staged path: DMA, kernel, second DMA)
};

// One direction's copy of blocks [lo, hi) of the id lists, queued on the path's streams.
struct Staging {
  int slots = 4;
  uint64_t slot_bytes = 8ull << 20;
  int sms = 4;
  bool dma2 = false;   // alternate the slots' DMA between two streams
  bool batch = false;  // one cudaMemcpyBatchAsync per slot instead of one cudaMemcpyAsync per block
  uint64_t allocated = 0;  // bytes of each slot in buf
  std::vector<uint8_t*> buf;
  std::vector<cudaEvent_t> full, free_;
};

class Bench {
 public:
  Bench(uint64_t total, uint64_t seed) : total_(total), seed_(seed) {
    size_ = 2 * total;
    CK(cudaMalloc(&engine_, size_));
    host_ = static_cast<uint8_t*>(mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (host_ == MAP_FAILED) std::exit(1);
    CK(cudaHostRegister(host_, size_, cudaHostRegisterPortable | cudaHostRegisterMapped));
    CK(cudaMalloc(&bad_, sizeof(unsigned long long)));
    int lo, hi;
    CK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    for (auto* s : {&load_.a, &load_.b, &load_.c}) CK(cudaStreamCreateWithPriority(s, cudaStreamNonBlocking, hi));
    for (auto* s : {&store_.a, &store_.b, &store_.c}) CK(cudaStreamCreateWithPriority(s, cudaStreamNonBlocking, lo));
    for (auto* s : {&extra_.a, &extra_.b, &extra_.c}) {
      CK(cudaStreamCreateWithPriority(s, cudaStreamNonBlocking, hi));
    }
  }

  void set_chunk(uint64_t chunk, uint64_t seed) {
    g_.chunk = chunk;
    g_.block_bytes = kSegs * chunk;
    n_ = static_cast<int64_t>(total_ / g_.block_bytes);
    g_.engine_blocks = 2 * n_;
    g_.engine = engine_;
    std::mt19937_64 rng(seed);
    std::vector<int64_t> e(2 * n_), h(2 * n_);
    std::iota(e.begin(), e.end(), 0);
    std::iota(h.begin(), h.end(), 0);
    std::shuffle(e.begin(), e.end(), rng);
    std::shuffle(h.begin(), h.end(), rng);
    e_ = e, h_ = h;
    if (d_ids_) CK(cudaFree(d_ids_));
    CK(cudaMalloc(&d_ids_, 4 * n_ * sizeof(int64_t)));
    CK(cudaMemcpy(d_ids_, e.data(), 2 * n_ * sizeof(int64_t), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_ids_ + 2 * n_, h.data(), 2 * n_ * sizeof(int64_t), cudaMemcpyHostToDevice));
  }
  int64_t n() const { return n_; }
  uint64_t nbytes() const { return n_ * g_.block_bytes; }
  const int64_t* de(bool load) const { return d_ids_ + (load ? 0 : n_); }
  const int64_t* dh(bool load) const { return d_ids_ + 2 * n_ + (load ? 0 : n_); }
  Streams& streams(bool load) { return load ? load_ : store_; }
  Streams& extra() { return extra_; }

  void contiguous(bool load, Streams& st) {
    const uint64_t b = nbytes();
    if (load) {
      CK(cudaMemcpyAsync(engine_, host_, b, cudaMemcpyHostToDevice, st.a));
    } else {
      CK(cudaMemcpyAsync(host_ + size_ - b, engine_ + size_ - b, b, cudaMemcpyDeviceToHost, st.a));
    }
  }

  void kernel(bool load, Streams& st, int sms, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    if (load) {
      direct_kernel<true><<<sms, kThreads, 0, st.a>>>(g_, host_, de(load) + lo, dh(load) + lo, hi - lo);
    } else {
      direct_kernel<false><<<sms, kThreads, 0, st.a>>>(g_, host_, de(load) + lo, dh(load) + lo, hi - lo);
    }
    CK(cudaGetLastError());
  }

  // DMA whole host blocks through the ring; stream a moves bytes over PCIe, stream b runs the kernels.
  void staged(bool load, Streams& st, Staging& sg, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    const uint64_t slot_bytes = std::max(sg.slot_bytes, g_.block_bytes);
    const int64_t per_slot = static_cast<int64_t>(slot_bytes / g_.block_bytes);
    if (sg.allocated != slot_bytes) {
      for (auto* p : sg.buf) CK(cudaFree(p));
      sg.buf.assign(sg.slots, nullptr);
      for (auto& p : sg.buf) CK(cudaMalloc(&p, slot_bytes));
      if (sg.full.empty()) {
        sg.full.resize(sg.slots), sg.free_.resize(sg.slots);
        for (int k = 0; k < sg.slots; ++k) {
          CK(cudaEventCreateWithFlags(&sg.full[k], cudaEventDisableTiming));
          CK(cudaEventCreateWithFlags(&sg.free_[k], cudaEventDisableTiming));
        }
      }
      sg.allocated = slot_bytes;
    }
    const int64_t* e = de(load);
    const std::vector<int64_t>& hv = h_;
    const int64_t hoff = load ? 0 : n_;
    // Each slot starts free; a slot is reused once the stage that read it (kernel or DMA) has finished.
    for (int k = 0; k < sg.slots; ++k) CK(cudaEventRecord(sg.free_[k], load ? st.b : st.a));
    if (sg.dma2) {
      CK(cudaEventRecord(sg.full[0], st.a));  // the second DMA stream starts after what st.a holds
      CK(cudaStreamWaitEvent(st.c, sg.full[0], 0));
    }
    int64_t group = 0;
    std::vector<void*> dsts;
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
    for (int64_t i0 = lo; i0 < hi; i0 += per_slot, ++group) {
      const int64_t m = std::min(per_slot, hi - i0);
      const int k = static_cast<int>(group % sg.slots);
      uint8_t* slot = sg.buf[k];
      cudaStream_t dma = sg.dma2 && (group & 1) ? st.c : st.a;
      cudaStream_t first = load ? dma : st.b;   // the stage that fills a slot
      cudaStream_t second = load ? st.b : dma;  // the stage that drains it
      if (sg.batch) {
        dsts.resize(m), srcs.resize(m), sizes.assign(m, g_.block_bytes);
        for (int64_t j = 0; j < m; ++j) {
          uint8_t* hp = host_ + hv[hoff + i0 + j] * g_.block_bytes;
          dsts[j] = load ? slot + j * g_.block_bytes : hp;
          srcs[j] = load ? static_cast<const void*>(hp) : slot + j * g_.block_bytes;
        }
      }
      CK(cudaStreamWaitEvent(first, sg.free_[k], 0));
      if (load && sg.batch) {
        batch_copy(dsts, srcs, sizes, first);
      } else if (load) {
        for (int64_t j = 0; j < m; ++j) {
          CK(cudaMemcpyAsync(slot + j * g_.block_bytes, host_ + hv[hoff + i0 + j] * g_.block_bytes, g_.block_bytes,
                             cudaMemcpyHostToDevice, first));
        }
      } else {
        stage_kernel<false><<<sg.sms, kThreads, 0, first>>>(g_, slot, e + i0, m);
        CK(cudaGetLastError());
      }
      CK(cudaEventRecord(sg.full[k], first));
      CK(cudaStreamWaitEvent(second, sg.full[k], 0));
      if (load) {
        stage_kernel<true><<<sg.sms, kThreads, 0, second>>>(g_, slot, e + i0, m);
        CK(cudaGetLastError());
      } else if (sg.batch) {
        batch_copy(dsts, srcs, sizes, second);
      } else {
        for (int64_t j = 0; j < m; ++j) {
          CK(cudaMemcpyAsync(host_ + hv[hoff + i0 + j] * g_.block_bytes, slot + j * g_.block_bytes, g_.block_bytes,
                             cudaMemcpyDeviceToHost, second));
        }
      }
      CK(cudaEventRecord(sg.free_[k], second));
    }
    if (sg.dma2) {  // the path ends on st.a and st.b alone: st.a waits for the second DMA stream
      CK(cudaEventRecord(sg.full[0], st.c));
      CK(cudaStreamWaitEvent(st.a, sg.full[0], 0));
    }
  }

  static void batch_copy(std::vector<void*>& dsts, std::vector<const void*>& srcs, std::vector<size_t>& sizes,
                         cudaStream_t stream) {
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
    CK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_index, 1, stream));
  }

  void fill(uint64_t seed) {
    fill_random<<<1024, 256>>>(reinterpret_cast<uint64_t*>(engine_), size_ / 8, seed);
    fill_random<<<1024, 256>>>(reinterpret_cast<uint64_t*>(host_), size_ / 8, seed ^ 0x5555);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
  }
  // Poisons the destinations of a direction: the engine blocks of a load or the host blocks of a store.
  void poison(bool load) {
    if (load) {
      CK(cudaMemset(engine_, kPoison, size_));
    } else {
      for (int64_t i = n_; i < 2 * n_; ++i) std::memset(host_ + h_[i] * g_.block_bytes, kPoison, g_.block_bytes);
    }
    CK(cudaDeviceSynchronize());
  }
  uint64_t mismatches(bool load) {
    CK(cudaMemset(bad_, 0, sizeof(unsigned long long)));
    count_mismatches<<<264, kThreads>>>(g_, host_, de(load), dh(load), n_, bad_);
    CK(cudaGetLastError());
    unsigned long long bad = 0;
    CK(cudaMemcpy(&bad, bad_, sizeof(bad), cudaMemcpyDeviceToHost));
    return bad;
  }

 private:
  uint64_t total_, seed_, size_ = 0;
  uint8_t* engine_ = nullptr;
  uint8_t* host_ = nullptr;
  int64_t* d_ids_ = nullptr;
  unsigned long long* bad_ = nullptr;
  Geometry g_{};
  int64_t n_ = 0;
  std::vector<int64_t> e_, h_;
  Streams load_{}, store_{}, extra_{};
};

using Queue = std::function<void(bool load)>;  // queues one direction's whole copy

double best_seconds(const std::vector<std::pair<bool, Queue>>& parts, int repeat) {
  double best = 1e30;
  for (int r = 0; r <= repeat; ++r) {  // r == 0: warm-up
    CK(cudaDeviceSynchronize());
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& [load, q] : parts) q(load);
    CK(cudaDeviceSynchronize());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::min(best, s);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t total_mib = 1024;
  int repeat = 5;
  std::vector<int> chunks_kib = {4, 16, 32, 128};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--total-mib") total_mib = std::strtoull(argv[i + 1], nullptr, 10);
    if (a == "--repeat") repeat = std::atoi(argv[i + 1]);
    if (a == "--chunks") {
      chunks_kib.clear();
      for (char* p = argv[i + 1]; *p;) {
        chunks_kib.push_back(static_cast<int>(std::strtol(p, &p, 10)));
        if (*p == ',') ++p;
      }
    }
  }
  const uint64_t seed = std::random_device{}();
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("pcie_paths: %s, %d SMs; %llu MiB per direction, best of %d; seed %llu\n", prop.name,
              prop.multiProcessorCount, static_cast<unsigned long long>(total_mib), repeat,
              static_cast<unsigned long long>(seed));
  Bench bench(total_mib << 20, seed);
  std::printf("%6s %-16s %9s %7s %9s %7s %10s %7s\n", "chunk", "path", "H2D GB/s", "ratio", "D2H GB/s", "ratio",
              "both GB/s", "ratio");
  int failures = 0;
  for (int kib : chunks_kib) {
    bench.set_chunk(static_cast<uint64_t>(kib) << 10, seed + kib);
    const double gb = bench.nbytes() / 1e9;
    const int64_t n = bench.n();
    std::vector<Staging> stagings(6);
    stagings[0] = Staging{4, 8ull << 20, 2};
    stagings[1] = Staging{4, 8ull << 20, 4};
    stagings[2] = Staging{4, 8ull << 20, 8};
    stagings[3] = Staging{3, 16ull << 20, 4};
    stagings[4] = Staging{4, 8ull << 20, 4, true};
    stagings[5] = Staging{4, 8ull << 20, 4, false, true};
    Staging store_staging{4, 8ull << 20, 4};
    Staging split_staging{4, 8ull << 20, 4};
    struct Path {
      std::string name;
      Queue q;  // either direction on that direction's streams
    };
    std::vector<Path> paths;
    paths.push_back({"contiguous", [&](bool l) { bench.contiguous(l, bench.streams(l)); }});
    for (int sms : {4, 8, 16}) {
      paths.push_back({"kernel/" + std::to_string(sms), [&, sms](bool l) { bench.kernel(l, bench.streams(l), sms, 0, n); }});
    }
    for (size_t k = 0; k < stagings.size(); ++k) {
      Staging* lsg = &stagings[k];
      auto ssg = std::make_shared<Staging>(*lsg);
      const std::string name = "staged/" + std::to_string(lsg->sms) + (lsg->slot_bytes > (8ull << 20) ? "/16M" : "") +
                               (lsg->dma2 ? "/2dma" : "") + (lsg->batch ? "/batch" : "");
      paths.push_back({name, [&, lsg, ssg](bool l) { bench.staged(l, bench.streams(l), l ? *lsg : *ssg, 0, n); }});
    }
    std::vector<double> base(3, 0.0);
    for (const Path& p : paths) {
      double gbs[3];
      for (int d = 0; d < 2; ++d) {
        const bool load = d == 0;
        if (p.name != "contiguous") {
          bench.fill(seed + kib * 7 + d);
          bench.poison(load);
          p.q(load);
          CK(cudaDeviceSynchronize());
          const uint64_t bad = bench.mismatches(load);
          if (bad) {
            std::printf("FAIL %d KiB %s %s: %llu chunks differ\n", kib, p.name.c_str(), load ? "load" : "store",
                        static_cast<unsigned long long>(bad));
            ++failures;
          }
        }
        gbs[d] = gb / best_seconds({{load, p.q}}, repeat);
      }
      gbs[2] = 2 * gb / best_seconds({{true, p.q}, {false, p.q}}, repeat);
      if (p.name == "contiguous") std::copy(gbs, gbs + 3, base.begin());
      std::printf("%4dKi %-16s %9.2f %6.1f%% %9.2f %6.1f%% %10.2f %6.1f%%\n", kib, p.name.c_str(), gbs[0],
                  100 * gbs[0] / base[0], gbs[1], 100 * gbs[1] / base[1], gbs[2], 100 * gbs[2] / base[2]);
    }
    // Mixed directions: a load path and a store path at once.
    struct Mix {
      std::string name;
      Queue load, store;
    };
    std::vector<Mix> mixes = {
        {"kernel8+staged4", [&](bool) { bench.kernel(true, bench.streams(true), 8, 0, n); },
         [&](bool) { bench.staged(false, bench.streams(false), store_staging, 0, n); }},
        {"staged4+kernel8", [&](bool) { bench.staged(true, bench.streams(true), stagings[1], 0, n); },
         [&](bool) { bench.kernel(false, bench.streams(false), 8, 0, n); }},
        {"kernel16+kernel16", [&](bool) { bench.kernel(true, bench.streams(true), 16, 0, n); },
         [&](bool) { bench.kernel(false, bench.streams(false), 16, 0, n); }},
    };
    for (const Mix& m : mixes) {
      const double both = 2 * gb / best_seconds({{true, m.load}, {false, m.store}}, repeat);
      std::printf("%4dKi %-16s %9s %7s %9s %7s %10.2f %6.1f%%\n", kib, m.name.c_str(), "", "", "", "", both,
                  100 * both / base[2]);
    }
    // Loads split between the kernel and the staged DMA path, in parallel.
    for (double f : {0.25, 0.5}) {
      const int64_t cut = static_cast<int64_t>(f * n);
      Queue q = [&, cut](bool) {
        bench.kernel(true, bench.extra(), 8, 0, cut);
        bench.staged(true, bench.streams(true), split_staging, cut, n);
      };
      bench.fill(seed + kib * 11);
      bench.poison(true);
      q(true);
      CK(cudaDeviceSynchronize());
      if (const uint64_t bad = bench.mismatches(true)) {
        std::printf("FAIL %d KiB split %.2f: %llu chunks differ\n", kib, f, static_cast<unsigned long long>(bad));
        ++failures;
      }
      const double h2d = gb / best_seconds({{true, q}}, repeat);
      std::printf("%4dKi split/%-10.2f %9.2f %6.1f%%\n", kib, f, h2d, 100 * h2d / base[0]);
    }
  }
  if (failures) {
    std::printf("pcie_paths: %d checks FAILED\n", failures);
  } else {
    std::printf("pcie_paths: every check byte-exact\n");
  }
  return failures ? 1 : 0;
}
