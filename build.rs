// Compiles the small C++ shim (bf16 autocast guard, TF32 switches, fused AdamW) against the
// libtorch headers that torch-sys builds with, and records an rpath to its libraries.
use std::path::PathBuf;

fn libtorch_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir));
    }
    None
}

fn main() {
    println!("cargo:rerun-if-changed=src/shim/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(dir) = libtorch_dir() else {
        panic!("LIBTORCH is not set: run scripts/install-libtorch.sh (./x does) or point LIBTORCH at libtorch 2.11");
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
