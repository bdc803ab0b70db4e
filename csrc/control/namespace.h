// The one key scheme of every facade (KVManager, PageStore, the C++ Cache).
//
// A namespace is the model's KV fingerprint, tokens_per_block, the engine's
// layout tag (byte order inside a block; "" for FlexKV's canonical host block
// layout) and any number of salts (a manager-wide namespace, a request's
// cache_salt, a LoRA name, a tenant). Its seed is XXH3-128 over those parts,
// each length-prefixed, so no choice of salt can imitate another part. The
// same parts give the same seed in every language and process; two namespaces
// never share a block.
//
// Block keys come from the seed in one of two ways:
//  - token chains: key[i] = H(key[i-1] || tokens of block i), key[-1] = seed
//    (chain_block_keys in index/block_key.h);
//  - engine hashes: an engine that already hashes its blocks (vLLM's
//    request.block_hashes, SGLang's page hashes) passes the first 128 bits of
//    each; key[i] = salt(seed, hash[i]), a bijection of hash XOR seed. The
//    engine's hash must already name the block's whole prefix. The two kinds
//    never meet: the same tokens keyed both ways are two different blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "index/block_key.h"

namespace flexkv {

struct NamespaceSpec {
  std::string model_fingerprint;  // ModelShape::fingerprint()
  int tokens_per_block = 0;
  std::string layout_tag;
};

BlockKey namespace_seed(const NamespaceSpec& spec, const std::vector<std::string>& salts);

// out[i] = salt(seed, hashes[i]).
void salt_block_hashes(BlockKey seed, const BlockKey* hashes, size_t n, BlockKey* out);

}  // namespace flexkv
