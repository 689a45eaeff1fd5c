// Compiles the small C++ shim (bf16 autocast guard, TF32 switches, fused AdamW) against the
// libtorch headers that torch-sys builds with, and records an rpath to its libraries.
use std::path::PathBuf;

/// The libtorch that torch-sys linked (it exports its lib dir to dependents as
/// DEP_TCH_LIBTORCH_LIB, whether it came from LIBTORCH, LIBTORCH_USE_PYTORCH or a download);
/// LIBTORCH as a fallback.
fn libtorch_dir() -> Option<PathBuf> {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if let Some(parent) = PathBuf::from(lib).parent() {
            return Some(parent.to_path_buf());
        }
    }
    std::env::var("LIBTORCH").ok().map(PathBuf::from)
}

fn main() {
    println!("cargo:rerun-if-changed=src/shim/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(dir) = libtorch_dir() else {
        panic!("no libtorch found: run scripts/install-libtorch.sh (./x does), or set LIBTORCH or LIBTORCH_USE_PYTORCH=1");
    };
    let include = dir.join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/shim/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .opt_level(2)
        .compile("dmdpipe_shim");
    let lib = dir.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
