// What the C shims share: a C++ exception turned into a message for the Rust side.
#pragma once

#include <cstring>
#include <exception>

namespace mtp_shim {

// Runs `f`; a C++ exception becomes its message in `err` (of `len` bytes) and -1.
template <typename F>
int guarded(char* err, size_t len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && len > 0) {
      std::strncpy(err, e.what(), len - 1);
      err[len - 1] = '\0';
    }
    return -1;
  } catch (...) {
    if (err != nullptr && len > 0) {
      std::strncpy(err, "an exception that is not a std::exception", len - 1);
      err[len - 1] = '\0';
    }
    return -1;
  }
}

}  // namespace mtp_shim
