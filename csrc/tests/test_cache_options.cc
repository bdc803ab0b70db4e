#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "check.h"
#include "flexkv/cache_options.h"
#include "json_value.h"

using flexkv::CacheOptions;

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

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The manual's 17.4.2 cache_config, comments included, with SSD left disabled.
const char* kManualStyle = R"({
    "server_recv_port": "ipc:///tmp/flexkv_test",
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

}  // namespace

TEST(reads_the_manuals_keys_and_comments) {
  const CacheOptions o = CacheOptions::from_json(kManualStyle, "manual.json");
  CHECK_EQ(o.tokens_per_block, 64);
  CHECK_EQ(o.num_cpu_blocks, 500000);
  CHECK(o.use_ce_transfer_h2d);
  CHECK(!o.use_ce_transfer_d2h);
  CHECK_EQ(o.transfer_sms_h2d, 16);
  CHECK(o.model.has_value());
  CHECK_EQ(o.model->num_layers, 4);
  CHECK(o.model->dtype == flexkv::DType::kBFloat16);
  CHECK_EQ(o.model->block_bytes(64), 4ull * 2 * 64 * 8 * 128 * 2);
}

TEST(short_form_sizes_the_tier_in_gib) {
  const CacheOptions o = CacheOptions::from_json(R"({"cpu_cache_gb": 1})");
  flexkv::ModelShape m;
  m.num_layers = 2;
  m.num_kv_heads = 2;
  m.head_size = 64;
  m.dtype = flexkv::DType::kFloat16;
  // 1 GiB / (2 layers * 2 * 16 tokens * 2 heads * 64 * 2 bytes) = 1 GiB / 16 KiB.
  CHECK_EQ(o.cpu_blocks_for(m), 65536);
}

TEST(errors_name_the_key_and_the_fix) {
  std::string e = error_of([] { CacheOptions::from_json(R"({"cache_config": {"num_cpu_block": 10}})", "f.json"); });
  CHECK(contains(e, "f.json: cache_config.num_cpu_block: unknown key"));
  CHECK(contains(e, "did you mean \"num_cpu_blocks\""));

  e = error_of([] { CacheOptions::from_json(R"({"cache_config": {"num_cpu_blocks": 10, "enable_ssd": true}})"); });
  CHECK(contains(e, "cache_config.enable_ssd"));
  CHECK(contains(e, "CPU tier only"));

  e = error_of([] { CacheOptions::from_json(R"({"cache_config": {"num_cpu_blocks": true}})"); });
  CHECK(contains(e, "cache_config.num_cpu_blocks: expected a whole number, got true"));

  e = error_of([] { CacheOptions::from_json(R"({"cache_config": {"num_cpu_blocks": 10, "evict_ratio": 1.5}})"); });
  CHECK(contains(e, "evict_ratio"));

  e = error_of([] { CacheOptions::from_json(R"({"cache_config": {"tokens_per_block": 16}})"); });
  CHECK(contains(e, "needs a size"));

  e = error_of([] { CacheOptions::from_json(R"({"cache_config": {"num_cpu_blocks": 4, "cpu_cache_gb": 1}})"); });
  CHECK(contains(e, "not both"));

  e = error_of([] {
    CacheOptions::from_json(R"({"cpu_cache_gb": 1, "model_config": {"num_layers": 2, "num_kv_heads": 2,
                                "head_size": 8, "dtype": "fp7"}})");
  });
  CHECK(contains(e, "model_config.dtype: unknown dtype \"fp7\""));

  e = error_of([] { CacheOptions::from_json(R"({"cpu_cache_gb": 1, "model_config": {"num_layers": 2}})"); });
  CHECK(contains(e, "model_config.num_kv_heads: missing"));

  e = error_of([] {
    CacheOptions::from_json(R"({"cpu_cache_gb": 1, "model_config": {"num_layers": 2, "num_kv_heads": 2,
                                "head_size": 8, "tp_size": 2}})");
  });
  CHECK(contains(e, "model_config.tp_size"));
}

TEST(syntax_errors_give_line_and_column) {
  std::string e = error_of([] { CacheOptions::from_json("{\n  \"cache_config\": {\n    \"num_cpu_blocks\": 10,,\n", "x.json"); });
  CHECK(contains(e, "x.json:3:"));
  e = error_of([] { CacheOptions::from_json(R"({"cpu_cache_gb": 1, "cpu_cache_gb": 2})", "dup.json"); });
  CHECK(contains(e, "appears twice"));
  e = error_of([] { CacheOptions::from_json("{} trailing", "t.json"); });
  CHECK(contains(e, "unexpected text"));
  e = error_of([] { CacheOptions::from_json("{ /* open", "c.json"); });
  CHECK(contains(e, "not closed"));
}

TEST(json_values_parse_exactly) {
  const auto v = flexkv::detail::parse_json(R"({"a": [1, -2.5e3, "x\u00e9\n", null, false], "b": {}})", "t");
  const auto* a = v.find("a");
  CHECK(a != nullptr && a->items.size() == 5);
  CHECK(a->items[0].integral && a->items[0].integer == 1);
  CHECK(!a->items[1].integral && a->items[1].number == -2500.0);
  CHECK_EQ(a->items[2].text, std::string("x\xc3\xa9\n"));
  CHECK(a->items[3].kind == flexkv::detail::JsonValue::Kind::kNull);
  CHECK(v.find("b") != nullptr && v.find("b")->members.empty());
  CHECK(v.find("c") == nullptr);
}

TEST(from_file_reads_flexkv_config_path) {
  char path[] = "/tmp/flexkv_cfg_XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  {
    std::ofstream out(path);
    out << kManualStyle;
  }
  setenv("FLEXKV_CONFIG_PATH", path, 1);
  CHECK_EQ(CacheOptions::from_file().tokens_per_block, 64);
  CHECK_EQ(CacheOptions::from_file(path).num_cpu_blocks, 500000);
  std::remove(path);
  const std::string e = error_of([] { CacheOptions::from_file(); });
  CHECK(contains(e, "FLEXKV_CONFIG_PATH"));
  CHECK(contains(e, "cannot be read"));
  unsetenv("FLEXKV_CONFIG_PATH");
  CHECK(contains(error_of([] { CacheOptions::from_file(); }), "FLEXKV_CONFIG_PATH is not set"));
}

TEST_MAIN()
