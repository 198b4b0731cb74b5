//! libtorch's profiler (Kineto, and on CUDA CUPTI) over some stretch of work, written as a
//! Chrome trace, the file `torch.profiler` writes: every libtorch operation's span on the
//! CPU and, on a GPU, every kernel's, those of CUDA graph replays included. tch does not
//! expose the profiler: `core/csrc/profiler.cpp` wraps it, built with the CUDA-graph shim
//! (core/build.rs); builds without it say so.
//!
//! Unsafe code: the calls into the C++ shim.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int};
use std::path::Path;

use tch::Device;

use super::cuda_graph::call;
use crate::error::{Error, Result};

#[cfg(mtp_cuda_graphs)]
unsafe extern "C" {
    fn mtp_profile_start(cuda: c_int, err: *mut c_char, len: usize) -> c_int;
    fn mtp_profile_stop(path: *const c_char, err: *mut c_char, len: usize) -> c_int;
}

/// Without the shim: every call fails.
#[cfg(not(mtp_cuda_graphs))]
mod absent {
    use super::{c_char, c_int};
    pub unsafe fn mtp_profile_start(_: c_int, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn mtp_profile_stop(_: *const c_char, _: *mut c_char, _: usize) -> c_int {
        -1
    }
}
#[cfg(not(mtp_cuda_graphs))]
use absent::*;

/// A recording in progress; [`Trace::finish`] writes it. Dropped unfinished, it stops and
/// writes nothing.
#[derive(Debug)]
pub struct Trace {
    running: bool,
}

impl Trace {
    /// Start recording this process's libtorch operations, and on a CUDA `device` the GPU's
    /// kernels too.
    pub fn start(device: Device) -> Result<Self> {
        let cuda = c_int::from(device.is_cuda());
        // SAFETY: the shim takes an error buffer of the length given.
        call("profiler start", |e, n| unsafe { mtp_profile_start(cuda, e, n) })?;
        Ok(Self { running: true })
    }

    /// Stop recording and write the trace to `path` (JSON).
    pub fn finish(mut self, path: &Path) -> Result<()> {
        self.running = false;
        let name = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| Error::Invalid(format!("{}: a path with a NUL byte", path.display())))?;
        // SAFETY: `name` is a NUL-terminated string alive for the call.
        call("profiler trace", |e, n| unsafe { mtp_profile_stop(name.as_ptr(), e, n) })
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if self.running {
            let mut buf = [0 as c_char; 1024];
            // SAFETY: a null path stops the profiler without writing.
            unsafe { mtp_profile_stop(std::ptr::null(), buf.as_mut_ptr(), buf.len()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// On the CPU the trace holds the operations run while it recorded (where the build
    /// has the shim; elsewhere starting is an error, not a crash).
    #[test]
    fn a_trace_holds_the_operations_run_while_it_recorded() {
        let trace = match Trace::start(Device::Cpu) {
            Ok(t) => t,
            Err(e) if !crate::model::CudaGraph::AVAILABLE => {
                assert!(e.to_string().contains("not in this build"), "{e}");
                return;
            }
            Err(e) => panic!("the profiler is in this build, yet: {e}"),
        };
        let x = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let _ = x.mm(&x).sum(Kind::Float);
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("trace.json");
        trace.finish(&path).expect("the trace written");
        let text = std::fs::read_to_string(&path).expect("the trace read");
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let names: Vec<&str> =
            json["traceEvents"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
        assert!(names.contains(&"aten::mm"), "{:?}", &names[..names.len().min(20)]);
        assert!(names.contains(&"aten::sum"), "{:?}", &names[..names.len().min(20)]);
        // Dropped unfinished: stops, and a new recording can start.
        drop(Trace::start(Device::Cpu).expect("started again"));
        Trace::start(Device::Cpu).expect("and again").finish(&path).expect("written again");
    }
}
