// dmdpipe's fused kernels on channels-last CUDA activations: GroupNorm (+ shift before, + SiLU
// after) and a UNet block's residual sum (+ biases, x scale). The kernels of src/shim/kernels/*.cu
// are compiled at run time by NVRTC and launched through the CUDA driver API on the current
// PyTorch stream (so CUDA-graph capture records them), each wrapped in an autograd function. Part of libdmdpipe_cuda.so; no CUDA toolkit at build time: libnvrtc and
// libcuda are opened with dlopen, and the element type is a template parameter of the source.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dirent.h>
#include <dlfcn.h>
#include <torch/csrc/autograd/custom_function.h>

#include <map>
#include <numeric>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

extern "C" void dmdc_set_error(const char* msg);

namespace {

// NVRTC's C API, declared here so that no nvrtc.h is needed to build.
using nvrtcProgram = void*;
struct Nvrtc {
  int (*create)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
  int (*compile)(nvrtcProgram, int, const char* const*);
  int (*log_size)(nvrtcProgram, size_t*);
  int (*log)(nvrtcProgram, char*);
  int (*cubin_size)(nvrtcProgram, size_t*);
  int (*cubin)(nvrtcProgram, char*);
  int (*destroy)(nvrtcProgram*);
  const char* (*error_string)(int);
};

struct Driver {
  CUresult (*module_load_data)(CUmodule*, const void*);
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*);
  CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                     void**, void**);
  CUresult (*func_set_attribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*error_string)(CUresult, const char**);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*device_attribute)(int*, CUdevice_attribute, CUdevice);
};

std::string kernel_source;
std::mutex mutex;

void* must_sym(void* handle, const char* name, const std::string& lib) {
  void* p = dlsym(handle, name);
  if (!p) throw std::runtime_error(lib + " lacks " + name);
  return p;
}

// f = the function `name` of the library opened as handle h.
template <typename F>
void bind_symbol(F& f, void* h, const char* name, const std::string& lib) {
  f = reinterpret_cast<F>(must_sym(h, name, lib));
}

// The directory of the loaded libc10_cuda (PyTorch's lib/), where pip wheels put NVRTC nearby.
std::string torch_lib_dir() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&c10::cuda::device_count), &info) || !info.dli_fname) return "";
  std::string path = info.dli_fname;
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// Files in dir whose names start with prefix.
std::vector<std::string> files_with_prefix(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      if (name.rfind(prefix, 0) == 0) out.push_back(dir + "/" + name);
    }
    closedir(d);
  }
  return out;
}

// libnvrtc: by soname first, then where the CUDA wheels put it beside PyTorch. Its builtins
// library (which libnvrtc opens by soname at compile time) is loaded from the same directory.
void* open_nvrtc(std::string& tried) {
  for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) {
    tried += std::string(name) + ", ";
    if (void* h = dlopen(name, RTLD_NOW | RTLD_GLOBAL)) return h;
  }
  std::string lib = torch_lib_dir();
  for (std::string dir : {lib + "/../../nvidia/cu13/lib", lib + "/../../nvidia/cuda_nvrtc/lib", lib}) {
    for (const auto& path : files_with_prefix(dir, "libnvrtc")) {
      if (path.find("builtins") != std::string::npos || path.find(".alt.") != std::string::npos) continue;
      tried += path + ", ";
      for (const auto& b : files_with_prefix(dir, "libnvrtc-builtins"))
        if (b.find(".alt.") == std::string::npos) dlopen(b.c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    }
  }
  return nullptr;
}

const Nvrtc& nvrtc() {
  static Nvrtc api = [] {
    std::string tried;
    void* h = open_nvrtc(tried);
    if (!h)
      throw std::runtime_error("NVRTC (libnvrtc, from the nvidia-cuda-nvrtc wheel that CUDA builds of PyTorch "
                               "install) was not found; tried " + tried +
                               "set `fused_kernels = false` in the network config to run without it");
    std::string n = "libnvrtc";
    Nvrtc a{};
    bind_symbol(a.create, h, "nvrtcCreateProgram", n);
    bind_symbol(a.compile, h, "nvrtcCompileProgram", n);
    bind_symbol(a.log_size, h, "nvrtcGetProgramLogSize", n);
    bind_symbol(a.log, h, "nvrtcGetProgramLog", n);
    bind_symbol(a.cubin_size, h, "nvrtcGetCUBINSize", n);
    bind_symbol(a.cubin, h, "nvrtcGetCUBIN", n);
    bind_symbol(a.destroy, h, "nvrtcDestroyProgram", n);
    bind_symbol(a.error_string, h, "nvrtcGetErrorString", n);
    return a;
  }();
  return api;
}

