//! Link facts for libtorch (see scripts/link_libtorch.rs), and the CUDA-graph and profiler
//! shims (csrc/cuda_graph.cpp, csrc/profiler.cpp) where libtorch's CUDA headers and the CUDA
//! runtime's are found.

include!("../scripts/link_libtorch.rs");

use std::path::{Path, PathBuf};

fn main() {
    link_libtorch();
    println!("cargo::rustc-check-cfg=cfg(mtp_cuda_graphs)");
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(lib) = torch_lib() else { return };
    // Headers installed later (scripts/setup.sh) bring the shim in on the next build.
    if let Some(cu13) = cuda_candidate(&lib) {
        println!("cargo:rerun-if-changed={}", cu13.join("include/crt").display());
    }
    if !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    let Some(cuda) = cuda_dir(&lib) else {
        println!(
            "cargo:warning=CUDA graphs left out of this build: no CUDA runtime headers with crt/host_config.h \
             next to libtorch (scripts/setup.sh installs them: nvidia-cuda-crt)"
        );
        return;
    };
    let torch = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    if !torch.join("include/ATen/cuda/CUDAGraph.h").exists() {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .opt_level(2)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda.join("include"))
        .flag("-std=c++17")
        .flag(format!(
            "-D_GLIBCXX_USE_CXX11_ABI={}",
            std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
        ))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/cuda_graph.cpp")
        .file("csrc/profiler.cpp")
        .compile("mtp_cuda_graph");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-search=native={}", cuda.join("lib").display());
    for name in ["torch_cuda", "c10_cuda", "c10"] {
        println!("cargo:rustc-link-lib=dylib={name}");
    }
    println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    println!("cargo:rustc-cfg=mtp_cuda_graphs");
}

/// libtorch's lib folder, as torch-sys found it.
fn torch_lib() -> Option<PathBuf> {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?;
    Some(std::fs::canonicalize(&lib).unwrap_or_else(|_| PathBuf::from(lib)))
}
