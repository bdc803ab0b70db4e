// CacheOptions and ModelShape: what a C++ engine needs to open a FlexKV cache
// (cache.h), read from the same JSON config file the Python engines use.
//
// The keys, their types, defaults and ranges are FlexKV's one key table,
// core/config_keys.json, compiled into the library (the file is not needed at
// run time). The reader accepts what Python's flexkv.core.config_file accepts
// for JSON: the manual's long form (top-level `server_recv_port`,
// `cache_config: {...}`, optional `model_config: {...}`, `enable_flexkv`,
// `num_log_interval_requests`), the short form (`cpu_cache_gb`,
// `ssd_cache_gb`, `ssd_cache_dir` at the top level) and a mix of both, with
// `//` and `/* */` comments; then FLEXKV_<KEY> environment variables override
// single keys (from_file only). YAML files are read by the Python API only.
// Unknown keys (with a did-you-mean), values of the wrong type or range, a
// key given twice and syntax errors (with line:column) are
// std::invalid_argument "<file>: <key>: <what is wrong and what would work>".
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace flexkv {

enum class DType : uint8_t { kFloat16, kBFloat16, kFloat32, kFloat8E4M3, kFloat8E5M2, kInt8, kUInt8 };

// Bytes per element.
size_t dtype_size(DType dtype);
// The canonical name: "float16", "bfloat16", "float32", "float8_e4m3fn", ...
const char* dtype_name(DType dtype);
// Accepts the canonical names and the config's aliases ("bf16", "fp16", "half",
// "fp8", ...), any case, with an optional "torch." prefix. Throws
// std::invalid_argument listing the accepted names.
DType parse_dtype(std::string_view name);

// The KV shape of a model, as Python's flexkv.ModelConfig: num_kv_heads counts
// the heads of all tensor-parallel ranks together, and a block holds every
// rank's slice. num_layers, num_kv_heads and head_size have no default: a
// config's model_config must give them.
struct ModelShape {
  int num_layers = 0;
  int num_kv_heads = 0;  // all tensor-parallel ranks together
  int head_size = 0;
  DType dtype = DType::kBFloat16;
  bool use_mla = false;  // one latent per token instead of K and V
  int tp_size = 1;       // tensor-parallel ranks sharing each block

  int kv_factor() const { return use_mla ? 1 : 2; }
  // Bytes of one (layer, k|v) chunk of a block of tokens_per_block tokens:
  // tokens_per_block * num_kv_heads * head_size * dtype size.
  uint64_t chunk_bytes(int tokens_per_block) const;
  // Bytes of one block: num_layers * kv_factor chunks.
  uint64_t block_bytes(int tokens_per_block) const;
  // Throws std::invalid_argument "model_config.<key>: ..." for the first field out of range.
  void validate() const;
  // The KV layout fingerprint that namespaces block keys, byte for byte
  // Python's ModelConfig.fingerprint():
  // "dtype=bfloat16;kv_heads=8;head_size=128;layers=64;mla=0;tp=1".
  std::string fingerprint() const;
};

// The cache_config keys, typed. A default-constructed CacheOptions holds the
// key table's defaults (those of Python's flexkv.CacheConfig()).
struct CacheOptions {
  CacheOptions();

  int tokens_per_block;
  bool enable_cpu;  // must stay true: every block passes through the CPU tier
  bool enable_ssd;
  bool enable_remote;
  // A tier is sized in blocks, or in GiB turned into blocks by resolved() once
  // the model shape is known; a config gives one of the two per tier.
  int64_t num_cpu_blocks;
  std::optional<double> cpu_cache_gb;
  int64_t num_ssd_blocks;
  std::optional<double> ssd_cache_gb;  // > 0 enables the SSD tier, 0 disables it
  // The config's `ssd_cache_dir`: a string with ';'-separated directories, or a list.
  std::vector<std::string> ssd_cache_dirs;
  std::optional<int64_t> num_remote_blocks;
  std::optional<std::string> remote_cache_path;
  std::string remote_config_custom;  // the JSON object's text; empty when unset
  double evict_ratio;
  // GPU engine memory: the DMA copy engines instead of the copy kernel, and
  // the kernel's thread blocks, per direction.
  bool use_ce_transfer_h2d;
  bool use_ce_transfer_d2h;
  int transfer_sms_h2d;
  int transfer_sms_d2h;
  int ssd_cache_iouring_entries;
  int ssd_cache_iouring_flags;
  bool use_hugepage_cpu_buffer;
  std::string eviction_policy;
  // Not a config key: threads of the host copy engine (host engine memory).
  int num_copy_threads = 2;
  // model_config from the file, when it has one.
  std::optional<ModelShape> model;

  // Reads a config file. An empty path means the FLEXKV_CONFIG_PATH
  // environment variable, and the defaults when that is unset too. Then
  // FLEXKV_<KEY> variables override single keys (FLEXKV_NUM_CPU_BLOCKS=1000,
  // FLEXKV_ENABLE_SSD=true, ...) as Python's load_config applies them; an
  // unknown FLEXKV_* variable is reported on stderr and ignored.
  static CacheOptions from_file(const std::string& path = "");
  // The same from the text of a JSON config, without environment overrides;
  // `where` names it in errors.
  static CacheOptions from_json(std::string_view json, const std::string& where = "config");

  // A copy with cpu_cache_gb / ssd_cache_gb turned into num_cpu_blocks /
  // num_ssd_blocks for `model` (at least 1 block: floor(GiB * 2^30 /
  // block_bytes)) and cleared; ssd_cache_gb > 0 enables the SSD tier, 0
  // disables it. Python's CacheConfig.resolved, exactly.
  CacheOptions resolved(const ModelShape& model) const;
  // resolved(model).num_cpu_blocks. Throws std::invalid_argument when it
  // exceeds 2^31-1 (block ids are 32-bit).
  int64_t cpu_blocks_for(const ModelShape& model) const;
  // Throws std::invalid_argument "cache_config.<key>: ..." naming the first key
  // out of range or in conflict with another, as Python's CacheConfig.validate.
  void validate() const;
};

}  // namespace flexkv
