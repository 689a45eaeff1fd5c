// Compiles the small C++ shim (bf16 autocast guard, TF32 switches, fused AdamW) against the
// libtorch headers that torch-sys builds with, and records an rpath to its libraries.
use std::path::PathBuf;

/// The libtorch that torch-sys linked (it exports its lib dir to dependents as
/// DEP_TCH_LIBTORCH_LIB, whether it came from LIBTORCH, LIBTORCH_USE_PYTORCH or a download);
/// LIBTORCH as a fallback.
fn libtorch_dir() -> Option<PathBuf> {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB")
        && let Some(parent) = PathBuf::from(lib).parent()
    {
        return Some(parent.to_path_buf());
    }
    std::env::var("LIBTORCH").ok().map(PathBuf::from)
}

fn main() {
    println!("cargo:rerun-if-changed=src/shim/shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=src/shim/store.cpp");
    println!("cargo:rerun-if-changed=src/shim/fused_kernels.cpp");
    println!("cargo::rustc-check-cfg=cfg(dmd_cuda_graph)");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(dir) = libtorch_dir() else {
        panic!("no libtorch found: run scripts/install-libtorch.sh (./x does), or set LIBTORCH or LIBTORCH_USE_PYTORCH=1");
    };
    let include = dir.join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/shim/shim.cpp")
        .file("src/shim/store.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .opt_level(2)
        .compile("dmdpipe_shim");
    build_cuda_graph_shim(&dir, &include);
    let lib = dir.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// CUDA runtime headers: the ones install-libtorch.sh unpacks beside libtorch, or a toolkit's.
fn cuda_include(libtorch: &std::path::Path) -> Option<PathBuf> {
    let mut candidates = vec![libtorch.join("cuda-include")];
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(d) = std::env::var(var) {
            candidates.push(PathBuf::from(d).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| d.join("cuda_runtime_api.h").exists())
}

/// Builds src/shim/cuda_graph.cpp and src/shim/fused_kernels.cpp into OUT_DIR/libdmdpipe_cuda.so, which the binary embeds and
/// loads after libtorch_cuda. Without CUDA headers the binary simply has no graph capture.
fn build_cuda_graph_shim(libtorch: &std::path::Path, include: &std::path::Path) {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Some(cuda) = cuda_include(libtorch) else {
        println!("cargo:warning=no CUDA runtime headers found: building without CUDA-graph capture");
        return;
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("libdmdpipe_cuda.so");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-O2", "-w", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=1"])
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I{}", include.join("torch/csrc/api/include").display()))
        .arg(format!("-I{}", cuda.display()))
        .arg("src/shim/cuda_graph.cpp")
        .arg("src/shim/fused_kernels.cpp")
        .arg("-o")
        .arg(&out)
        .status()
        .expect("running the C++ compiler");
    if !status.success() {
        panic!("compiling src/shim/cuda_graph.cpp failed");
    }
    println!("cargo:rustc-cfg=dmd_cuda_graph");
}
