// The small per-layer ops of the decoder, each one kernel, plus a GEMV for few-row linear
// layers, an argmax over the logits and the decode run-ahead's input advance.
//
// At batch 1 a decode step is bound by reading the weights; every extra launch inside the
// captured graph costs a few microseconds on top, so the ~30 elementwise torch ops of a layer
// (RMSNorm in fp32, residual adds, RoPE, SiLU*mul) become four kernels here.
//
// Rounding follows the torch reference step by step (model/decoder_ops.py): every place torch
// rounds to the model dtype, these kernels round too (explicit __float2*_rn, never an FMA
// across a rounding), so results equal the torch path bit for bit except where torch
// reduces in another order (the RMS sum, the GEMV dot products) or uses another exp (SiLU).
//
// Compile-time configuration (-D): BF16 (1: bf16, 0: fp16); NORM_PER_THREAD (16-byte chunks
// of a row each RMSNorm thread keeps in registers); GEMV_M (most x rows per GEMV launch),
// GEMV_UNROLL (16-byte weight loads per lane per batch), PROLOGUE (what the GEMV does to x).
//
// Every kernel starts with griddepcontrol.launch_dependents / wait (programmatic dependent
// launch, see the GEMV): nothing an earlier kernel wrote is read, and nothing is written,
// before the wait.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if BF16
typedef __nv_bfloat16 elem_t;
__device__ __forceinline__ float to_f(elem_t x) { return __bfloat162float(x); }
__device__ __forceinline__ elem_t from_f(float x) { return __float2bfloat16_rn(x); }
#else
typedef __half elem_t;
__device__ __forceinline__ float to_f(elem_t x) { return __half2float(x); }
__device__ __forceinline__ elem_t from_f(float x) { return __float2half_rn(x); }
#endif

typedef long long i64;

union Vec8 {  // one 16-byte chunk: 8 elements
  uint4 u;
  elem_t h[8];
};

__device__ __forceinline__ Vec8 load8(const elem_t* p) {
  Vec8 v;
  v.u = *reinterpret_cast<const uint4*>(p);
  return v;
}

__device__ __forceinline__ void store8(elem_t* p, const Vec8& v) {
  *reinterpret_cast<uint4*>(p) = v.u;
}

// torch rounds each product and each sum of bf16/fp16 tensors to the dtype.
__device__ __forceinline__ float rnd(float x) { return to_f(from_f(x)); }

// ------------------------------------------------------------------------ RMSNorm (+ add)
// One CTA per row. With ADD: residual = x + residual (rounded, written back), then
// out = weight * (residual * rsqrt(mean(residual^2) + eps)) -- i.e. layer l's residual add
// fused into the next norm. Without: out = norm(x), residual untouched.

#ifndef NORM_PER_THREAD
#define NORM_PER_THREAD 4
#endif

__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? red[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void add_rms_norm(const elem_t* __restrict__ x, i64 x_stride,
                                        elem_t* __restrict__ residual, i64 res_stride,
                                        const elem_t* __restrict__ weight,
                                        elem_t* __restrict__ out, i64 out_stride, int hidden,
                                        float eps, int add) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");  // see the GEMV's note on PDL
  __shared__ float red[32];
  const i64 row = blockIdx.x;
  const int chunks = hidden >> 3;
  float v[NORM_PER_THREAD][8];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_PER_THREAD; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) {
      Vec8 a = load8(x + row * x_stride + c * 8);
      if (add) {
        elem_t* rp = residual + row * res_stride + c * 8;
        Vec8 r = load8(rp);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          r.h[j] = from_f(to_f(a.h[j]) + to_f(r.h[j]));
          v[i][j] = to_f(r.h[j]);
        }
        store8(rp, r);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = to_f(a.h[j]);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
    }
  }
  ss = block_sum(ss, red);
  const float inv = rsqrtf(__fdiv_rn(ss, static_cast<float>(hidden)) + eps);