const Driver& driver() {
  static Driver api = [] {
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) throw std::runtime_error("libcuda.so.1 (the CUDA driver) could not be opened");
    std::string n = "libcuda.so.1";
    Driver a{};
    bind_symbol(a.module_load_data, h, "cuModuleLoadData", n);
    bind_symbol(a.module_get_function, h, "cuModuleGetFunction", n);
    bind_symbol(a.launch, h, "cuLaunchKernel", n);
    bind_symbol(a.func_set_attribute, h, "cuFuncSetAttribute", n);
    bind_symbol(a.error_string, h, "cuGetErrorString", n);
    bind_symbol(a.device_get, h, "cuDeviceGet", n);
    bind_symbol(a.device_attribute, h, "cuDeviceGetAttribute", n);
    return a;
  }();
  return api;
}

void check_cu(CUresult rc, const char* what) {
  if (rc == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().error_string(rc, &msg);
  throw std::runtime_error(std::string(what) + ": " + (msg ? msg : "unknown CUDA error"));
}

// An attribute of CUDA device `device` (PyTorch's index, which is the driver's ordinal).
int device_attribute(int device, CUdevice_attribute what) {
  CUdevice d;
  check_cu(driver().device_get(&d, device), "cuDeviceGet");
  int value = 0;
  check_cu(driver().device_attribute(&value, what, d), "cuDeviceGetAttribute");
  return value;
}

struct Kernels {
  CUfunction stats, apply, backward_sums, backward_dx, skip_sum, channel_cat;
};

// Compiles the source for one element type and vector width on one device (cached).
const Kernels& kernels(bool bf16, int vec, int device) {
  static std::map<std::tuple<bool, int, int>, Kernels> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(bf16, vec, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (kernel_source.empty()) throw std::runtime_error("fused kernels: no kernel source was set");
  std::string src = std::string("#define ELEM ") + (bf16 ? "bf16_t" : "float") + "\n#define VEC " +
                    std::to_string(vec) + "\n" + kernel_source;
  std::string arch = "--gpu-architecture=sm_" +
                     std::to_string(device_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)) +
                     std::to_string(device_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR));
  const char* opts[] = {arch.c_str(), "-std=c++17"};
  const Nvrtc& nv = nvrtc();
  nvrtcProgram prog = nullptr;
  if (int rc = nv.create(&prog, src.c_str(), "group_norm.cu", 0, nullptr, nullptr))
    throw std::runtime_error(std::string("nvrtcCreateProgram: ") + nv.error_string(rc));
  int rc = nv.compile(prog, 2, opts);
  size_t log_size = 0;
  nv.log_size(prog, &log_size);
  std::string log(log_size, '\0');
  if (log_size) nv.log(prog, log.data());
  if (rc) {
    nv.destroy(&prog);
    throw std::runtime_error(std::string("compiling src/shim/kernels/*.cu for ") + arch + ": " + nv.error_string(rc) + "\n" + log);
  }
  size_t size = 0;
  nv.cubin_size(prog, &size);
  std::vector<char> cubin(size);
  nv.cubin(prog, cubin.data());
  nv.destroy(&prog);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  CUmodule module;
  check_cu(driver().module_load_data(&module, cubin.data()), "loading the group_norm module");
  Kernels k{};
  check_cu(driver().module_get_function(&k.stats, module, "gn_stats"), "gn_stats");
  check_cu(driver().module_get_function(&k.apply, module, "gn_apply"), "gn_apply");
  check_cu(driver().module_get_function(&k.backward_sums, module, "gn_backward_sums"), "gn_backward_sums");
  check_cu(driver().module_get_function(&k.backward_dx, module, "gn_backward_dx"), "gn_backward_dx");
  check_cu(driver().module_get_function(&k.skip_sum, module, "skip_sum"), "skip_sum");
  check_cu(driver().module_get_function(&k.channel_cat, module, "channel_cat"), "channel_cat");
  for (CUfunction f : {k.stats, k.apply, k.backward_sums, k.backward_dx})
    check_cu(driver().func_set_attribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 96 * 1024),
             "raising the shared-memory limit");
  return cache.emplace(key, k).first->second;
}

// Must match struct Geometry in group_norm.cu.
struct Geometry {
  long long rows;
  int channels;
  int groups;
  int packs;
  int rows_per_pass;
  int slices;
  long long slice_rows;
  int affine_stride;
};

