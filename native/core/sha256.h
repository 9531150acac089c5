// SHA-256 (FIPS 180-4), small and dependency-free, used to verify bundle files before loading them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace blip3o {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hexDigest();  // finishes the hash; lowercase hex, 64 characters

 private:
  void blocks(const uint8_t* p, size_t n);  // n whole 64-byte blocks
  void block(const uint8_t* p);             // the portable code, one block
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t bufLen_ = 0;
  uint64_t total_ = 0;
};

// Hash of a whole file; throws std::runtime_error when it cannot be read. `between` runs between
// 1 MiB chunks (a cancellation check: bundles can be gigabytes).
std::string sha256File(const std::string& path, const std::function<void()>& between = {});

}  // namespace blip3o
