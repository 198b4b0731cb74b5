//! CUDA graphs: a decoding step's kernels recorded once and replayed with one launch.
//!
//! On a GPU every libtorch operation costs a launch from the host (about 10 us on the H200
//! the GPU sections of docs/BENCHMARKS.md measured), so a small model's decoding step, or a
//! large one's at batch 1, waits on launches rather than on the GPU. A graph records the
//! kernels that some Rust code launches (shapes fixed, no read back to the host), and
//! [`CudaGraph::replay`] runs them all again with one launch, reading and writing the same
//! tensors: the caller changes the inputs in place between replays and reads the outputs
//! the recording returned. libtorch has the graphs (`at::cuda::CUDAGraph`) and tch does not
//! expose them: `core/csrc/cuda_graph.cpp` wraps them for this module. Builds without the
//! CUDA headers (core/build.rs says which) have no graphs: [`CudaGraph::AVAILABLE`] is false
//! and [`CudaGraph::capture`] an error.
//!
//! Unsafe code: the calls into the C++ shim, each on the graph this module made and owns.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};

use tch::Device;

use crate::error::{Error, Result};

#[cfg(mtp_cuda_graphs)]
unsafe extern "C" {
    fn mtp_graph_new(device: c_int, err: *mut c_char, len: usize) -> *mut c_void;
    fn mtp_graph_enter(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn mtp_graph_leave(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn mtp_graph_capture_begin(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn mtp_graph_capture_end(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn mtp_graph_replay(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn mtp_graph_abort(g: *mut c_void);
    fn mtp_graph_free(g: *mut c_void);
}

/// Without the shim: every call fails (capture never gets as far as making a graph).
#[cfg(not(mtp_cuda_graphs))]
mod absent {
    use super::{c_char, c_int, c_void};
    pub unsafe fn mtp_graph_new(_: c_int, _: *mut c_char, _: usize) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn mtp_graph_enter(_: *mut c_void, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn mtp_graph_leave(_: *mut c_void, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn mtp_graph_capture_begin(_: *mut c_void, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn mtp_graph_capture_end(_: *mut c_void, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn mtp_graph_replay(_: *mut c_void, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn mtp_graph_abort(_: *mut c_void) {}
    pub unsafe fn mtp_graph_free(_: *mut c_void) {}
}
#[cfg(not(mtp_cuda_graphs))]
use absent::*;

/// One recorded sequence of kernels on one CUDA device.
#[derive(Debug)]
pub struct CudaGraph {
    ptr: *mut c_void,
}

// The graph is an owned C++ object with no thread affinity; replays are ordered on the
// calling thread's current stream.
unsafe impl Send for CudaGraph {}

/// The error for a failed shim call, from the message it left in `buf`.
pub(crate) fn failure(what: &str, buf: &[c_char; 1024]) -> Error {
    // SAFETY: the buffer is zeroed, and the shim writes a NUL-terminated message into it.
    let msg = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    Error::Invalid(format!("{what}: {}", if msg.is_empty() { "not in this build" } else { &msg }))
}

/// Calls one shim function with an error buffer; its message on failure.
pub(crate) fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buf = [0 as c_char; 1024];
    if f(buf.as_mut_ptr(), buf.len()) == 0 { Ok(()) } else { Err(failure(what, &buf)) }
}

impl CudaGraph {
    /// Whether this build has CUDA graphs.
    pub const AVAILABLE: bool = cfg!(mtp_cuda_graphs);

    /// Record what `record` launches on `device`: it runs `warmups` times first on the
    /// graph's stream (libraries make their handles and workspaces then, outside the
    /// recording), then once recorded. Its last result holds the tensors that each replay
    /// writes. `record` must keep every shape fixed and never read from the device.
    pub fn capture<T>(device: Device, warmups: usize, mut record: impl FnMut() -> T) -> Result<(Self, T)> {
        let Device::Cuda(index) = device else {
            return Err(Error::Invalid(format!("CUDA graphs need a CUDA device, not {device:?}")));
        };
        let mut buf = [0 as c_char; 1024];
        // SAFETY: the shim returns an owned graph or null (with a message in the buffer).
        let ptr = unsafe { mtp_graph_new(index as c_int, buf.as_mut_ptr(), buf.len()) };
        if ptr.is_null() {
            return Err(failure("CUDA graph creation", &buf));
        }
        let graph = Self { ptr };
        tch::Cuda::synchronize(index as i64);
        // SAFETY: `ptr` is the live graph made above (here and below).
        call("CUDA graph stream", |e, n| unsafe { mtp_graph_enter(graph.ptr, e, n) })?;
        let recorded = (|| -> Result<T> {
            for _ in 0..warmups {
                drop(record());
            }
            tch::Cuda::synchronize(index as i64);
            call("CUDA graph capture", |e, n| unsafe { mtp_graph_capture_begin(graph.ptr, e, n) })?;
            // tch panics on libtorch's errors (an operation not allowed while recording, say):
            // the recording is then ended, so that the stream and the allocator are usable.
            let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut record)) {
                Ok(out) => out,
                Err(panic) => {
                    unsafe { mtp_graph_abort(graph.ptr) };
                    let msg = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    return Err(Error::Invalid(format!("CUDA graph recording: {msg}")));
                }
            };
            call("CUDA graph capture", |e, n| unsafe { mtp_graph_capture_end(graph.ptr, e, n) })?;
            Ok(out)
        })();
        let left = call("CUDA graph stream", |e, n| unsafe { mtp_graph_leave(graph.ptr, e, n) });
        let out = recorded?;
        left?;
        tch::Cuda::synchronize(index as i64);
        Ok((graph, out))
    }

    /// Run the recorded kernels again, on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `ptr` is this graph, alive until drop.
        call("CUDA graph replay", |e, n| unsafe { mtp_graph_replay(self.ptr, e, n) })
    }
}

/// How decoding steps run: the ordinary passes, or passes whose shapes never change
/// ([`crate::model::Llama::forward_in_place`] and the speculative step's counterpart),
/// recorded as CUDA graphs and replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepGraphs {
    /// The ordinary passes.
    #[default]
    Off,
    /// Fixed-shape passes recorded as CUDA graphs and replayed (on a CUDA device in a build
    /// that has graphs; elsewhere the same as `Off`).
    Record,
    /// The fixed-shape passes run eagerly each step, nothing recorded: on the CPU, the tests'
    /// stand-in for a replay (the same code, the same bookkeeping).
    Eager,
}

/// One decoding step of fixed shapes: recorded once and replayed, or with
/// [`StepGraphs::Eager`] run again each time. `T` holds the tensors the step writes.
#[derive(Debug)]
pub struct FixedStep<T> {
    out: T,
    graph: Option<CudaGraph>,
}

impl<T> FixedStep<T> {
    /// Record `body` on `device` (`record`: two warm-up runs, then the recording, which
    /// runs nothing), or run it once eagerly. What it returns holds valid values only after
    /// [`FixedStep::run`]: callers record a step that they then run.
    pub fn new(device: Device, record: bool, mut body: impl FnMut() -> T) -> Result<Self> {
        if record {
            let (graph, out) = CudaGraph::capture(device, 2, body)?;
            Ok(Self { out, graph: Some(graph) })
        } else {
            Ok(Self { out: body(), graph: None })
        }
    }

    /// Run the step on the current inputs: a replay, or `body` again where nothing was
    /// recorded. Returns what the step wrote.
    pub fn run(&mut self, body: impl FnOnce() -> T) -> Result<&T> {
        match &self.graph {
            Some(graph) => graph.replay()?,
            None => self.out = body(),
        }
        Ok(&self.out)
    }

    /// True when the step replays a recorded graph.
    pub fn replays(&self) -> bool {
        self.graph.is_some()
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: made by mtp_graph_new, freed once.
        unsafe { mtp_graph_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_on_the_cpu_is_an_error_not_a_crash() {
        let err = CudaGraph::capture(Device::Cpu, 1, || ()).expect_err("no graphs on the CPU");
        assert!(err.to_string().contains("CUDA device"), "{err}");
    }

    /// Without a GPU the shim itself fails (libtorch finds no device): its C++ exception
    /// comes back as an error with libtorch's message, and nothing runs `record`.
    #[test]
    fn a_failure_inside_the_shim_comes_back_as_its_message() {
        if tch::Cuda::is_available() {
            return;
        }
        let mut ran = false;
        let err = CudaGraph::capture(Device::Cuda(0), 1, || ran = true).expect_err("no CUDA device here");
        assert!(!ran);
        let msg = err.to_string();
        assert!(msg.starts_with("CUDA graph creation: "), "{msg}");
        if CudaGraph::AVAILABLE {
            assert!(!msg.ends_with("not in this build"), "{msg}");
        }
    }
}
