// GroupNorm with an optional per-(sample, channel) shift before it and an optional SiLU after
// it, on channels-last (NHWC) activations, forward and backward. Compiled at run time by NVRTC
// (src/shim/kernels.cpp), once per element type: the including code defines ELEM (float, or
// bf16_t for bfloat16) and VEC (elements per vector load; it divides the channels per group).
//
// y = act(((x + shift[n,c]) - mean[n,g]) * rstd[n,g] * gamma[c] + beta[c])
//
// gamma and beta are [C], or [N, C] when each sample has its own (Geometry::affine_stride = C):
// ADM's adaptive scale folds its per-sample scale and shift after the norm into them.
//
// Statistics, gamma, beta, shift and every intermediate are fp32; only x, y, dy and dx are ELEM.
// A block works on one sample n and one slice s of its rows (h*w positions): thread t reads the
// VEC channels of pack p = t % packs in rows t / packs, t / packs + rows_per_pass, ... so a warp
// reads consecutive memory. Per-slice partial results go to a workspace that the next kernel
// merges, which keeps the grid large at small batches without atomics (so results do not depend
// on scheduling).

typedef unsigned short bf16_t;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ void from_f32(float v, float* out) { *out = v; }
// Round to nearest even, as c10::BFloat16 does; NaN stays NaN.
__device__ __forceinline__ void from_f32(float v, bf16_t* out) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *out = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  *out = (bf16_t)(u >> 16);
}

struct __align__(sizeof(ELEM) * VEC) Pack {
  ELEM v[VEC];
};

struct Geometry {
  long long rows;       // h * w
  int channels;         // C
  int groups;           // G
  int packs;            // C / VEC
  int rows_per_pass;    // threads per block / packs
  int slices;           // S: blocks per sample
  long long slice_rows; // rows per slice
  int affine_stride;    // elements between samples' gamma and beta: 0 (shared) or C
};

__device__ __forceinline__ float silu_f(float z) { return z / (1.0f + __expf(-z)); }

// d silu(z) / dz
__device__ __forceinline__ float silu_grad(float z) {
  float s = 1.0f / (1.0f + __expf(-z));
  return s * (1.0f + z * (1.0f - s));
}

// Merges Welford triples (count, mean, m2): Chan et al.'s parallel update.
__device__ __forceinline__ void merge(float& n, float& mean, float& m2, float n2, float mean2, float m22) {
  float total = n + n2;
  if (total == 0.0f) return;
  float delta = mean2 - mean;
  float w = n2 / total;
  mean += delta * w;
  m2 += m22 + delta * delta * n * w;
  n = total;
}

// Pass 1: per (sample, slice, group) Welford partials of x + shift into part[n][s][g][3].
extern "C" __global__ void gn_stats(const ELEM* __restrict__ x, const float* __restrict__ shift, Geometry g,
                                   float* __restrict__ part) {
  extern __shared__ float smem[];  // 3 * blockDim.x
  const int n = blockIdx.x, s = blockIdx.y, t = threadIdx.x;
  const int p = t % g.packs, r0 = t / g.packs;
  const bool active = r0 < g.rows_per_pass;
  const long long row_begin = s * g.slice_rows;
  const long long row_end = min(g.rows, row_begin + g.slice_rows);
  float shifts[VEC];
  for (int j = 0; j < VEC; ++j) shifts[j] = shift ? shift[(long long)n * g.channels + p * VEC + j] : 0.0f;
  // Sums of v - k for a per-thread k near the data (the first value): no cancellation when the
  // mean is far from zero, and no division per element.
  float k = 0.0f, sum = 0.0f, sumsq = 0.0f, count = 0.0f;
  bool have_k = false;
  if (active) {
    const ELEM* base = x + (long long)n * g.rows * g.channels + p * VEC;
    #pragma unroll 4
    for (long long r = row_begin + r0; r < row_end; r += g.rows_per_pass) {
      Pack pk = *reinterpret_cast<const Pack*>(base + r * g.channels);
      for (int j = 0; j < VEC; ++j) {
        float v = to_f32(pk.v[j]) + shifts[j];
        if (!have_k) {
          k = v;
          have_k = true;
        }
        float d = v - k;
        sum += d;
        sumsq += d * d;
      }
      count += VEC;
    }
  }
  float mean = count > 0.0f ? k + sum / count : 0.0f;
  float m2 = count > 0.0f ? fmaxf(sumsq - sum * sum / count, 0.0f) : 0.0f;
  smem[3 * t] = count;
  smem[3 * t + 1] = mean;
  smem[3 * t + 2] = m2;
  __syncthreads();
  const int cpg = g.channels / g.groups;   // channels per group
  const int ppg = cpg / VEC;               // packs per group
  for (int grp = t; grp < g.groups; grp += blockDim.x) {
    float cn = 0.0f, cm = 0.0f, c2 = 0.0f;
    for (int rr = 0; rr < g.rows_per_pass; ++rr) {
      for (int q = 0; q < ppg; ++q) {
        int i = rr * g.packs + grp * ppg + q;
        merge(cn, cm, c2, smem[3 * i], smem[3 * i + 1], smem[3 * i + 2]);
      }
    }
    float* o = part + (((long long)n * g.slices + s) * g.groups + grp) * 3;
    o[0] = cn;
    o[1] = cm;
    o[2] = c2;
  }
}