struct Plan {
  Geometry g;
  int vec;
  int threads;
  bool bf16;
  int device;
};

// Largest vector width (in elements, at most 16 bytes) that divides the channels per group.
int vector_width(int64_t channels_per_group, bool bf16) {
  for (int v : {8, 4, 2, 1}) {
    if (!bf16 && v == 8) continue;
    if (channels_per_group % v == 0) return v;
  }
  return 1;
}

// Empty when the fused kernels do not apply (the caller then runs the eager ops).
std::optional<Plan> plan(const at::Tensor& x, int64_t groups) {
  if (!x.is_cuda() || x.dim() != 4) return std::nullopt;
  bool bf16 = x.scalar_type() == at::kBFloat16;
  if (!bf16 && x.scalar_type() != at::kFloat) return std::nullopt;
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast)) return std::nullopt;
  int64_t n = x.size(0), c = x.size(1), rows = x.size(2) * x.size(3);
  if (groups <= 0 || c % groups != 0 || n == 0 || rows == 0) return std::nullopt;
  Plan p{};
  p.bf16 = bf16;
  p.vec = vector_width(c / groups, bf16);
  int64_t packs = c / p.vec;
  if (packs > 1024 || c > 4096) return std::nullopt;
  int rows_per_pass = static_cast<int>(std::max<int64_t>(1, 256 / packs));
  p.threads = static_cast<int>(packs) * rows_per_pass;
  p.device = x.get_device();
  // Enough blocks to fill the GPU (four per multiprocessor) at small batches.
  static std::map<int, int> sms_of;
  int sms;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = sms_of.find(p.device);
    if (it == sms_of.end()) it = sms_of.emplace(p.device, device_attribute(p.device, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)).first;
    sms = it->second;
  }
  int64_t want = (4 * sms + n - 1) / n;
  int64_t max_slices = std::max<int64_t>(1, rows / rows_per_pass);
  int64_t slices = std::min<int64_t>(std::min<int64_t>(want, max_slices), 65535);
  p.g = Geometry{rows, static_cast<int>(c), static_cast<int>(groups), static_cast<int>(packs), rows_per_pass,
                 static_cast<int>(slices), (rows + slices - 1) / slices, 0};
  return p;
}

void launch(CUfunction f, const Plan& p, int64_t n, size_t smem, std::vector<void*> args) {
  auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device));
  check_cu(driver().launch(f, static_cast<unsigned>(n), static_cast<unsigned>(p.g.slices), 1,
                           static_cast<unsigned>(p.threads), 1, 1, static_cast<unsigned>(smem), stream.stream(),
                           args.data(), nullptr),
           "launching a group_norm kernel");
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Forward: y, mean [N, G] and rstd [N, G]. shift is [N, C] fp32 or undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_kernels(const Plan& p, const at::Tensor& x,
                                                               const at::Tensor& shift, const at::Tensor& gamma,
                                                               const at::Tensor& beta, double eps, bool silu) {
  const Kernels& k = kernels(p.bf16, p.vec, p.device);
  int64_t n = x.size(0);
  auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  auto part = at::empty({n, p.g.slices, p.g.groups, 3}, f32);
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto mean = at::empty({n, p.g.groups}, f32);
  auto rstd = at::empty({n, p.g.groups}, f32);
  const void *xp = x.data_ptr(), *sp = ptr_or_null(shift), *gp = gamma.data_ptr(), *bp = beta.data_ptr();
  void *partp = part.data_ptr(), *yp = y.data_ptr(), *mp = mean.data_ptr(), *rp = rstd.data_ptr();
  Geometry g = p.g;
  float epsf = static_cast<float>(eps);
  int act = silu ? 1 : 0;
  launch(k.stats, p, n, 3 * sizeof(float) * p.threads, {&xp, &sp, &g, &partp});
  launch(k.apply, p, n, sizeof(float) * (2 * g.channels + 2 * g.groups),
         {&xp, &sp, &gp, &bp, &partp, &g, &epsf, &act, &yp, &mp, &rp});
  return {y, mean, rstd};
}

