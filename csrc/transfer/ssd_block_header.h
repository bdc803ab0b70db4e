// The on-disk header of one SSD slot (internal to the SSD store).
//
// A slot is `header_bytes(tpb)` bytes of header followed by the payload padded
// to 4096. The header, little-endian:
//
//   offset  size  field
//        0     8  magic "FLEXKVB1"
//        8     4  format version (1)
//       12     4  tokens_per_block
//       16     8  fingerprint hash (XXH3-64 of the KV layout fingerprint)
//       24    16  key (lo, hi)
//       40    16  parent (lo, hi)
//       56     8  position
//       64     8  block_bytes
//       72     8  payload checksum (XXH3-64 of the block_bytes payload bytes)
//       80     8  header checksum (XXH3-64 of bytes [0, 88 + 8*tpb) with this field zeroed)
//       88 8*tpb  token ids (int64)
//
// then zeros up to a multiple of 4096. A never-written slot (zeros) has no magic,
// so it is not a valid header; a torn header fails the header checksum; a header
// whose payload is torn or stale fails the payload checksum.
#pragma once

#include <cstddef>
#include <cstdint>

#include "index/block_key.h"

namespace flexkv {
namespace ssd {

constexpr uint32_t kFormatVersion = 1;
constexpr uint64_t kAlign = 4096;
constexpr size_t kFixedBytes = 88;

inline uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
inline uint64_t header_bytes(uint32_t tokens_per_block) {
  return round_up(kFixedBytes + 8 * static_cast<uint64_t>(tokens_per_block), kAlign);
}

uint64_t hash64(const void* data, size_t len);  // XXH3-64

struct HeaderFields {
  uint64_t fingerprint_hash = 0;
  BlockKey key, parent;
  int64_t position = 0;
  uint32_t tokens_per_block = 0;
  uint64_t block_bytes = 0;
  uint64_t payload_checksum = 0;
};

// Writes a complete header (header_bytes(f.tokens_per_block) bytes, padding zeroed) to dst.
void encode_header(uint8_t* dst, const HeaderFields& f, const int64_t* tokens);

// Reads the fields of a header that was written for `tokens_per_block`: false unless the magic, the
// version, tokens_per_block and the header checksum are right. *tokens points into src.
bool decode_header(const uint8_t* src, uint32_t tokens_per_block, HeaderFields* f, const int64_t** tokens);

}  // namespace ssd
}  // namespace flexkv