// Mean and 1/std of group grp of sample n from the slices' partials.
__device__ __forceinline__ void group_moments(const float* part, const Geometry& g, int n, int grp, float eps,
                                              float* mean, float* rstd) {
  float cn = 0.0f, cm = 0.0f, c2 = 0.0f;
  for (int s = 0; s < g.slices; ++s) {
    const float* q = part + (((long long)n * g.slices + s) * g.groups + grp) * 3;
    merge(cn, cm, c2, q[0], q[1], q[2]);
  }
  *mean = cm;
  *rstd = rsqrtf(c2 / fmaxf(cn, 1.0f) + eps);
}

// Pass 2: y = act(x * a[c] + b[c]) with a = rstd * gamma, b = beta + (shift - mean) * a. Blocks of
// slice 0 also store mean and rstd ([N, G], for the backward).
extern "C" __global__ void gn_apply(const ELEM* __restrict__ x, const float* __restrict__ shift,
                                   const float* __restrict__ gamma, const float* __restrict__ beta,
                                   const float* __restrict__ part, Geometry g, float eps, int silu,
                                   ELEM* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out) {
  extern __shared__ float smem[];  // a[C], b[C], mean[G], rstd[G]
  float* a = smem;
  float* b = a + g.channels;
  float* gm = b + g.channels;
  float* gr = gm + g.groups;
  const int n = blockIdx.x, s = blockIdx.y, t = threadIdx.x;
  for (int grp = t; grp < g.groups; grp += blockDim.x) {
    group_moments(part, g, n, grp, eps, &gm[grp], &gr[grp]);
    if (s == 0) {
      mean_out[(long long)n * g.groups + grp] = gm[grp];
      rstd_out[(long long)n * g.groups + grp] = gr[grp];
    }
  }
  __syncthreads();
  const int cpg = g.channels / g.groups;
  const long long aff = (long long)n * g.affine_stride;
  for (int c = t; c < g.channels; c += blockDim.x) {
    int grp = c / cpg;
    float sh = shift ? shift[(long long)n * g.channels + c] : 0.0f;
    a[c] = gr[grp] * gamma[aff + c];
    b[c] = beta[aff + c] + (sh - gm[grp]) * a[c];
  }
  __syncthreads();
  const int p = t % g.packs, r0 = t / g.packs;
  if (r0 >= g.rows_per_pass) return;
  float ka[VEC], kb[VEC];
  for (int j = 0; j < VEC; ++j) {
    ka[j] = a[p * VEC + j];
    kb[j] = b[p * VEC + j];
  }
  const long long row_begin = s * g.slice_rows;
  const long long row_end = min(g.rows, row_begin + g.slice_rows);
  const long long off = (long long)n * g.rows * g.channels + p * VEC;
  #pragma unroll 4
  for (long long r = row_begin + r0; r < row_end; r += g.rows_per_pass) {
    Pack in = *reinterpret_cast<const Pack*>(x + off + r * g.channels);
    Pack out;
    for (int j = 0; j < VEC; ++j) {
      float z = to_f32(in.v[j]) * ka[j] + kb[j];
      from_f32(silu ? silu_f(z) : z, &out.v[j]);
    }
    *reinterpret_cast<Pack*>(y + off + r * g.channels) = out;
  }
}