// Backward: dx, dshift [N, C] fp32, dgamma and dbeta ([C], or [N, C] for per-sample ones).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_kernels(
    const Plan& p, const at::Tensor& x, const at::Tensor& dy, const at::Tensor& shift, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd, bool silu) {
  const Kernels& k = kernels(p.bf16, p.vec, p.device);
  int64_t n = x.size(0);
  auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  auto part = at::empty({n, p.g.slices, p.g.channels, 3}, f32);
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto dshift = at::empty({n, p.g.channels}, f32);
  const void *xp = x.data_ptr(), *dyp = dy.data_ptr(), *sp = ptr_or_null(shift), *gp = gamma.data_ptr(),
             *bp = beta.data_ptr(), *mp = mean.data_ptr(), *rp = rstd.data_ptr();
  void *partp = part.data_ptr(), *dxp = dx.data_ptr(), *dsp = dshift.data_ptr();
  Geometry g = p.g;
  int act = silu ? 1 : 0;
  launch(k.backward_sums, p, n, 3 * sizeof(float) * p.vec * p.threads,
         {&xp, &dyp, &sp, &gp, &bp, &mp, &rp, &g, &act, &partp});
  launch(k.backward_dx, p, n, sizeof(float) * (3 * g.channels + 2 * g.groups),
         {&xp, &dyp, &sp, &gp, &bp, &mp, &rp, &partp, &g, &act, &dxp, &dsp});
  if (g.affine_stride != 0) {
    auto totals = part.sum(1);  // [N, C, 3]: sum dz, sum dz * xhat, sum xhat
    return {dx, dshift, totals.select(2, 1), totals.select(2, 0)};
  }
  auto totals = part.sum(at::IntArrayRef{0, 1});  // [C, 3]
  return {dx, dshift, totals.select(1, 1), totals.select(1, 0)};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether weight and bias are per sample ([N, C]) rather than shared ([C]); throws on other shapes.
bool affine_per_sample(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  int64_t n = x.size(0), c = x.size(1);
  bool per_sample = weight.dim() == 2;
  for (const auto* t : {&weight, &bias}) {
    bool ok = per_sample ? (t->dim() == 2 && t->size(0) == n && t->size(1) == c) : t->numel() == c;
    if (!ok) throw std::runtime_error("fused group_norm: weight and bias must both be [C] or both [N, C]");
  }
  return per_sample;
}

struct FusedGroupNorm : public torch::autograd::Function<FusedGroupNorm> {
  // shift: [N, C, 1, 1] or [1, C, 1, 1] (any float dtype), or an empty tensor for none
  // (autograd functions take no undefined tensors). weight, bias: [C], or [N, C] per sample.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shift_or_empty,
                            const at::Tensor& weight, const at::Tensor& bias, int64_t groups, double eps, bool silu) {
    auto p = plan(x, groups);
    if (!p) throw std::runtime_error("fused group_norm: input not applicable");
    bool per_sample = affine_per_sample(x, weight, bias);
    p->g.affine_stride = per_sample ? static_cast<int>(x.size(1)) : 0;
    at::Tensor shift = shift_or_empty.dim() == 4 ? shift_or_empty : at::Tensor();
    // [N, C, 1, 1] or [1, C, 1, 1] (one shift for the whole batch) as [N, C] fp32.
    auto shift32 = shift.defined()
                       ? shift.to(at::kFloat).expand({x.size(0), x.size(1), 1, 1}).reshape({x.size(0), x.size(1)}).contiguous()
                       : at::Tensor();
    auto gamma = weight.to(at::kFloat).contiguous(), beta = bias.to(at::kFloat).contiguous();
    auto [y, mean, rstd] = forward_kernels(*p, x, shift32, gamma, beta, eps, silu);
    ctx->save_for_backward({x, shift32, gamma, beta, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["shift_dtype"] = shift.defined() ? static_cast<int64_t>(shift.scalar_type()) : int64_t{-1};
    ctx->saved_data["shift_batch"] = shift.defined() ? shift.size(0) : int64_t{0};
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    ctx->saved_data["per_sample"] = per_sample;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &shift32 = saved[1], &gamma = saved[2], &beta = saved[3], &mean = saved[4],
               &rstd = saved[5];
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto p = plan(x, ctx->saved_data["groups"].toInt());
    if (ctx->saved_data["per_sample"].toBool()) p->g.affine_stride = static_cast<int>(x.size(1));
    auto dy = grads[0].to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
    auto [dx, dshift, dgamma, dbeta] =
        backward_kernels(*p, x, dy, shift32, gamma, beta, mean, rstd, ctx->saved_data["silu"].toBool());
    auto shift_dtype = ctx->saved_data["shift_dtype"].toInt();
    auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    at::Tensor dshift_out;
    if (shift_dtype >= 0) {
      // A shift shared by the batch gets the batch's summed gradient.
      if (ctx->saved_data["shift_batch"].toInt() == 1 && x.size(0) > 1) dshift = dshift.sum(0, true);
      dshift_out = dshift.to(static_cast<at::ScalarType>(shift_dtype)).reshape({dshift.size(0), x.size(1), 1, 1});
    }
    return {dx, dshift_out, dgamma.to(weight_dtype), dbeta.to(weight_dtype), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Launches an element-wise kernel over `packs` vectors on the current stream of `device`: 256
// threads a block, the blocks capped (the kernels loop over what is left).
void launch_over_packs(CUfunction f, long long packs, std::vector<void*>& args, int device, const char* what) {
  int threads = 256;
  long long blocks = std::min<long long>((packs + threads - 1) / threads, 65535LL * 4);
  auto stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  check_cu(driver().launch(f, static_cast<unsigned>(std::max<long long>(blocks, 1)), 1, 1, threads, 1, 1, 0,
                           stream.stream(), args.data(), nullptr),
           what);
}

// The skip sum's plan: vector width and whether the fused kernel applies to a and b.
std::optional<int> skip_sum_vec(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cuda() || a.dim() != 4 || a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return std::nullopt;
  bool bf16 = a.scalar_type() == at::kBFloat16;
  if (!bf16 && a.scalar_type() != at::kFloat) return std::nullopt;
  if (a.get_device() != b.get_device()) return std::nullopt;
  for (const auto* t : {&a, &b})
    if (!t->is_contiguous(at::MemoryFormat::ChannelsLast) || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return std::nullopt;
  return vector_width(a.size(1), bf16);
}

struct FusedSkipSum : public torch::autograd::Function<FusedSkipSum> {
  // bias_a, bias_b: [C] or empty tensors for none (autograd functions take no undefined tensors).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias_a,
                            const at::Tensor& bias_b, double scale) {
    int vec = *skip_sum_vec(a, b);
    int64_t c = a.size(1);
    at::Tensor bias;
    for (const auto* t : {&bias_a, &bias_b}) {
      if (t->numel() == 0) continue;
      auto t32 = t->to(at::kFloat).reshape({c});
      bias = bias.defined() ? bias + t32 : t32.contiguous();
    }
    auto out = at::empty_like(a, at::MemoryFormat::ChannelsLast);
    const Kernels& k = kernels(a.scalar_type() == at::kBFloat16, vec, a.get_device());
    long long packs = a.numel() / vec;
    int per_row = static_cast<int>(c / vec);
    float s = static_cast<float>(scale);
    const void *ap = a.data_ptr(), *bp = b.data_ptr(), *biasp = ptr_or_null(bias);
    void* op = out.data_ptr();
    std::vector<void*> args{&ap, &bp, &biasp, &packs, &per_row, &s, &op};
    launch_over_packs(k.skip_sum, packs, args, a.get_device(), "launching skip_sum");
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_a"] = bias_a.numel() > 0;
    ctx->saved_data["has_b"] = bias_b.numel() > 0;
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias_a.numel() > 0 ? bias_a.scalar_type() : bias_b.scalar_type());
    ctx->saved_data["bias_shape_a"] = bias_a.sizes().vec();
    ctx->saved_data["bias_shape_b"] = bias_b.sizes().vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    double scale = ctx->saved_data["scale"].toDouble();
    auto dx = g * scale;
    at::Tensor da, db;
    bool has_a = ctx->saved_data["has_a"].toBool(), has_b = ctx->saved_data["has_b"].toBool();
    if (has_a || has_b) {
      auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      auto dbias = (g.sum(at::IntArrayRef{0, 2, 3}, false, at::kFloat) * scale).to(dtype);
      // Each bias parameter its own gradient tensor (shared ones would alias their .grad).
      if (has_a) da = dbias.reshape(ctx->saved_data["bias_shape_a"].toIntVector());
      if (has_b) db = (has_a ? dbias.clone() : dbias).reshape(ctx->saved_data["bias_shape_b"].toIntVector());
    }
    return {dx, dx, da, db, at::Tensor()};
  }
};

// The channel join's vector width, or empty when the kernel does not apply to a and b.
std::optional<int> channel_cat_vec(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cuda() || a.dim() != 4 || b.dim() != 4 || a.scalar_type() != b.scalar_type()) return std::nullopt;
  if (a.size(0) != b.size(0) || a.size(2) != b.size(2) || a.size(3) != b.size(3)) return std::nullopt;
  bool bf16 = a.scalar_type() == at::kBFloat16;
  if (!bf16 && a.scalar_type() != at::kFloat) return std::nullopt;
  if (a.get_device() != b.get_device() || a.size(1) == 0 || b.size(1) == 0) return std::nullopt;
  for (const auto* t : {&a, &b})
    if (!t->is_contiguous(at::MemoryFormat::ChannelsLast) || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return std::nullopt;
  return vector_width(std::gcd(a.size(1), b.size(1)), bf16);
}

struct FusedChannelCat : public torch::autograd::Function<FusedChannelCat> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    int vec = *channel_cat_vec(a, b);
    int64_t ca = a.size(1), cb = b.size(1);
    auto out = at::empty({a.size(0), ca + cb, a.size(2), a.size(3)}, a.options(), at::MemoryFormat::ChannelsLast);
    long long rows = a.size(0) * a.size(2) * a.size(3);
    if (rows > 0) {
      const Kernels& k = kernels(a.scalar_type() == at::kBFloat16, vec, a.get_device());
      int packs_a = static_cast<int>(ca / vec), packs_b = static_cast<int>(cb / vec);
      const void *ap = a.data_ptr(), *bp = b.data_ptr();
      void* op = out.data_ptr();
      std::vector<void*> args{&ap, &bp, &rows, &packs_a, &packs_b, &op};
      launch_over_packs(k.channel_cat, rows * (packs_a + packs_b), args, a.get_device(), "launching channel_cat");
    }
    ctx->saved_data["ca"] = ca;
    ctx->saved_data["cb"] = cb;
    return out;
  }

  // As ATen's cat: each input's gradient is its slice of the output's (a view).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor()};
    int64_t ca = ctx->saved_data["ca"].toInt(), cb = ctx->saved_data["cb"].toInt();
    return {g.narrow(1, 0, ca), g.narrow(1, ca, cb)};
  }
};

}  // namespace

