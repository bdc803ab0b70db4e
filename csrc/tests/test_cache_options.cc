#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "check.h"
#include "config_reader.h"
#include "flexkv/cache.h"
#include "config_schema.h"
#include "flexkv/cache_options.h"
#include "option_fields.h"

using flexkv::CacheOptions;
using flexkv::ModelShape;
using flexkv::detail::EnvVars;
using flexkv::detail::read_config;

namespace {

// The error message of `fn`, or "" if it did not throw std::invalid_argument.
template <class F>
std::string error_of(F fn) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  if (s.find(part) != std::string::npos) return true;
  std::fprintf(stderr, "  \"%s\" does not contain \"%s\"\n", s.c_str(), part.c_str());
  return false;
}

std::string json_error(const std::string& text, const std::string& where = "f.json") {
  return error_of([&] { CacheOptions::from_json(text, where); });
}

CacheOptions with_env(const std::string& text, const EnvVars& env) { return read_config(text, "f.json", &env).options; }

std::string env_error(const std::string& text, const EnvVars& env) {
  return error_of([&] { with_env(text, env); });
}

// The manual's 17.4.2 block (large_scale.json), comments included, plus a model.
const char* kManualStyle = R"({
    "cache_config": {
        "tokens_per_block": 64,        // big blocks
        "num_cpu_blocks": 500000,      /* big CPU tier */
        "num_ssd_blocks": 5000000,
        "evict_ratio": 0.0,
        "use_ce_transfer_h2d": true,
        "transfer_sms_h2d": 16,
        "ssd_cache_iouring_entries": 1024
    },
    "model_config": {"num_layers": 4, "num_kv_heads": 8, "head_size": 128, "dtype": "bf16"}
})";

// The manual's 17.2.2 block (distributed_worker.json): every tier enabled.
const char* kDistributed = R"({
    "server_recv_port": "ipc:///tmp/flexkv_${worker_id}_test",
    "cache_config": {
        "enable_cpu": true, "enable_ssd": true, "enable_remote": true, "tokens_per_block": 64,
        "num_cpu_blocks": 200000, "num_ssd_blocks": 2000000, "num_remote_blocks": 20000000,
        "ssd_cache_dir": "/data/flexkv_ssd/", "remote_cache_path": "s3://flexkv-cache/", "evict_ratio": 0.05,
        "remote_config_custom": {"endpoint": "s3.amazonaws.com", "bucket": "flexkv-cache"}
    }
})";

ModelShape shape(int layers, int heads, int head_size, flexkv::DType dtype) {
  ModelShape m;
  m.num_layers = layers;
  m.num_kv_heads = heads;
  m.head_size = head_size;
  m.dtype = dtype;
  return m;
}

}  // namespace

TEST(defaults_are_the_key_tables) {
  const CacheOptions o;
  CHECK_EQ(o.tokens_per_block, 16);
  CHECK(o.enable_cpu && !o.enable_ssd && !o.enable_remote);
  CHECK_EQ(o.num_cpu_blocks, 1000000);
  CHECK_EQ(o.num_ssd_blocks, 10000000);
  CHECK(!o.num_remote_blocks && !o.cpu_cache_gb && !o.ssd_cache_gb && !o.remote_cache_path);
  CHECK(o.ssd_cache_dirs.empty() && o.remote_config_custom.empty());
  CHECK_EQ(o.transfer_sms_h2d, 8);
  CHECK_EQ(o.ssd_cache_iouring_entries, 512);
  CHECK_EQ(o.eviction_policy, std::string("lru"));
  CHECK_EQ(o.num_copy_threads, 2);
  o.validate();
  // Every field starts at its key's default in config_keys.json, field by field.
  const auto& schema = flexkv::detail::config_schema();
  for (const auto& f : flexkv::detail::option_fields()) {
    CHECK(f.get(o) == schema.at("cache_config", f.key).default_value);
  }
  // The embedded table is the file's text.
  CHECK(contains(std::string(flexkv::detail::config_keys_json()), "\"transfer_sms_d2h\""));
  CHECK_EQ(ModelShape().tp_size, schema.at("model_config", "tp_size").default_value.get<int>());
}