// Shift, gamma and beta of the VEC channels of pack p, for sample n.
__device__ __forceinline__ void pack_params(const float* shift, const float* gamma, const float* beta,
                                            const Geometry& g, int n, int p, float* sh, float* ga, float* be) {
  const long long aff = (long long)n * g.affine_stride;
  for (int j = 0; j < VEC; ++j) {
    int c = p * VEC + j;
    sh[j] = shift ? shift[(long long)n * g.channels + c] : 0.0f;
    ga[j] = gamma[aff + c];
    be[j] = beta[aff + c];
  }
}

// The gradient at the affine output (before the SiLU) from dy and the normalised input xh.
__device__ __forceinline__ float grad_before_act(float dy, float xh, float ga, float be, int silu) {
  if (silu) dy *= silu_grad(xh * ga + be);
  return dy;
}

// Backward pass 1: per (sample, slice, channel) sums over rows of dz, dz * xhat and xhat, where
// dz is the gradient at the affine output (before the SiLU) and xhat the normalised input, into
// part[n][s][c][3].
extern "C" __global__ void gn_backward_sums(const ELEM* __restrict__ x, const ELEM* __restrict__ dy,
                                           const float* __restrict__ shift, const float* __restrict__ gamma,
                                           const float* __restrict__ beta, const float* __restrict__ mean,
                                           const float* __restrict__ rstd, Geometry g, int silu,
                                           float* __restrict__ part) {
  extern __shared__ float smem[];  // 3 * VEC * blockDim.x
  const int n = blockIdx.x, s = blockIdx.y, t = threadIdx.x;
  const int p = t % g.packs, r0 = t / g.packs;
  const int cpg = g.channels / g.groups;
  float sdz[VEC], sdzx[VEC], sx[VEC];
  for (int j = 0; j < VEC; ++j) sdz[j] = sdzx[j] = sx[j] = 0.0f;
  if (r0 < g.rows_per_pass) {
    const int grp = p * VEC / cpg;
    const float m = mean[(long long)n * g.groups + grp], rs = rstd[(long long)n * g.groups + grp];
    float sh[VEC], ga[VEC], be[VEC];
    pack_params(shift, gamma, beta, g, n, p, sh, ga, be);
    const long long row_begin = s * g.slice_rows;
    const long long row_end = min(g.rows, row_begin + g.slice_rows);
    const long long off = (long long)n * g.rows * g.channels + p * VEC;
    #pragma unroll 4
    for (long long r = row_begin + r0; r < row_end; r += g.rows_per_pass) {
      Pack xin = *reinterpret_cast<const Pack*>(x + off + r * g.channels);
      Pack gin = *reinterpret_cast<const Pack*>(dy + off + r * g.channels);
      for (int j = 0; j < VEC; ++j) {
        float xh = (to_f32(xin.v[j]) + sh[j] - m) * rs;
        float d = grad_before_act(to_f32(gin.v[j]), xh, ga[j], be[j], silu);
        sdz[j] += d;
        sdzx[j] += d * xh;
        sx[j] += xh;
      }
    }
  }
  // smem[(q * blockDim.x + t) * VEC + j] for quantity q.
  for (int j = 0; j < VEC; ++j) {
    smem[(0 * blockDim.x + t) * VEC + j] = sdz[j];
    smem[(1 * blockDim.x + t) * VEC + j] = sdzx[j];
    smem[(2 * blockDim.x + t) * VEC + j] = sx[j];
  }
  __syncthreads();
  for (int c = t; c < g.channels; c += blockDim.x) {
    const int pc = c / VEC, j = c % VEC;
    float acc[3] = {0.0f, 0.0f, 0.0f};
    for (int rr = 0; rr < g.rows_per_pass; ++rr) {
      int i = rr * g.packs + pc;
      for (int q = 0; q < 3; ++q) acc[q] += smem[(q * blockDim.x + i) * VEC + j];
    }
    float* o = part + (((long long)n * g.slices + s) * g.channels + c) * 3;
    o[0] = acc[0];
    o[1] = acc[1];
    o[2] = acc[2];
  }
}

