// CacheOptions and ModelShape: what a C++ engine needs to open a FlexKV cache
// (cache.h), read from the same JSON config file the Python engines use.
//
// The file is the manual's: top-level `cache_config: {...}` and optional
// `model_config: {...}`, `server_recv_port`, `enable_flexkv`,
// `num_log_interval_requests`; or the short form `cpu_cache_gb`. `//` and
// `/* */` comments are accepted. The C++ API serves the CPU tier: a file that
// enables SSD or remote tiers is refused with a message saying so, and an
// unknown key is refused with the list of known ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace flexkv {

enum class DType : uint8_t { kFloat16, kBFloat16, kFloat32, kFloat8E4M3, kFloat8E5M2, kInt8, kUInt8 };

// Bytes per element.
size_t dtype_size(DType dtype);
// The canonical name: "float16", "bfloat16", "float32", "float8_e4m3fn", ...
const char* dtype_name(DType dtype);
// Accepts the canonical names and the config's aliases ("bf16", "fp16", "half",
// "fp8", ...). Throws std::invalid_argument listing the accepted names.
DType parse_dtype(std::string_view name);

// The KV shape of the model as one engine rank holds it.
struct ModelShape {
  int num_layers = 0;
  int num_kv_heads = 0;  // on this rank
  int head_size = 0;
  DType dtype = DType::kBFloat16;
  bool use_mla = false;  // one latent per token instead of K and V

  int kv_factor() const { return use_mla ? 1 : 2; }
  // Bytes of one (layer, k|v) chunk of one block of tokens_per_block tokens.
  uint64_t chunk_bytes(int tokens_per_block) const;
  // Bytes of one block: num_layers * kv_factor chunks.
  uint64_t block_bytes(int tokens_per_block) const;
  // Throws std::invalid_argument naming the first field out of range.
  void validate() const;
  // A string that differs whenever two shapes' blocks are not interchangeable.
  std::string fingerprint() const;
};

struct CacheOptions {
  int tokens_per_block = 16;
  // CPU tier size: num_cpu_blocks, or cpu_cache_gb (GiB) turned into blocks once
  // the model shape is known. At most one of them is set by a file.
  int64_t num_cpu_blocks = 0;
  std::optional<double> cpu_cache_gb;
  double evict_ratio = 0.0;
  bool use_hugepage_cpu_buffer = false;
  // GPU engine memory only: copy-engine (DMA) path instead of the copy kernel,
  // and the kernel's thread blocks, per direction.
  bool use_ce_transfer_h2d = false;
  bool use_ce_transfer_d2h = false;
  int transfer_sms_h2d = 8;
  int transfer_sms_d2h = 8;
  // Host engine memory only: threads of the host copy engine.
  int num_copy_threads = 2;
  // model_config from the file, when it has one.
  std::optional<ModelShape> model;

  // Reads a config file. An empty path means the FLEXKV_CONFIG_PATH environment
  // variable. Throws std::invalid_argument "<file>: <key>: <what is wrong and
  // what would work>" on a missing file, a syntax error, an unknown key, a
  // value of the wrong type or range, or a tier the C++ API does not serve.
  static CacheOptions from_file(const std::string& path = "");
  // The same from the text of a config; `where` names it in errors.
  static CacheOptions from_json(std::string_view json, const std::string& where = "config");

  // The CPU tier's block count for this model (num_cpu_blocks, or cpu_cache_gb
  // divided by the block size). Throws std::invalid_argument when it is zero.
  int64_t cpu_blocks_for(const ModelShape& model) const;
  // Throws std::invalid_argument naming the first key out of range.
  void validate() const;
};

}  // namespace flexkv
