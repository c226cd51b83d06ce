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