// Backward pass 2: dx = rstd * (gamma * dz - mean_g(gamma * dz) - xhat * mean_g(gamma * dz * xhat)),
// and (blocks of slice 0) dshift[n, c] = sum over rows of dx, from the sums of pass 1.
extern "C" __global__ void gn_backward_dx(const ELEM* __restrict__ x, const ELEM* __restrict__ dy,
                                         const float* __restrict__ shift, const float* __restrict__ gamma,
                                         const float* __restrict__ beta, const float* __restrict__ mean,
                                         const float* __restrict__ rstd, const float* __restrict__ part, Geometry g,
                                         int silu, ELEM* __restrict__ dx, float* __restrict__ dshift) {
  extern __shared__ float smem[];  // sums[3 * C], m1[G], m2[G]
  float* sums = smem;
  float* m1 = sums + 3 * g.channels;
  float* m2 = m1 + g.groups;
  const int n = blockIdx.x, s = blockIdx.y, t = threadIdx.x;
  const int cpg = g.channels / g.groups;
  for (int c = t; c < g.channels; c += blockDim.x) {
    float acc[3] = {0.0f, 0.0f, 0.0f};
    for (int sl = 0; sl < g.slices; ++sl) {
      const float* q = part + (((long long)n * g.slices + sl) * g.channels + c) * 3;
      for (int k = 0; k < 3; ++k) acc[k] += q[k];
    }
    for (int k = 0; k < 3; ++k) sums[3 * c + k] = acc[k];
  }
  __syncthreads();
  const float count = (float)g.rows * cpg;
  const float* ga_n = gamma + (long long)n * g.affine_stride;
  for (int grp = t; grp < g.groups; grp += blockDim.x) {
    float a = 0.0f, b = 0.0f;
    for (int c = grp * cpg; c < (grp + 1) * cpg; ++c) {
      a += ga_n[c] * sums[3 * c];
      b += ga_n[c] * sums[3 * c + 1];
    }
    m1[grp] = a / count;
    m2[grp] = b / count;
  }
  __syncthreads();
  if (s == 0) {
    for (int c = t; c < g.channels; c += blockDim.x) {
      const int grp = c / cpg;
      const float rs = rstd[(long long)n * g.groups + grp];
      dshift[(long long)n * g.channels + c] =
          rs * (ga_n[c] * sums[3 * c] - (float)g.rows * m1[grp] - m2[grp] * sums[3 * c + 2]);
    }
  }
  const int p = t % g.packs, r0 = t / g.packs;
  if (r0 >= g.rows_per_pass) return;
  const int grp = p * VEC / cpg;
  const float m = mean[(long long)n * g.groups + grp], rs = rstd[(long long)n * g.groups + grp];
  const float k1 = rs * m1[grp], k2 = rs * m2[grp];
  float sh[VEC], ga[VEC], be[VEC];
  pack_params(shift, gamma, beta, g, n, p, sh, ga, be);
  const long long row_begin = s * g.slice_rows;
  const long long row_end = min(g.rows, row_begin + g.slice_rows);
  const long long off = (long long)n * g.rows * g.channels + p * VEC;
  #pragma unroll 4
  for (long long r = row_begin + r0; r < row_end; r += g.rows_per_pass) {
    Pack xin = *reinterpret_cast<const Pack*>(x + off + r * g.channels);
    Pack gin = *reinterpret_cast<const Pack*>(dy + off + r * g.channels);
    Pack out;
    for (int j = 0; j < VEC; ++j) {
      float xh = (to_f32(xin.v[j]) + sh[j] - m) * rs;
      float d = grad_before_act(to_f32(gin.v[j]), xh, ga[j], be[j], silu);
      from_f32(rs * ga[j] * d - k1 - k2 * xh, &out.v[j]);
    }
    *reinterpret_cast<Pack*>(dx + off + r * g.channels) = out;
  }
}
