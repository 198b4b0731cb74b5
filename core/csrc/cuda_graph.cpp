// CUDA graphs for tch: libtorch's at::cuda::CUDAGraph behind a C interface, which tch does
// not expose. A graph records the kernels that Rust code launches between capture_begin and
// capture_end on a side stream (the graph's own), and replays them with one launch; the
// tensors that the recorded code made stay alive in the graph's memory pool, and each replay
// writes into them again. Built by core/build.rs only where libtorch's CUDA headers are found.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "guarded.h"

#include <optional>
#include <string>

namespace {

struct Graph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream stream;
  std::optional<c10::cuda::CUDAStreamGuard> guard;
  explicit Graph(int device) : stream(c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device))) {}
};

}  // namespace

using mtp_shim::guarded;

extern "C" {

void* mtp_graph_new(int device, char* err, size_t len) {
  Graph* g = nullptr;
  guarded(err, len, [&] { g = new Graph(device); });
  return g;
}

// Makes the graph's stream the current one (for warm-up runs and the capture).
int mtp_graph_enter(void* g, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* graph = static_cast<Graph*>(g);
    graph->guard.emplace(graph->stream);
  });
}

// Back to the stream that was current before mtp_graph_enter.
int mtp_graph_leave(void* g, char* err, size_t len) {
  return guarded(err, len, [&] { static_cast<Graph*>(g)->guard.reset(); });
}

int mtp_graph_capture_begin(void* g, char* err, size_t len) {
  return guarded(err, len, [&] { static_cast<Graph*>(g)->graph.capture_begin(); });
}

int mtp_graph_capture_end(void* g, char* err, size_t len) {
  return guarded(err, len, [&] { static_cast<Graph*>(g)->graph.capture_end(); });
}

// Ends a recording that the code it recorded broke off: capture_end stops the stream's
// capture and gives the memory allocator back its ordinary pools before it checks (and here
// rejects) the recording. Errors are expected and dropped.
void mtp_graph_abort(void* g) {
  try {
    static_cast<Graph*>(g)->graph.capture_end();
  } catch (...) {
  }
}

// Replays the recorded kernels on the current stream.
int mtp_graph_replay(void* g, char* err, size_t len) {
  return guarded(err, len, [&] { static_cast<Graph*>(g)->graph.replay(); });
}

void mtp_graph_free(void* g) {
  auto* graph = static_cast<Graph*>(g);
  graph->guard.reset();
  delete graph;
}
}
