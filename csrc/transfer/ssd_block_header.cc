#include "ssd_block_header.h"

#include <cstring>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace flexkv {
namespace ssd {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the SSD header format is little-endian");

constexpr char kMagic[8] = {'F', 'L', 'E', 'X', 'K', 'V', 'B', '1'};
constexpr size_t kChecksumOffset = 80;

template <typename T>
void put(uint8_t* dst, size_t off, T v) {
  std::memcpy(dst + off, &v, sizeof(T));
}
template <typename T>
T get(const uint8_t* src, size_t off) {
  T v;
  std::memcpy(&v, src + off, sizeof(T));
  return v;
}

// The header checksum: XXH3-64 of the meaningful bytes with the checksum field read as zero.
uint64_t header_checksum(const uint8_t* h, uint32_t tokens_per_block) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  static const uint8_t zeros[8] = {};
  XXH3_64bits_update(&state, h, kChecksumOffset);
  XXH3_64bits_update(&state, zeros, sizeof(zeros));
  XXH3_64bits_update(&state, h + kFixedBytes, 8 * static_cast<size_t>(tokens_per_block));
  return XXH3_64bits_digest(&state);
}

}  // namespace

uint64_t hash64(const void* data, size_t len) { return XXH3_64bits(data, len); }

void encode_header(uint8_t* dst, const HeaderFields& f, const int64_t* tokens) {
  const size_t used = kFixedBytes + 8 * static_cast<size_t>(f.tokens_per_block);
  std::memcpy(dst, kMagic, sizeof(kMagic));
  put<uint32_t>(dst, 8, kFormatVersion);
  put<uint32_t>(dst, 12, f.tokens_per_block);
  put<uint64_t>(dst, 16, f.fingerprint_hash);
  put<uint64_t>(dst, 24, f.key.lo);
  put<uint64_t>(dst, 32, f.key.hi);
  put<uint64_t>(dst, 40, f.parent.lo);
  put<uint64_t>(dst, 48, f.parent.hi);
  put<int64_t>(dst, 56, f.position);
  put<uint64_t>(dst, 64, f.block_bytes);
  put<uint64_t>(dst, 72, f.payload_checksum);
  put<uint64_t>(dst, kChecksumOffset, 0);
  std::memcpy(dst + kFixedBytes, tokens, 8 * static_cast<size_t>(f.tokens_per_block));
  std::memset(dst + used, 0, header_bytes(f.tokens_per_block) - used);
  put<uint64_t>(dst, kChecksumOffset, header_checksum(dst, f.tokens_per_block));
}

bool decode_header(const uint8_t* src, uint32_t tokens_per_block, HeaderFields* f, const int64_t** tokens) {
  if (std::memcmp(src, kMagic, sizeof(kMagic)) != 0) return false;
  if (get<uint32_t>(src, 8) != kFormatVersion) return false;
  if (get<uint32_t>(src, 12) != tokens_per_block) return false;
  if (get<uint64_t>(src, kChecksumOffset) != header_checksum(src, tokens_per_block)) return false;
  f->tokens_per_block = tokens_per_block;
  f->fingerprint_hash = get<uint64_t>(src, 16);
  f->key = BlockKey{get<uint64_t>(src, 24), get<uint64_t>(src, 32)};
  f->parent = BlockKey{get<uint64_t>(src, 40), get<uint64_t>(src, 48)};
  f->position = get<int64_t>(src, 56);
  f->block_bytes = get<uint64_t>(src, 64);
  f->payload_checksum = get<uint64_t>(src, 72);
  *tokens = reinterpret_cast<const int64_t*>(src + kFixedBytes);  // 8-aligned: the header buffer is 4096-aligned
  return true;
}

}  // namespace ssd
}  // namespace flexkv
