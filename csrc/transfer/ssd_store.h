// SsdStore: the SSD tier's block store. Whole host blocks live in numbered
// slots of preallocated O_DIRECT files; every slot carries a header (key,
// parent, position, token ids, checksums) so a read can verify what it got and
// a restart can rebuild the index from disk (scan()).
//
// Slot s lives in dirs[s % dirs.size()], in <dir>/flexkv-<16 hex of
// XXH3-64(fingerprint)>/. Inside a directory, its slots follow each other
// (header, payload, header, payload, ...), in one file or, with max_file_bytes,
// in files blocks-000000.dat, blocks-000001.dat, ... of at most that size.
// Blocks with neighbouring slots in one file move in one readv/writev (runs are
// cut every 2 MiB, so many requests stay in flight and the checksum work of one
// overlaps the I/O of the others).
//
// All I/O goes through an IoEnv (io_env.h); the store is thread-safe for
// disjoint slots.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "index/block_key.h"
#include "transfer/io_env.h"

namespace flexkv {

struct SsdStoreOptions {
  std::vector<std::string> dirs;  // blocks are striped across them: slot s lives in dirs[s % dirs.size()]
  int64_t num_blocks = 0;         // slots 0..num_blocks-1
  uint64_t block_bytes = 0;       // payload bytes of one block
  uint32_t tokens_per_block = 0;
  std::string fingerprint;        // the KV layout fingerprint; files live in <dir>/flexkv-<16 hex of XXH3-64(fingerprint)>/
  uint64_t max_file_bytes = 0;    // 0: one file per dir; else each dir's slots are split over files of at most this size
};

struct SsdBlock {  // one block to write or read
  int32_t slot;
  BlockKey key, parent;   // parent: the previous block's key (the namespace seed for position 0)
  int64_t position;       // the block's index in its sequence
  const int64_t* tokens;  // tokens_per_block token ids
  uint8_t* payload;       // 4096-aligned; round_up(block_bytes, 4096) bytes may be read/written there
};

enum class SsdStatus : int32_t { kOk = 0, kMismatch = 1, kIoError = 2 };

struct SsdEntry {
  int32_t slot;
  BlockKey key, parent;
  int64_t position;
};

class SsdStore {
 public:
  // Creates <dir>/flexkv-<fp>/ and the preallocated files. Throws std::invalid_argument for impossible
  // options and std::runtime_error naming the directory and the remedy when a directory is missing and
  // cannot be created, is not writable, has no O_DIRECT support or not enough space.
  SsdStore(SsdStoreOptions options, std::shared_ptr<IoEnv> env);
  ~SsdStore();
  SsdStore(const SsdStore&) = delete;
  SsdStore& operator=(const SsdStore&) = delete;

  // Writes header + payload per block; blocks with consecutive slots in one file go in one writev.
  // status[i]: kOk, or kIoError (the slot's content is then undefined: a later read reports kMismatch).
  // Throws std::out_of_range / std::invalid_argument (bad slot, duplicate slot, unaligned or null
  // buffers) before any I/O.
  void write(const SsdBlock* blocks, size_t n, SsdStatus* status);
  // Reads header + payload into each block's payload buffer and verifies magic, version, fingerprint
  // hash, key, parent, position, tokens, payload length, payload checksum and header checksum.
  // status[i]: kOk only when all match; kMismatch on any difference (or past the end of a truncated
  // file); kIoError when the read failed. Coalesces like write. A payload buffer holds the block only
  // where the status is kOk; elsewhere its content is undefined.
  void read(const SsdBlock* blocks, size_t n, SsdStatus* status);
  // Reads the headers of slots 0..limit-1 (every slot when limit < 0) in big batches and returns, by
  // slot, those whose header is intact and matches this store's fingerprint and geometry (the payload
  // is checked by read()). `progress`, when set, is called after each batch with (slots scanned, slots to
  // scan, intact headers found so far); a scan of many slots runs in at least 16 batches so that it can
  // report its progress.
  using ScanProgress = std::function<void(uint64_t scanned, uint64_t total, uint64_t found)>;
  std::vector<SsdEntry> scan(int64_t limit = -1, const ScanProgress& progress = nullptr);
  // Overwrites those slots' headers so scan() never returns them (and read() reports kMismatch).
  // Throws std::runtime_error if some header could not be overwritten.
  void invalidate(const int32_t* slots, size_t n);
  // flexkv-* subdirectories of the dirs written with another fingerprint (ignored, reported, never touched).
  std::vector<std::string> foreign_subdirs() const;
  uint64_t slot_bytes() const;  // header bytes + round_up(block_bytes, 4096)
  std::string io_env_name() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace flexkv
