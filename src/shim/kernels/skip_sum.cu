// The end of a UNet block in one pass: out = (a + b + bias[c]) * scale on channels-last tensors,
// where a is the last convolution's output, b the skip path and bias the sum of the two paths'
// convolution biases (fp32, [C]; null for none). Eager ops take two passes with a rounding to
// the activation dtype in between. Part of the same NVRTC program as group_norm.cu (ELEM, VEC,
// Pack, to_f32 and from_f32 are defined there); VEC divides C.

extern "C" __global__ void skip_sum(const ELEM* __restrict__ a, const ELEM* __restrict__ b,
                                   const float* __restrict__ bias, long long packs, int packs_per_row,
                                   float scale, ELEM* __restrict__ out) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += stride) {
    const int c0 = (int)(i % packs_per_row) * VEC;
    Pack pa = reinterpret_cast<const Pack*>(a)[i];
    Pack pb = reinterpret_cast<const Pack*>(b)[i];
    Pack o;
    for (int j = 0; j < VEC; ++j) {
      float v = to_f32(pa.v[j]) + to_f32(pb.v[j]) + (bias ? bias[c0 + j] : 0.0f);
      from_f32(v * scale, &o.v[j]);
    }
    reinterpret_cast<Pack*>(out)[i] = o;
  }
}