#pragma unroll
  for (int i = 0; i < NORM_PER_THREAD; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) {
      Vec8 w = load8(weight + c * 8), o;
#pragma unroll
      for (int j = 0; j < 8; ++j) o.h[j] = from_f(to_f(w.h[j]) * rnd(v[i][j] * inv));
      store8(out + row * out_stride + c * 8, o);
    }
  }
}

// ------------------------------------------------------------------------ SiLU(gate) * up
// gu [rows, 2 * inter] (gate columns first, as gate_up_proj writes them) -> out [rows, inter].
// One thread per 16-byte chunk of out.

extern "C" __global__ void silu_mul(const elem_t* __restrict__ gu, i64 gu_stride,
                                    elem_t* __restrict__ out, i64 out_stride, int inter,
                                    int rows) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int chunks = inter >> 3;
  const i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<i64>(rows) * chunks) return;
  const i64 row = idx / chunks;
  const int c = static_cast<int>(idx % chunks);
  const Vec8 g = load8(gu + row * gu_stride + c * 8);
  const Vec8 u = load8(gu + row * gu_stride + inter + c * 8);
  Vec8 o;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float gf = to_f(g.h[j]);
    const float s = rnd(__fdiv_rn(gf, 1.f + expf(-gf)));  // F.silu, rounded like torch
    o.h[j] = from_f(s * to_f(u.h[j]));
  }
  store8(out + row * out_stride + c * 8, o);
}

// ------------------------------------------------------------------------ RoPE on q and k
// qkv [T, (Hq + 2 Hkv) * D] as qkv_proj writes it (q heads, then k heads, then v heads).
// q_out [T, Hq, D] and k_out [T, Hkv, D] get the rotate-half rotation by the position's
// angles (cos/sin tables [max_positions, D], both halves equal); v_out [T, Hkv, D] a copy,
// so the attention backend gets three contiguous tensors from one launch.
// Rotated work item: 8 pairs (i, i + D/2) of one head; copy item: one 16-byte chunk of v.
// With slot_mapping non-null the rotated k and the v rows are also stored into the paged
// cache (k_cache/v_cache, element strides of block, token, head: NHD or HND alike) at
// slot_mapping[t] (slot = block * block_size + offset; negative = padding row, not stored),
// exactly what cache_write.cu would store from k_out/v_out; the backend then skips it
// (kv_written), saving a launch and a dependent step per layer.


extern "C" __global__ void rope_qkv(const elem_t* __restrict__ qkv, i64 qkv_stride,
                                    const i64* __restrict__ positions,
                                    const elem_t* __restrict__ cos_t,
                                    const elem_t* __restrict__ sin_t, elem_t* __restrict__ q_out,
                                    elem_t* __restrict__ k_out, elem_t* __restrict__ v_out,
                                    int num_tokens, int hq, int hkv, int head_dim,
                                    const i64* __restrict__ slot_mapping,
                                    elem_t* __restrict__ k_cache, elem_t* __restrict__ v_cache,
                                    i64 cache_sb, i64 cache_st, i64 cache_sh, int block_size) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int half = head_dim >> 1;
  const int half_chunks = half >> 3;
  const int rot_items = (hq + hkv) * half_chunks;
  const int v_chunks = hkv * (head_dim >> 3);
  const int items = rot_items + v_chunks;
  const i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<i64>(num_tokens) * items) return;
  const i64 t = idx / items;
  const int r = static_cast<int>(idx % items);
  const elem_t* src = qkv + t * qkv_stride;
  // Cache offset of token t's row (head added by the caller); -1: no cache store.
  auto cache_row = [&]() -> i64 {
    if (slot_mapping == nullptr) return -1;
    const i64 slot = slot_mapping[t];
    return slot < 0 ? -1 : (slot / block_size) * cache_sb + (slot % block_size) * cache_st;
  };
  if (r >= rot_items) {  // v: plain copy
    const int c = r - rot_items;
    const Vec8 val = load8(src + (hq + hkv) * head_dim + c * 8);
    store8(v_out + t * v_chunks * 8 + c * 8, val);
    const i64 row = cache_row();
    if (row >= 0) {
      const int h = (c * 8) / head_dim, d = (c * 8) % head_dim;
      store8(v_cache + row + h * cache_sh + d, val);
    }
    return;
  }
  const int head = r / half_chunks;
  const int c = (r % half_chunks) * 8;
  const i64 pos = positions[t];
  const Vec8 x1 = load8(src + head * head_dim + c), x2 = load8(src + head * head_dim + half + c);
  const Vec8 c1 = load8(cos_t + pos * head_dim + c), c2 = load8(cos_t + pos * head_dim + half + c);
  const Vec8 s1 = load8(sin_t + pos * head_dim + c), s2 = load8(sin_t + pos * head_dim + half + c);
  Vec8 o1, o2;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float a = to_f(x1.h[j]), b = to_f(x2.h[j]);
    // q * cos + cat(-x2, x1) * sin, each product and the sum rounded as torch does.
    o1.h[j] = from_f(rnd(a * to_f(c1.h[j])) + rnd(-b * to_f(s1.h[j])));
    o2.h[j] = from_f(rnd(b * to_f(c2.h[j])) + rnd(a * to_f(s2.h[j])));
  }
  elem_t* dst = head < hq ? q_out + (t * hq + head) * head_dim
                          : k_out + (t * hkv + (head - hq)) * head_dim;
  store8(dst + c, o1);
  store8(dst + half + c, o2);
  if (head >= hq) {
    const i64 row = cache_row();
    if (row >= 0) {
      elem_t* kc = k_cache + row + (head - hq) * cache_sh;
      store8(kc + c, o1);
      store8(kc + half + c, o2);
    }
  }
}

