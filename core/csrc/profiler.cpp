// libtorch's profiler (Kineto; on CUDA through CUPTI) behind a C interface, which tch does
// not expose: every operation's CPU span and, on a GPU, every kernel's, those that CUDA graph
// replays run included, written as a Chrome trace (the file torch.profiler writes). Where
// Nsight Compute replays each kernel to time it (seconds for a decoding run of thousands of
// kernels), this records them as they run. Built by core/build.rs with the CUDA-graph shim.
#include <torch/csrc/autograd/profiler_kineto.h>

#include "guarded.h"

#include <set>
#include <stdexcept>
#include <string>

using mtp_shim::guarded;

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