TEST(reads_the_manuals_keys_and_comments) {
  const CacheOptions o = CacheOptions::from_json(kManualStyle, "manual.json");
  CHECK_EQ(o.tokens_per_block, 64);
  CHECK_EQ(o.num_cpu_blocks, 500000);
  CHECK_EQ(o.num_ssd_blocks, 5000000);
  CHECK(!o.enable_ssd);
  CHECK(o.use_ce_transfer_h2d);
  CHECK(!o.use_ce_transfer_d2h);
  CHECK_EQ(o.transfer_sms_h2d, 16);
  CHECK_EQ(o.ssd_cache_iouring_entries, 1024);
  CHECK(o.model.has_value());
  CHECK_EQ(o.model->num_layers, 4);
  CHECK(o.model->dtype == flexkv::DType::kBFloat16);
  CHECK_EQ(o.model->block_bytes(64), 4ull * 2 * 64 * 8 * 128 * 2);
}

TEST(reads_the_ssd_and_remote_keys) {
  setenv("worker_id", "0", 1);  // the manual's ${worker_id}: each worker's environment names it
  const CacheOptions o = CacheOptions::from_json(kDistributed);
  unsetenv("worker_id");
  CHECK(o.enable_ssd && o.enable_remote);
  CHECK_EQ(o.num_ssd_blocks, 2000000);
  CHECK(o.num_remote_blocks && *o.num_remote_blocks == 20000000);
  CHECK(o.ssd_cache_dirs == std::vector<std::string>{"/data/flexkv_ssd/"});
  CHECK(o.remote_cache_path && *o.remote_cache_path == "s3://flexkv-cache/");
  CHECK_EQ(o.remote_config_custom, std::string(R"({"endpoint":"s3.amazonaws.com","bucket":"flexkv-cache"})"));
  CHECK_EQ(o.evict_ratio, 0.05);

  const CacheOptions more = CacheOptions::from_json(R"({"cache_config": {"ssd_cache_dir": " /a ; /b ;",
      "ssd_cache_iouring_flags": 3, "use_hugepage_cpu_buffer": true, "eviction_policy": "lru",
      "transfer_sms_d2h": 256, "use_ce_transfer_d2h": true}})");
  CHECK(more.ssd_cache_dirs == (std::vector<std::string>{"/a", "/b"}));
  CHECK_EQ(more.ssd_cache_iouring_flags, 3);
  CHECK(more.use_hugepage_cpu_buffer && more.use_ce_transfer_d2h);
  CHECK_EQ(more.transfer_sms_d2h, 256);
  const CacheOptions list = CacheOptions::from_json(R"({"ssd_cache_dir": ["/n0", "/n1;x"]})");
  CHECK(list.ssd_cache_dirs == (std::vector<std::string>{"/n0", "/n1;x"}));
  // Slashes inside strings are not comments.
  const CacheOptions port = CacheOptions::from_json(
      "{\"server_recv_port\": \"ipc:///tmp/a//b\", // port\n \"cache_config\": {\"remote_cache_path\": \"s3://x//y/\"}}");
  CHECK(port.remote_cache_path && *port.remote_cache_path == "s3://x//y/");
}