// ------------------------------------------------------------------------ GEMV (few rows)
// out[m, n] = sum_k x'[m, k] * w[n, k] (+ bias[n]) for m < rows <= GEMV_M, fp32 accumulate:
// nn.Linear at batch <= GEMV_M. One warp per output column n streams the weight row w[n, :]
// with 16-byte loads, double-buffered (2 x GEMV_UNROLL loads per lane), bypassing L1 (read
// once); the grid is one resident wave of CTAs that stride over the columns, so a prologue
// runs once per CTA. x' is, by PROLOGUE:
//   0: x itself (read through L1);
//   1: rms_norm(residual + x) * norm_w (x alone when residual is null), built in shared
//      memory; CTA 0 also writes residual + x to residual_out (layer l's residual add and
//      layer l+1's input norm fused into the GEMV that follows them);
//   2: silu(x[:, :k]) * x[:, k:] (SiLU-and-mul fused into down_proj), in shared memory.
// The result is rounded to the dtype (and widened to fp32 when out_f32, like .float()).
//
// Programmatic dependent launch: the weight rows depend on no earlier kernel, so the first
// weight loads are issued before griddepcontrol.wait; launched with programmatic stream
// serialisation (kernels/launcher.py) the GEMV prefetches while its predecessor drains.
// Without that launch attribute both griddepcontrol instructions do nothing.

#ifndef GEMV_M
#define GEMV_M 1
#endif
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif
#ifndef PROLOGUE
#define PROLOGUE 0
#endif

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b, float acc) {
  Vec8 va, vb;
  va.u = a;
  vb.u = b;
#pragma unroll
  for (int j = 0; j < 8; ++j) acc = fmaf(to_f(va.h[j]), to_f(vb.h[j]), acc);
  return acc;
}

__device__ __forceinline__ void load_w(const elem_t* w, int col, int base, int k, int chunks,
                                       uint4 (&wv)[GEMV_UNROLL]) {
  const uint4* row = reinterpret_cast<const uint4*>(w + static_cast<i64>(col) * k);
#pragma unroll
  for (int u = 0; u < GEMV_UNROLL; ++u) {
    const int c = base + u * 32;
    wv[u] = c < chunks ? ld_stream(row + c) : make_uint4(0, 0, 0, 0);
  }
}

