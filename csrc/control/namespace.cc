#include "control/namespace.h"

#include <string>

namespace flexkv {
namespace {

void append_part(std::string* out, const std::string& part) {
  *out += std::to_string(part.size());
  *out += ':';
  *out += part;
  *out += ';';
}

// The murmur3 finalizer: a bijection of 64 bits with full avalanche.
inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

}  // namespace

BlockKey namespace_seed(const NamespaceSpec& spec, const std::vector<std::string>& salts) {
  std::string text;
  append_part(&text, "flexkv-namespace-v2");
  append_part(&text, spec.model_fingerprint);
  append_part(&text, std::to_string(spec.tokens_per_block));
  append_part(&text, spec.layout_tag);
  for (const std::string& salt : salts) append_part(&text, salt);
  return namespace_key(text);
}

void salt_block_hashes(BlockKey seed, const BlockKey* hashes, size_t n, BlockKey* out) {
  // Two Feistel rounds over (lo, hi) ^ seed: invertible, so distinct hashes stay
  // distinct, and every output bit depends on every input bit.
  for (size_t i = 0; i < n; ++i) {
    uint64_t lo = hashes[i].lo ^ seed.lo;
    uint64_t hi = hashes[i].hi ^ seed.hi;
    hi ^= fmix64(lo);
    lo ^= fmix64(hi);
    out[i] = BlockKey{lo, hi};
  }
}

}  // namespace flexkv