TEST(short_form_and_resolved_match_python) {
  const CacheOptions o = CacheOptions::from_json(
      R"({"cpu_cache_gb": 32, "ssd_cache_gb": 512, "ssd_cache_dir": "/data/flexkv_ssd/"})");
  CHECK(o.cpu_cache_gb && *o.cpu_cache_gb == 32.0);
  CHECK_EQ(o.num_cpu_blocks, 1000000);  // unchanged until resolved
  const ModelShape qwen = shape(64, 8, 128, flexkv::DType::kBFloat16);  // 4 MiB blocks of 16 tokens
  const CacheOptions r = o.resolved(qwen);
  CHECK_EQ(r.num_cpu_blocks, 8192);
  CHECK_EQ(r.num_ssd_blocks, 131072);
  CHECK(r.enable_ssd && !r.cpu_cache_gb && !r.ssd_cache_gb);
  CHECK_EQ(o.cpu_blocks_for(qwen), 8192);
  r.validate();

  const ModelShape tiny = shape(2, 2, 64, flexkv::DType::kFloat16);  // 16 KiB blocks of 16 tokens
  CacheOptions gb;
  gb.cpu_cache_gb = 1e-9;
  CHECK_EQ(gb.resolved(tiny).num_cpu_blocks, 1);  // at least one block
  gb.cpu_cache_gb = 0.5;
  CHECK_EQ(gb.cpu_blocks_for(tiny), 32768);
  gb.ssd_cache_gb = 0.0;
  gb.enable_ssd = false;
  CHECK(!gb.resolved(tiny).enable_ssd);
  const CacheOptions plain = CacheOptions::from_json(R"({"cache_config": {"num_cpu_blocks": 3}})");
  CHECK_EQ(plain.resolved(tiny).num_cpu_blocks, 3);
  // 1.5 GiB over 3 * 2 * 5 * 96 * 4 * 32-byte blocks: Python's 1.5 * 2**30 // 368640 = 4369.
  const CacheOptions odd = CacheOptions::from_json(R"({"cpu_cache_gb": 1.5, "cache_config": {"tokens_per_block": 32}})");
  CHECK_EQ(odd.resolved(shape(3, 5, 96, flexkv::DType::kFloat32)).num_cpu_blocks, 4369);
  CacheOptions huge;
  huge.cpu_cache_gb = 1e6;
  CHECK(contains(error_of([&] { huge.cpu_blocks_for(shape(1, 1, 1, flexkv::DType::kInt8)); }), "2147483647"));
}

TEST(model_shape_counts_every_rank_and_prints_pythons_fingerprint) {
  ModelShape m = shape(64, 8, 128, flexkv::DType::kBFloat16);
  CHECK_EQ(m.fingerprint(), std::string("dtype=bfloat16;kv_heads=8;head_size=128;layers=64;mla=0;tp=1"));
  m.tp_size = 2;
  m.use_mla = true;
  m.dtype = flexkv::DType::kFloat8E4M3;
  CHECK_EQ(m.fingerprint(), std::string("dtype=float8_e4m3fn;kv_heads=8;head_size=128;layers=64;mla=1;tp=2"));
  CHECK_EQ(m.block_bytes(16), 16ull * 64 * 1 * 8 * 128 * 1);  // tp_size does not divide: heads are all ranks'
  const CacheOptions o = CacheOptions::from_json(R"({"model_config": {"num_layers": 2, "num_kv_heads": 4,
      "head_size": 8, "dtype": "torch.Float16", "tp_size": 2, "dp_size": 3, "use_mla": false}})");
  CHECK_EQ(o.model->tp_size, 2);
  CHECK(o.model->dtype == flexkv::DType::kFloat16);
  CHECK(contains(json_error(R"({"model_config": {"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "dp_size": 0}})"),
                 "f.json: model_config.dp_size: 0 is out of range: expected an integer >= 1"));
  CHECK(contains(error_of([] { flexkv::parse_dtype("fp7"); }), "use one of: bf16, bfloat16, float"));
  CHECK(contains(error_of([] { shape(0, 1, 1, flexkv::DType::kInt8).validate(); }), "model_config.num_layers: 0 is out"));
}