#if PROLOGUE == 1
__device__ void prologue_add_norm(const elem_t* x, i64 x_stride, const elem_t* residual,
                                  i64 res_stride, elem_t* residual_out, i64 res_out_stride,
                                  const elem_t* norm_w, float eps, int rows, int k,
                                  elem_t* xs, float* red) {
  const int chunks = k >> 3;
  for (int m = 0; m < rows; ++m) {
    float ss = 0.f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      Vec8 s = load8(x + m * x_stride + c * 8);
      if (residual != nullptr) {
        const Vec8 r = load8(residual + m * res_stride + c * 8);
#pragma unroll
        for (int j = 0; j < 8; ++j) s.h[j] = from_f(to_f(s.h[j]) + to_f(r.h[j]));
        if (blockIdx.x == 0) store8(residual_out + m * res_out_stride + c * 8, s);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += to_f(s.h[j]) * to_f(s.h[j]);
      store8(xs + m * k + c * 8, s);
    }
    ss = block_sum(ss, red);
    __syncthreads();  // red[] is reused by the next row
    const float inv = rsqrtf(__fdiv_rn(ss, static_cast<float>(k)) + eps);
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {  // this thread's own chunks
      Vec8 s = load8(xs + m * k + c * 8);
      const Vec8 w = load8(norm_w + c * 8);
#pragma unroll
      for (int j = 0; j < 8; ++j) s.h[j] = from_f(to_f(w.h[j]) * rnd(to_f(s.h[j]) * inv));
      store8(xs + m * k + c * 8, s);
    }
  }
}
#endif

#if PROLOGUE == 2
__device__ void prologue_silu_mul(const elem_t* x, i64 x_stride, int rows, int k, elem_t* xs) {
  const int chunks = k >> 3;
  for (int m = 0; m < rows; ++m) {
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      const Vec8 g = load8(x + m * x_stride + c * 8);
      const Vec8 u = load8(x + m * x_stride + k + c * 8);
      Vec8 o;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float gf = to_f(g.h[j]);
        o.h[j] = from_f(rnd(__fdiv_rn(gf, 1.f + expf(-gf))) * to_f(u.h[j]));
      }
      store8(xs + m * k + c * 8, o);
    }
  }
}
#endif

extern "C" __global__ void __launch_bounds__(256)
    gemv(const elem_t* __restrict__ x, i64 x_stride, const elem_t* __restrict__ residual,
         i64 res_stride, elem_t* __restrict__ residual_out, i64 res_out_stride,
         const elem_t* __restrict__ norm_w, float eps, const elem_t* __restrict__ w,
         const elem_t* __restrict__ bias, void* __restrict__ out, i64 out_stride, int out_f32,
         int rows, int n, int k) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int stride = gridDim.x * warps;
  const int chunks = k >> 3;
  int col = blockIdx.x * warps + (threadIdx.x >> 5);
  uint4 wv[GEMV_UNROLL];
  if (col < n) load_w(w, col, lane, k, chunks, wv);  // needs nothing from earlier kernels
  asm volatile("griddepcontrol.wait;" ::: "memory");
#if PROLOGUE == 0
  const elem_t* xp = x;
  const i64 xp_stride = x_stride;
#else
  extern __shared__ uint4 smem_raw[];
  elem_t* xs = reinterpret_cast<elem_t*>(smem_raw);
#if PROLOGUE == 1
  __shared__ float red[32];
  prologue_add_norm(x, x_stride, residual, res_stride, residual_out, res_out_stride, norm_w,
                    eps, rows, k, xs, red);
#else
  prologue_silu_mul(x, x_stride, rows, k, xs);
#endif
  __syncthreads();
  const elem_t* xp = xs;
  const i64 xp_stride = k;
