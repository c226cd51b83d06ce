// Scatters the step's new K and V rows into the paged cache at slot_mapping.
// slot = block_id * block_size + offset; a negative slot (padding row) is skipped.
// One thread moves one 16-byte chunk of one (token, kv head) row of K and of V; the copy is
// dtype-agnostic (2-byte elements), so one compiled kernel serves bf16 and fp16.
//
// Programmatic dependent launch (kernels/cache_write.py, pdl=True on the decode path): every thread
// lets the next kernel launch, then waits for its predecessor (the one that wrote k and v)
// before any read or write; launched without the PDL attribute both are no-ops. The wait comes
// before the bounds return so the grid never completes ahead of its predecessor (a later
// kernel's wait only covers this grid, which then covers the one before).

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else  // sm_80: no programmatic launch, nothing to wait for
#define PDL_TRIGGER()
#define PDL_WAIT()
#endif

typedef long long i64;

extern "C" __global__ void cache_write(const unsigned short* __restrict__ k,
                                       const unsigned short* __restrict__ v, i64 k_stride_t,
                                       i64 k_stride_h, i64 v_stride_t, i64 v_stride_h,
                                       const i64* __restrict__ slot_mapping,
                                       unsigned short* __restrict__ k_cache,
                                       unsigned short* __restrict__ v_cache, i64 cache_stride_b,
                                       i64 cache_stride_t, i64 cache_stride_h, int block_size,
                                       int num_tokens, int num_kv_heads, int head_dim) {
  PDL_TRIGGER();
  PDL_WAIT();
  const int chunks = head_dim / 8;
  const i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<i64>(num_tokens) * num_kv_heads * chunks) return;
  const int c = static_cast<int>(idx % chunks);
  const int h = static_cast<int>((idx / chunks) % num_kv_heads);
  const int t = static_cast<int>(idx / (static_cast<i64>(chunks) * num_kv_heads));
  const i64 slot = slot_mapping[t];
  if (slot < 0) return;
  const i64 blk = slot / block_size;
  const i64 off = slot % block_size;
  const i64 dst = blk * cache_stride_b + off * cache_stride_t + h * cache_stride_h + c * 8;
  *reinterpret_cast<uint4*>(k_cache + dst) =
      *reinterpret_cast<const uint4*>(k + t * k_stride_t + h * k_stride_h + c * 8);
  *reinterpret_cast<uint4*>(v_cache + dst) =
      *reinterpret_cast<const uint4*>(v + t * v_stride_t + h * v_stride_h + c * 8);
}

// The same scatter into an FP8 (e4m3) cache: stored = saturate(x / scale[head]), rounded to
// nearest even, exactly as attention/kv_quant.py's quantize (an IEEE division, then the
// saturating conversion). One thread converts one 8-element chunk of K and of V (16 bytes in,
// 8 bytes out); in_bf16 selects how the 2-byte inputs are read (bf16 or fp16).
__device__ __forceinline__ float elem_to_float(unsigned short x, int in_bf16) {
  if (in_bf16) return __uint_as_float(static_cast<unsigned int>(x) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}

// e4m3x2 of (lo, hi): lo in the low byte. The conversion exists from sm_89 on; the launcher
// never runs this kernel below that (FP8 is refused at start there).
__device__ __forceinline__ unsigned short to_e4m3x2(float lo, float hi) {
  unsigned short r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
#else
  __trap();
#endif
  return r;
}

__device__ __forceinline__ uint2 quantize8(uint4 x, float scale, int in_bf16) {
  const unsigned int w[4] = {x.x, x.y, x.z, x.w};
  unsigned int out[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    unsigned short p[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const unsigned int v = w[i * 2 + j];
      const float lo = __fdiv_rn(elem_to_float(v & 0xffff, in_bf16), scale);
      const float hi = __fdiv_rn(elem_to_float(v >> 16, in_bf16), scale);
      p[j] = to_e4m3x2(lo, hi);
    }
    out[i] = static_cast<unsigned int>(p[0]) | (static_cast<unsigned int>(p[1]) << 16);
  }
  return make_uint2(out[0], out[1]);
}

extern "C" __global__ void cache_write_fp8(
    const unsigned short* __restrict__ k, const unsigned short* __restrict__ v, i64 k_stride_t,
    i64 k_stride_h, i64 v_stride_t, i64 v_stride_h, const i64* __restrict__ slot_mapping,
    unsigned char* __restrict__ k_cache, unsigned char* __restrict__ v_cache, i64 cache_stride_b,
    i64 cache_stride_t, i64 cache_stride_h, int block_size, int num_tokens, int num_kv_heads,
    int head_dim, const float* __restrict__ k_scale, const float* __restrict__ v_scale,
    int in_bf16) {
  PDL_TRIGGER();
  PDL_WAIT();
  const int chunks = head_dim / 8;
  const i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<i64>(num_tokens) * num_kv_heads * chunks) return;
  const int c = static_cast<int>(idx % chunks);
  const int h = static_cast<int>((idx / chunks) % num_kv_heads);
  const int t = static_cast<int>(idx / (static_cast<i64>(chunks) * num_kv_heads));
  const i64 slot = slot_mapping[t];
  if (slot < 0) return;
  const i64 blk = slot / block_size;
  const i64 off = slot % block_size;
  const i64 dst = blk * cache_stride_b + off * cache_stride_t + h * cache_stride_h + c * 8;
  const uint4 kx = *reinterpret_cast<const uint4*>(k + t * k_stride_t + h * k_stride_h + c * 8);
  const uint4 vx = *reinterpret_cast<const uint4*>(v + t * v_stride_t + h * v_stride_h + c * 8);
  *reinterpret_cast<uint2*>(k_cache + dst) = quantize8(kx, k_scale[h], in_bf16);
  *reinterpret_cast<uint2*>(v_cache + dst) = quantize8(vx, v_scale[h], in_bf16);
}