TEST(errors_name_the_key_and_the_fix) {
  std::string e = json_error(R"({"cache_config": {"num_cpu_block": 10}})");
  CHECK(contains(e, "f.json: cache_config.num_cpu_block: unknown key; did you mean num_cpu_blocks or num_ssd_blocks or "
                 "num_remote_blocks?"));
  CHECK(contains(e, "valid keys in cache_config: tokens_per_block, enable_cpu"));
  CHECK(contains(json_error(R"({"num_cpu_block": 10})"), "did you mean cache_config.num_cpu_blocks or"));
  CHECK(contains(json_error(R"({"server_recv_prot": "ipc:///x"})"), "did you mean server_recv_port?"));
  CHECK(contains(json_error(R"({"model_config": {"num_layer": 2}})"), "did you mean num_layers?"));
  CHECK(contains(json_error(R"({"num_cpu_blocks": 10})"), "num_cpu_blocks: not a key here; it belongs in cache_config"));
  CHECK(contains(json_error(R"({"cache_config": {"server_recv_port": "ipc:///x"}})"), "belongs at the top level"));
  CHECK(contains(json_error(R"({"cache_config": {"num_layers": 2}})"), "belongs in model_config"));

  CHECK(contains(json_error(R"({"cache_config": {"num_cpu_blocks": true}})"),
                 "f.json: cache_config.num_cpu_blocks: must be an integer, got true (a boolean)"));
  CHECK(contains(json_error(R"({"cache_config": {"tokens_per_block": "16"}})"), "write 16 without quotes"));
  CHECK(contains(json_error(R"({"cache_config": {"num_cpu_blocks": 1e5}})"), "write 100000"));
  CHECK(contains(json_error(R"({"cache_config": {"enable_ssd": 1}})"), "write true or false"));
  CHECK(contains(json_error(R"({"cache_config": {"ssd_cache_dir": ["/a", 3]}})"), "a string or a list of strings or null"));
  CHECK(contains(json_error(R"({"cache_config": {"remote_config_custom": "x"}})"), "an object"));
  CHECK(contains(json_error(R"({"model_config": {"dtype": 2}})"), "model_config.dtype: must be a string such as"));
  CHECK(contains(json_error(R"({"cache_config": 5})"), "cache_config: must be an object"));
  CHECK(contains(json_error("[1, 2]"), "f.json: the config is [1,2] (a list); it must be an object"));

  CHECK(contains(json_error(R"({"cache_config": {"evict_ratio": 1.5}})"),
                 "cache_config.evict_ratio: 1.5 is out of range: expected a number in [0, 1] (the share of extra"));
  CHECK(contains(json_error(R"({"cache_config": {"transfer_sms_d2h": 257}})"), "expected an integer in [1, 256]"));
  CHECK(contains(json_error(R"({"cache_config": {"num_cpu_blocks": 0}})"), "expected an integer >= 1"));
  CHECK(contains(json_error(R"({"cpu_cache_gb": 0})"), "cache_config.cpu_cache_gb: 0.0 is out of range: expected a number > 0"));
  CHECK(contains(json_error(R"({"cache_config": {"eviction_policy": "fifo"}})"), "use one of: lru"));
  CHECK(contains(json_error(R"({"cache_config": {"enable_cpu": false}})"), "set enable_cpu to true"));
  CHECK(contains(json_error(R"({"cache_config": {"enable_remote": true}})"), "cache_config.num_remote_blocks: required"));
  CHECK(contains(json_error(R"({"cache_config": {"enable_ssd": true}})"), "cache_config.ssd_cache_dir: required"));
  CHECK(contains(json_error(R"({"cache_config": {"ssd_cache_dir": []}})"), "is an empty list"));
  CHECK(contains(json_error(R"({"cache_config": {"ssd_cache_dir": ""}})"), "contains an empty path"));
  CHECK(contains(json_error(R"({"cache_config": {"ssd_cache_gb": 0, "enable_ssd": true, "ssd_cache_dir": "/x"}})"),
                 "0 disables the SSD tier"));
  CHECK(contains(json_error(R"({"server_recv_port": "/tmp/flexkv"})"), "not a ZeroMQ endpoint"));
  CHECK(contains(json_error(R"({"cache_config": {"tokens_per_block": 4294967296}})"), "does not fit"));
  CacheOptions by_hand;
  by_hand.remote_config_custom = "{not json";
  CHECK(contains(error_of([&] { by_hand.validate(); }), "cache_config.remote_config_custom: is not the text of a JSON"));
  by_hand = CacheOptions();
  by_hand.num_copy_threads = 0;
  CHECK(contains(error_of([&] { by_hand.validate(); }), "num_copy_threads: 0 is out of range"));

  e = json_error(R"({"cpu_cache_gb": 32, "cache_config": {"num_cpu_blocks": 5000}})");
  CHECK(contains(e, "cache_config.num_cpu_blocks: sizes the CPU tier, and so does cache_config.cpu_cache_gb; drop one"));
  CHECK(contains(json_error(R"({"ssd_cache_gb": 10, "cache_config": {"num_ssd_blocks": 5}})"), "drop"));
  CHECK(contains(json_error(R"({"ssd_cache_dir": "/a", "cache_config": {"ssd_cache_dir": "/b"}})"),
                 "given both at the top level and in cache_config"));
  // An error about a top-level short key says where it was set.
  CHECK(contains(json_error(R"({"cpu_cache_gb": -1})"), "(set by top-level key 'cpu_cache_gb')"));
  e = json_error(R"({"cpu_cache_gb": 1, "model_config": {"num_layers": 2}})");
  CHECK(contains(e, "model_config.num_kv_heads: missing"));
  CHECK(contains(json_error(R"({"model_config": {"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "dtype": "fp7"}})"),
                 "model_config.dtype: \"fp7\" is not a supported KV cache dtype"));
}

TEST(syntax_errors_duplicates_and_comments) {
  std::string e = json_error("{\n  \"cache_config\": {\n    \"num_cpu_blocks\": 10,,\n", "x.json");
  CHECK(contains(e, "x.json:3:26: not valid JSON: syntax error while parsing object key - unexpected ','"));
  e = json_error("{\n  \"cache_config\": {\n    \"num_cpu_blocks\": 10 // c\n    \"x\": 1\n  }\n}\n", "bad.json");
  CHECK(contains(e, "bad.json:4:5: not valid JSON"));
  CHECK(contains(json_error("{\"cache_config\": {\"num_cpu_blocks\": 10,  // last\n}}"), "trailing comma"));
  CHECK(contains(json_error(R"({"cpu_cache_gb": 1, "cpu_cache_gb": 2})", "dup.json"),
                 "dup.json: cpu_cache_gb: given twice; keep one"));
  CHECK(contains(json_error(R"({"cache_config": {"num_cpu_blocks": 10, "num_cpu_blocks": 20}})"),
                 "f.json: cache_config.num_cpu_blocks: given twice"));
  CHECK(contains(json_error(R"({"cache_config": {"remote_config_custom": {"a": 1, "a": 2}}})"),
                 "cache_config.remote_config_custom.a: given twice"));
  CHECK(contains(json_error("{} trailing", "t.json"), "t.json:1:4: not valid JSON"));  // where the bad token starts
  CHECK(contains(json_error("{ /* open", "c.json"), "c.json:1:"));
  // Keys in sibling objects may repeat.
  CacheOptions::from_json(R"({"cache_config": {"remote_config_custom": {"a": {"k": 1}, "b": {"k": 2}}}})");
}

TEST(environment_overrides_follow_load_config) {
  const EnvVars env = {{"FLEXKV_NUM_CPU_BLOCKS", "1_000"},    {"FLEXKV_ENABLE_SSD", "No"},
                       {"FLEXKV_USE_CE_TRANSFER_D2H", "0"},   {"FLEXKV_ENABLE_REMOTE", "ON"},
                       {"FLEXKV_NUM_REMOTE_BLOCKS", "77"},    {"FLEXKV_EVICT_RATIO", " 0.1 "},
                       {"FLEXKV_SSD_CACHE_DIR", "/a;/b"},     {"FLEXKV_REMOTE_CONFIG_CUSTOM", R"({"k": 1})"},
                       {"FLEXKV_SERVER_RECV_PORT", "tcp://127.0.0.1:6000"}, {"FLEXKV_EVICTION_POLICY", "lru"},
                       {"FLEXKV_CONFIG_PATH", "ignored here"}, {"FLEXKV_TEST_ANYTHING", "x"},
                       {"FLEXKV_MASTER_HOST", "h"},            {"OTHER", "1"},
                       {"worker_id", "3"}};  // the manual's ${worker_id}
  const auto read = read_config(kDistributed, "f.json", &env);
  const CacheOptions& o = read.options;
  CHECK(read.warnings.empty());
  CHECK_EQ(o.num_cpu_blocks, 1000);
  CHECK_EQ(o.num_ssd_blocks, 2000000);
  CHECK(!o.enable_ssd && !o.use_ce_transfer_d2h && o.enable_remote);
  CHECK(o.num_remote_blocks && *o.num_remote_blocks == 77);
  CHECK_EQ(o.evict_ratio, 0.1);
  CHECK(o.ssd_cache_dirs == (std::vector<std::string>{"/a", "/b"}));
  CHECK_EQ(o.remote_config_custom, std::string(R"({"k":1})"));

  for (const char* yes : {"1", "true", "YES", "On"}) CHECK(with_env("{}", {{"FLEXKV_USE_HUGEPAGE_CPU_BUFFER", yes}}).use_hugepage_cpu_buffer);
  for (const char* no : {"0", "False", "no", "OFF"}) CHECK(!with_env("{}", {{"FLEXKV_USE_HUGEPAGE_CPU_BUFFER", no}}).use_hugepage_cpu_buffer);
  const CacheOptions none = with_env("{}", {{"FLEXKV_CPU_CACHE_GB", "4"}, {"FLEXKV_NUM_REMOTE_BLOCKS", "none"}});
  CHECK(none.cpu_cache_gb && *none.cpu_cache_gb == 4.0 && !none.num_remote_blocks);

  CHECK(contains(env_error("{}", {{"FLEXKV_NUM_CPU_BLOCKS", "lots"}}), "FLEXKV_NUM_CPU_BLOCKS='lots' is not valid: expected an integer"));
  CHECK(contains(env_error("{}", {{"FLEXKV_NUM_CPU_BLOCKS", "1.5"}}), "an integer"));
  CHECK(contains(env_error("{}", {{"FLEXKV_ENABLE_SSD", "maybe"}}), "true or false"));
  CHECK(contains(env_error("{}", {{"FLEXKV_EVICT_RATIO", "abc"}}), "a number"));
  CHECK(contains(env_error("{}", {{"FLEXKV_EVICT_RATIO", "nan"}}), "a finite number"));
  CHECK(contains(env_error("{}", {{"FLEXKV_REMOTE_CONFIG_CUSTOM", "{bad"}}), "not valid JSON"));
  CHECK(contains(env_error("{}", {{"FLEXKV_REMOTE_CONFIG_CUSTOM", "[1]"}}), "a JSON object"));
  // A value out of range names its variable.
  CHECK(contains(env_error(kDistributed, {{"FLEXKV_EVICT_RATIO", "2"}, {"worker_id", "0"}}),
                 "cache_config.evict_ratio: 2.0 is out of range: expected a number in [0, 1] (the share of extra blocks "
                 "freed per eviction, e.g. 0.05) (set by environment variable FLEXKV_EVICT_RATIO)"));

  // A size from the environment replaces the file's other size of that tier; two sizes from it are an error.
  const char* short_form = R"({"cpu_cache_gb": 32, "ssd_cache_gb": 512, "ssd_cache_dir": "/d"})";
  const CacheOptions blocks = with_env(short_form, {{"FLEXKV_NUM_CPU_BLOCKS", "100"}});
  CHECK(!blocks.cpu_cache_gb && blocks.num_cpu_blocks == 100);
  const CacheOptions gib = with_env(kDistributed, {{"FLEXKV_CPU_CACHE_GB", "8"}, {"worker_id", "0"}});
  CHECK(gib.cpu_cache_gb && gib.num_cpu_blocks == 1000000);
  CHECK(contains(env_error("{}", {{"FLEXKV_NUM_CPU_BLOCKS", "100"}, {"FLEXKV_CPU_CACHE_GB", "8"}}),
                 "FLEXKV_NUM_CPU_BLOCKS and FLEXKV_CPU_CACHE_GB both size the same tier"));

  const EnvVars typo = {{"FLEXKV_NUM_CPU_BLOCK", "5"}};
  const auto warned = read_config("{}", "f.json", &typo);
  CHECK_EQ(warned.options.num_cpu_blocks, 1000000);  // not applied, not fatal
  CHECK(warned.warnings.size() == 1 &&
        contains(warned.warnings[0], "FLEXKV_NUM_CPU_BLOCK: it is not a FlexKV config key; did you mean FLEXKV_NUM_CPU_BLOCKS?"));
  // from_json applies no FLEXKV_* variable (only ${NAME} references read the environment).
  CHECK_EQ(CacheOptions::from_json("{}").num_cpu_blocks, 1000000);
}

TEST(from_file_reads_flexkv_config_path_and_the_environment) {
  char path[] = "/tmp/flexkv_cfg_XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  close(fd);
  {
    std::ofstream out(path);
    out << kManualStyle;
  }
  setenv("FLEXKV_CONFIG_PATH", path, 1);
  CHECK_EQ(CacheOptions::from_file().tokens_per_block, 64);
  setenv("FLEXKV_NUM_CPU_BLOCKS", "17", 1);
  CHECK_EQ(CacheOptions::from_file(path).num_cpu_blocks, 17);
  unsetenv("FLEXKV_NUM_CPU_BLOCKS");
  CHECK_EQ(CacheOptions::from_file(path).num_cpu_blocks, 500000);
  std::remove(path);
  std::string e = error_of([] { CacheOptions::from_file(); });
  CHECK(contains(e, "(from FLEXKV_CONFIG_PATH) does not exist"));
  unsetenv("FLEXKV_CONFIG_PATH");
  CHECK_EQ(CacheOptions::from_file().num_cpu_blocks, 1000000);  // no file: the defaults, as Python's load_config
  CHECK(contains(error_of([] { CacheOptions::from_file("/tmp"); }), "is a directory"));
  const std::string yaml = std::string(path) + ".yaml";
  std::ofstream(yaml) << "cpu_cache_gb: 32\n";
  CHECK(contains(error_of([&] { CacheOptions::from_file(yaml); }), "only the Python API reads"));
  std::remove(yaml.c_str());
}

TEST(cache_open_refuses_what_it_does_not_serve_yet) {
  // The reader accepts every tier; flexkv::Cache serves the CPU and SSD tiers of one rank and says so for the rest.
  CacheOptions o = CacheOptions::from_json(R"({"cache_config": {"num_cpu_blocks": 4, "enable_remote": true,
                                               "num_remote_blocks": 100}})");
  ModelShape m = shape(1, 1, 8, flexkv::DType::kFloat16);
  CHECK(contains(error_of([&] { flexkv::Cache::open(o, m); }), "cache_config.enable_remote"));
  o.enable_remote = false;
  m.tp_size = 2;
  CHECK(contains(error_of([&] { flexkv::Cache::open(o, m); }), "model_config.tp_size"));
  m.tp_size = 1;
  CHECK(flexkv::Cache::open(o, m) != nullptr);
}

TEST_MAIN()