#endif
  for (; col < n; col += stride) {
    const int next = col + stride;
    float acc[GEMV_M];
#pragma unroll
    for (int m = 0; m < GEMV_M; ++m) acc[m] = 0.f;
    for (int base = lane;; base += 32 * GEMV_UNROLL) {
      uint4 cur[GEMV_UNROLL];
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u) cur[u] = wv[u];
      const int nb = base + 32 * GEMV_UNROLL;
      // Issue the next loads (this row's, else the next column's) before this FMA batch.
      if (nb < chunks) {
        load_w(w, col, nb, k, chunks, wv);
      } else if (next < n) {
        load_w(w, next, lane, k, chunks, wv);
      }
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; ++u) {
        const int c = base + u * 32;
        if (c < chunks) {
#pragma unroll
          for (int m = 0; m < GEMV_M; ++m) {
            if (m < rows) {
              const uint4 xv = *(reinterpret_cast<const uint4*>(xp + m * xp_stride) + c);
              acc[m] = dot8(cur[u], xv, acc[m]);
            }
          }
        }
      }
      if (nb >= chunks) break;
    }
#pragma unroll
    for (int m = 0; m < GEMV_M; ++m) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
    }
    if (lane == 0) {
      const float b = bias != nullptr ? to_f(bias[col]) : 0.f;
#pragma unroll
      for (int m = 0; m < GEMV_M; ++m) {
        if (m < rows) {
          const elem_t r = from_f(acc[m] + b);
          if (out_f32) {
            reinterpret_cast<float*>(out)[m * out_stride + col] = to_f(r);
          } else {
            reinterpret_cast<elem_t*>(out)[m * out_stride + col] = r;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------ argmax
// tokens[r] = argmax(logits[r, :]) of fp32 rows: the first index among equal maxima, NaN
// above everything (torch.argmax's answer). Two launches: argmax_partial gives each
// (row, slice) CTA one slice of the row (so a batch-1 vocabulary still spreads over many SMs)
// and writes its best (value, index); argmax_final reduces a row's slices.

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_best(float& bv, int& bi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
}

extern "C" __global__ void __launch_bounds__(256)
    argmax_partial(const float* __restrict__ logits, i64 stride, int n, int slice,
                   float* __restrict__ part_v, int* __restrict__ part_i) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  __shared__ float sv[8];
  __shared__ int si[8];
  const float* row = logits + blockIdx.y * stride;
  const int begin = blockIdx.x * slice, end = min(n, begin + slice);
  float bv = -__int_as_float(0x7f800000);
  int bi = n;  // past the end: loses to every real element
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = row[i];
    if (better(v, i, bv, bi)) bv = v, bi = i;
  }
  warp_best(bv, bi);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    bv = lane < 8 ? sv[lane] : -__int_as_float(0x7f800000);
    bi = lane < 8 ? si[lane] : n;
    warp_best(bv, bi);
    if (lane == 0) {
      part_v[blockIdx.y * gridDim.x + blockIdx.x] = bv;
      part_i[blockIdx.y * gridDim.x + blockIdx.x] = bi;
    }
  }
}

extern "C" __global__ void argmax_final(const float* __restrict__ part_v,
                                        const int* __restrict__ part_i, int slices, int n,
                                        i64* __restrict__ tokens) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  float bv = -__int_as_float(0x7f800000);
  int bi = n;
  for (int s = threadIdx.x; s < slices; s += 32) {
    const float v = part_v[blockIdx.x * slices + s];
    const int i = part_i[blockIdx.x * slices + s];
    if (better(v, i, bv, bi)) bv = v, bi = i;
  }
  warp_best(bv, bi);
  if (threadIdx.x == 0) tokens[blockIdx.x] = bi < n ? bi : 0;
}

// ------------------------------------------------------------------ decode run-ahead
// The next decode step's inputs from this one's, on the device (cuda_graphs.py run-ahead):
// each live row (slot >= 0; padding rows have slot -1 and stay as they are) takes the token
// the graph's argmax just chose and moves one position on, in the same block (the host
// launches this only when no row's next position starts a block).
extern "C" __global__ void advance_decode(i64* __restrict__ input_ids, i64* __restrict__ positions,
                                          i64* __restrict__ slot_mapping, int* __restrict__ seq_lens,
                                          const i64* __restrict__ greedy, int rows) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows || slot_mapping[i] < 0) return;
  input_ids[i] = greedy[i];
  positions[i] += 1;
  slot_mapping[i] += 1;
  seq_lens[i] += 1;
}
