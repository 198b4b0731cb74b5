// libtorch's profiler (Kineto; on CUDA through CUPTI) behind a C interface, which tch does
// not expose: every operation's CPU span and, on a GPU, every kernel's, those that CUDA graph
// replays run included, written as a Chrome trace (the file torch.profiler writes). Where
// Nsight Compute replays each kernel to time it (seconds for a decoding run of thousands of
// kernels), this records them as they run. Built by core/build.rs with the CUDA-graph shim.
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstring>
#include <exception>
#include <set>
#include <stdexcept>
#include <string>

namespace {

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

}  // namespace

extern "C" {

// Starts recording this process's operations, and with `cuda` the GPU's kernels.
int mtp_profile_start(int cuda, char* err, size_t len) {
  return guarded(err, len, [&] {
    using torch::profiler::impl::ActivityType;
    torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) {
      activities.insert(ActivityType::CUDA);
    }
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// Stops recording and writes the trace to `path` (JSON); a null `path` writes nothing.
int mtp_profile_stop(const char* path, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (path == nullptr) {
      return;
    }
    if (!result) {
      throw std::runtime_error("the profiler was not running");
    }
    result->save(path);
  });
}
}
