// Two channels-last tensors of one batch and size joined along the channels:
// out[r, 0:ca] = a[r, :], out[r, ca:ca+cb] = b[r, :] for every position r (n, h, w). The UNet
// decoder joins each block's input with its skip this way; ATen's cat reads the two in their own
// strides, this reads and writes whole VEC-element packs in order. Part of the same NVRTC program
// as group_norm.cu (ELEM, VEC and Pack are defined there); VEC divides ca and cb.

extern "C" __global__ void channel_cat(const ELEM* __restrict__ a, const ELEM* __restrict__ b, long long rows,
                                      int packs_a, int packs_b, ELEM* __restrict__ out) {
  const long long per_row = packs_a + packs_b;
  const long long packs = rows * per_row;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const Pack* pa = reinterpret_cast<const Pack*>(a);
  const Pack* pb = reinterpret_cast<const Pack*>(b);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += stride) {
    const long long r = i / per_row;
    const int p = (int)(i - r * per_row);
    reinterpret_cast<Pack*>(out)[i] = p < packs_a ? pa[r * packs_a + p] : pb[r * packs_b + (p - packs_a)];
  }
}
