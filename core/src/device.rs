//! Where tensors live and in which precision they compute.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Error, Result};

/// A compute device as the user names it: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceSpec {
    /// The host CPU.
    #[default]
    Cpu,
    /// CUDA device with this index.
    Cuda(usize),
}

impl DeviceSpec {
    /// The tch device, after checking that a CUDA device with that index exists.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => {
                let n = tch::Cuda::device_count();
                if (i as i64) < n {
                    Ok(Device::Cuda(i))
                } else {
                    Err(Error::Invalid(format!("device cuda:{i} requested but libtorch sees {n} CUDA device(s)")))
                }
            }
        }
    }

    /// The best device present: `cuda:0` when libtorch sees a GPU, else the CPU.
    pub fn best_available() -> Self {
        if tch::Cuda::is_available() { DeviceSpec::Cuda(0) } else { DeviceSpec::Cpu }
    }

    /// True for a CUDA device.
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// Every device libtorch can see, CPU first.
    pub fn all_available() -> Vec<Self> {
        let n = tch::Cuda::device_count().max(0) as usize;
        std::iter::once(DeviceSpec::Cpu).chain((0..n).map(DeviceSpec::Cuda)).collect()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| Error::Invalid(format!("unknown device `{s}` (use cpu, cuda or cuda:N)"))),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// A floating-point precision for weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DType {
    /// The precision a device computes in unless told otherwise: bf16 on CUDA (half the
    /// memory traffic, tensor cores), f32 on the CPU (where bf16 is emulated and slower).
    pub fn default_for(device: DeviceSpec) -> Self {
        match device {
            DeviceSpec::Cuda(_) => DType::Bf16,
            DeviceSpec::Cpu => DType::F32,
        }
    }

    /// The tch kind.
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    /// The dtype of a tch kind, if it is one of ours.
    pub fn from_kind(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Float => Some(DType::F32),
            Kind::BFloat16 => Some(DType::Bf16),
            Kind::Half => Some(DType::F16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            other => Err(Error::Invalid(format!("unknown dtype `{other}` (use f32, bf16 or f16)"))),
        }
    }
}

/// Run `init` with torch's global generator seeded with `seed`, holding a process-wide lock
/// so that another thread seeding or drawing through this function cannot interleave its
/// draws (torch has one global generator per device; two trainings started at once in one
/// process, as tests do, would otherwise get each other's numbers).
pub fn seeded<T>(seed: u64, init: impl FnOnce() -> T) -> T {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A panic inside another initialisation leaves nothing half-done here: go on.
    let _guard = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed as i64);
    init()
}

/// The memory a device offers, in bytes: a CUDA card's total (from `nvidia-smi`), or the
/// memory the system has available now (`MemAvailable` of `/proc/meminfo`). `None` where
/// it cannot be read.
pub fn device_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => nvidia_smi_bytes("memory.total", i),
        _ => proc_kib("/proc/meminfo", "MemAvailable:").map(|k| k * 1024),
    }
}

/// GPU memory in use on `device` (the whole card, from the driver), when it is a GPU.
pub fn gpu_memory_used(device: Device) -> Option<u64> {
    let Device::Cuda(i) = device else { return None };
    nvidia_smi_bytes("memory.used", i)
}

/// A memory figure of card `index` from `nvidia-smi` (which reports MiB).
fn nvidia_smi_bytes(query: &str, index: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([format!("--query-gpu={query}"), "--format=csv,noheader,nounits".into(), format!("--id={index}")])
        .output()
        .ok()?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib * 1024 * 1024)
}

/// This process's resident memory now (`VmRSS`) and at its peak (`VmHWM`), in bytes, where
/// the system reports them (Linux).
pub fn process_memory() -> Option<(u64, u64)> {
    let now = proc_kib("/proc/self/status", "VmRSS:")?;
    let peak = proc_kib("/proc/self/status", "VmHWM:")?;
    Some((now * 1024, peak * 1024))
}

/// The number of kiB on the line starting with `key` in `path`.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip() -> Result<()> {
        for (text, spec) in [("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda(0)), ("cuda:3", DeviceSpec::Cuda(3))] {
            assert_eq!(text.parse::<DeviceSpec>()?, spec);
            assert_eq!(spec.to_string().parse::<DeviceSpec>()?, spec);
        }
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        Ok(())
    }

    #[test]
    fn dtype_names_round_trip() -> Result<()> {
        for d in [DType::F32, DType::Bf16, DType::F16] {
            assert_eq!(d.to_string().parse::<DType>()?, d);
            assert_eq!(DType::from_kind(d.kind()), Some(d));
        }
        assert!("int8".parse::<DType>().is_err());
        Ok(())
    }
}
