// The few libtorch calls tch 0.24 does not expose. Tensors arrive as tch's C_tensor pointers,
// which are at::Tensor*. Every entry point catches C++ exceptions and reports them as a string.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/Context.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <cstring>
#include <string>
#include <vector>

namespace {
thread_local std::string last_error;

std::vector<at::Tensor> gather(at::Tensor** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}
}  // namespace

extern "C" {

const char* dmd_last_error() { return last_error.c_str(); }

// Enters (enabled=1) or leaves (enabled=0) a bf16 autocast region on CUDA.
int dmd_autocast_bf16(int enabled) {
  try {
    if (enabled) {
      at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
      at::autocast::set_autocast_enabled(at::kCUDA, true);
      at::autocast::increment_nesting();
    } else {
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      at::autocast::set_autocast_enabled(at::kCUDA, false);
    }
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

int dmd_autocast_enabled() { return at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0; }

void dmd_set_tf32(int enabled) {
  at::globalContext().setAllowTF32CuBLAS(enabled != 0);
  at::globalContext().setAllowTF32CuDNN(enabled != 0);
}

int dmd_tf32_enabled() { return at::globalContext().allowTF32CuBLAS() ? 1 : 0; }

// One fused AdamW step over n parameters (torch's _fused_adamw_; CPU and CUDA kernels).
// weight_decay = 0 gives Adam. steps are float scalar tensors, incremented here.
int dmd_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                    at::Tensor** steps, int n, double lr, double beta1, double beta2, double weight_decay, double eps) {
  try {
    auto p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n), v = gather(exp_avg_sqs, n), s = gather(steps, n);
    at::NoGradGuard no_grad;
    at::_foreach_add_(s, 1);
    std::vector<at::Tensor> none;
    at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps, false, false);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// The same step with the learning rate read from a 0-dim tensor on the parameters' device, so that
// a captured CUDA graph picks up a new rate (warm-up) without being captured again.
int dmd_fused_adamw_tensor_lr(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                              at::Tensor** steps, int n, at::Tensor* lr, double beta1, double beta2, double weight_decay,
                              double eps) {
  try {
    auto p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n), v = gather(exp_avg_sqs, n), s = gather(steps, n);
    at::NoGradGuard no_grad;
    at::_foreach_add_(s, 1);
    std::vector<at::Tensor> none;
    at::_fused_adamw_(p, g, m, v, none, s, *lr, beta1, beta2, weight_decay, eps, false, false);
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// dst[i] <- src[i] for every pair, in one foreach launch per chunk (not one copy kernel each).
int dmd_foreach_copy(at::Tensor** dst, at::Tensor** src, int n) {
  try {
    auto d = gather(dst, n), s = gather(src, n);
    at::NoGradGuard no_grad;
    at::_foreach_copy_(d, s);
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// ema = lerp(ema, param, weight) for every pair, in one foreach launch per chunk.
int dmd_foreach_lerp(at::Tensor** ema, at::Tensor** params, int n, double weight) {
  try {
    auto e = gather(ema, n), p = gather(params, n);
    at::NoGradGuard no_grad;
    at::_foreach_lerp_(e, p, at::Scalar(weight));
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// Drops every gradient (PyTorch's zero_grad(set_to_none=True)): no kernels launched.
void dmd_clear_grads(at::Tensor** params, int n) {
  for (int i = 0; i < n; ++i) params[i]->mutable_grad() = at::Tensor();
}

// Replaces NaN/Inf in gradients (EDM: nan -> 0, +inf -> 1e5, -inf -> -1e5), then scales them so
// that their global L2 norm is at most max_norm (no scaling when max_norm <= 0). Writes the norm
// before clipping to *norm_out (a 0-dim tensor on the device: no host sync), when clipping.
int dmd_sanitize_and_clip(at::Tensor** grads, int n, double max_norm, at::Tensor* norm_out) {
  try {
    auto g = gather(grads, n);
    at::NoGradGuard no_grad;
    for (auto& t : g) t.nan_to_num_(0.0, 1e5, -1e5);
    if (max_norm > 0) {
      auto norms = at::_foreach_norm(g, 2);
      auto total = at::stack(norms).norm();
      auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
      at::_foreach_mul_(g, coef);
      *norm_out = total;
    }
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// Re-lays out every 4-D tensor (conv weights) in channels-last (NHWC) memory order in place,
// keeping the tensor objects (optimisers and variable stores keep their handles).
int dmd_to_channels_last(at::Tensor** ts, int n) {
  try {
    at::NoGradGuard no_grad;
    for (int i = 0; i < n; ++i) {
      if (ts[i]->dim() == 4) ts[i]->set_data(ts[i]->contiguous(at::MemoryFormat::ChannelsLast));
    }
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// A channels-last copy of a 4-D tensor.
int dmd_channels_last_copy(at::Tensor* t, at::Tensor* out) {
  try {
    *out = t->contiguous(at::MemoryFormat::ChannelsLast);
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// GroupNorm in the input's dtype with CUDA autocast bypassed for this one call. Under bf16
// autocast group_norm runs in fp32: the bf16 activations are cast up, normalised, passed through
// SiLU in fp32 and cast down again by the next convolution. The native kernel takes bf16 input
// directly (its statistics are accumulated in fp32), so the whole chain stays in bf16.
int dmd_group_norm_native(at::Tensor* x, at::Tensor* weight, at::Tensor* bias, int64_t groups, double eps,
                          at::Tensor* out) {
  try {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(c10::DispatchKey::AutocastCUDA));
    auto kind = x->scalar_type();
    *out = at::group_norm(*x, groups, weight->to(kind), bias->to(kind), eps, true);
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// out = a + alpha * b in one element-wise pass (tch's add has no alpha); a may broadcast.
int dmd_add_alpha(at::Tensor* a, at::Tensor* b, double alpha, at::Tensor* out) {
  try {
    *out = at::add(*a, *b, alpha);
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// Starts libtorch's Kineto profiler (the one behind torch.profiler): operators on the CPU and,
// with cuda=1, every CUDA kernel and copy through CUPTI.
int dmd_profiler_start(int cuda) {
  try {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) activities.insert(ActivityType::CUDA);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

// Stops the profiler and writes its events as a Chrome trace (JSON) to path.
int dmd_profiler_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler was not running");
    result->save(path);
    return 0;
  } catch (const std::exception& ex) {
    last_error = ex.what();
    return 1;
  }
}

}  // extern "C"
