// Shared by core/build.rs and app/build.rs (included with `include!`): each package that
// links binaries (tests, examples, executables) needs the same two link facts, and a build
// script's link arguments do not reach dependent packages.
//
// 1. An rpath to libtorch's folder, so binaries run without LD_LIBRARY_PATH.
// 2. `libtorch_cuda.so` linked with --no-as-needed: nothing references its symbols directly,
//    so the default --as-needed drops it and libtorch then reports no CUDA device.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| std::path::PathBuf::from(&lib));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
