// Shared by core/build.rs and app/build.rs (included with `include!`): each package that
// links binaries (tests, examples, executables) needs the same link facts, and a build
// script's link arguments do not reach dependent packages.
//
// 1. An rpath to libtorch's folder, so binaries run without LD_LIBRARY_PATH; and to the CUDA
//    runtime's, which the CUDA-graph shim links directly (core/csrc/cuda_graph.cpp).
// 2. `libtorch_cuda.so` linked with --no-as-needed: nothing references its symbols directly,
//    so the default --as-needed drops it and libtorch then reports no CUDA device.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| std::path::PathBuf::from(&lib));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if let Some(cuda) = cuda_dir(&lib) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cuda.join("lib").display());
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The CUDA 13 runtime of a PyPI torch (site-packages/nvidia/cu13, beside torch/): its
/// `lib` holds libcudart.so.13; it counts only with the headers the shim compiles against
/// (crt/host_config.h comes from the nvidia-cuda-crt wheel).
fn cuda_dir(torch_lib: &std::path::Path) -> Option<std::path::PathBuf> {
    let dir = cuda_candidate(torch_lib)?;
    let complete = dir.join("include/cuda_runtime_api.h").exists()
        && dir.join("include/crt/host_config.h").exists()
        && dir.join("lib/libcudart.so.13").exists();
    complete.then_some(dir)
}

/// Where a PyPI torch keeps its CUDA 13 runtime, whether or not it is there.
fn cuda_candidate(torch_lib: &std::path::Path) -> Option<std::path::PathBuf> {
    Some(torch_lib.parent()?.parent()?.join("nvidia").join("cu13"))
}