extern "C" {

// The CUDA source of the kernels (the binary embeds it); set once before the first call.
void dmdc_set_kernel_source(const char* src) {
  std::lock_guard<std::mutex> lock(mutex);
  kernel_source = src;
}

// act(group_norm(x + shift) * weight + bias) on a channels-last CUDA tensor, bf16 or fp32;
// weight and bias [C], or [N, C] (one per sample).
// Returns 0 with *out set, 2 when the fused kernels do not apply to x (the caller runs the eager
// ops), 1 on error (dmdc_last_error says why). shift may be null.
int dmdc_group_norm(at::Tensor* x, at::Tensor* shift, at::Tensor* weight, at::Tensor* bias, int64_t groups,
                    double eps, int silu, at::Tensor* out) {
  try {
    if (!plan(*x, groups)) return 2;
    at::Tensor s = shift ? *shift : at::empty({0}, x->options().dtype(at::kFloat));
    *out = FusedGroupNorm::apply(*x, s, *weight, *bias, groups, eps, silu != 0);
    return 0;
  } catch (const std::exception& e) {
    dmdc_set_error(e.what());
    return 1;
  }
}

// (a + b + bias_a + bias_b) * scale for two channels-last CUDA tensors of one shape and dtype
// (bf16 or fp32); bias_a and bias_b are [C] (or [1, C, 1, 1]) or null. Returns 0 with *out set,
// 2 when the kernel does not apply, 1 on error.
int dmdc_skip_sum(at::Tensor* a, at::Tensor* b, at::Tensor* bias_a, at::Tensor* bias_b, double scale, at::Tensor* out) {
  try {
    if (!skip_sum_vec(*a, *b)) return 2;
    auto empty = at::empty({0}, a->options().dtype(at::kFloat));
    *out = FusedSkipSum::apply(*a, *b, bias_a ? *bias_a : empty, bias_b ? *bias_b : empty, scale);
    return 0;
  } catch (const std::exception& e) {
    dmdc_set_error(e.what());
    return 1;
  }
}

// [a, b] along the channels for two channels-last CUDA tensors of one batch, size and dtype
// (bf16 or fp32). Returns 0 with *out set (channels-last), 2 when the kernel does not apply, 1 on
// error.
int dmdc_channel_cat(at::Tensor* a, at::Tensor* b, at::Tensor* out) {
  try {
    if (!channel_cat_vec(*a, *b)) return 2;
    *out = FusedChannelCat::apply(*a, *b);
    return 0;
  } catch (const std::exception& e) {
    dmdc_set_error(e.what());
    return 1;
  }
}

}  // extern "C"
