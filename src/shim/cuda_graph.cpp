// CUDA-graph capture for dmdpipe, built as a separate shared library that the binary embeds and
// dlopens only after libtorch_cuda is loaded (CPU-only machines never load it). It is compiled
// against libtorch's and the CUDA runtime's headers only; its libtorch_cuda symbols resolve at
// dlopen time from the already loaded libtorch_cuda.
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <optional>
#include <string>

namespace {
thread_local std::string last_error;
std::optional<c10::cuda::CUDAStream> previous_stream;
}  // namespace

#define DMDC_TRY(body)                 \
  try {                                \
    body;                              \
    return 0;                          \
  } catch (const std::exception& e) {  \
    last_error = e.what();             \
    return 1;                          \
  }

extern "C" {

const char* dmdc_last_error() { return last_error.c_str(); }

// For the other files of this library (src/shim/fused_kernels.cpp).
void dmdc_set_error(const char* msg) { last_error = msg; }

// Makes a fresh side stream of the current device current (graphs cannot be captured on the
// legacy default stream), after the device has finished all earlier work.
int dmdc_enter_side_stream() {
  DMDC_TRY({
    c10::cuda::device_synchronize();
    previous_stream = c10::cuda::getCurrentCUDAStream();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool());
  })
}

int dmdc_exit_side_stream() {
  DMDC_TRY({
    c10::cuda::device_synchronize();
    if (previous_stream) c10::cuda::setCurrentCUDAStream(*previous_stream);
    previous_stream.reset();
  })
}

void* dmdc_graph_new() {
  try {
    return new at::cuda::CUDAGraph();
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

void dmdc_graph_free(void* g) { delete static_cast<at::cuda::CUDAGraph*>(g); }

// Autocast's weight-cast cache is switched off while capturing: a cast cached outside the graph
// would be read by the graph but never refreshed when the weights change.
// Cached, unused blocks of the ordinary pool are released first: a capture allocates every
// tensor again from the graph's private pool. Capturing a large step (the 55.7M network's
// training at batch 512, after eager runs had filled the cache) failed with cuDNN's "FIND was
// unable to find an engine", which is what a convolution reports when its cached plan and every
// searched plan fail to get workspace memory.
int dmdc_capture_begin(void* g) {
  DMDC_TRY({
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
    at::autocast::set_autocast_cache_enabled(false);
    static_cast<at::cuda::CUDAGraph*>(g)->capture_begin();
  })
}

int dmdc_capture_end(void* g) {
  DMDC_TRY({
    at::autocast::set_autocast_cache_enabled(true);
    static_cast<at::cuda::CUDAGraph*>(g)->capture_end();
  })
}

// The current CUDA stream of the current device (for NCCL calls).
void* dmdc_current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int dmdc_set_device(int index) { DMDC_TRY(c10::cuda::set_device(static_cast<c10::DeviceIndex>(index))) }

int dmdc_replay(void* g) { DMDC_TRY(static_cast<at::cuda::CUDAGraph*>(g)->replay()) }

}  // extern "C"
