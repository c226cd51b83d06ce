// Paged attention over a block-table KV cache: decode and (chunked) prefill.
//
// One CTA computes a tile of "packed query rows" of one sequence against one KV head.
// A packed row r of a sequence stands for (new token r / GQA, query head kv_head*GQA + r % GQA),
// so the GQA query heads that share a KV head share every K/V load, and decode (one token,
// GQA rows) and prefill (many tokens) are the same computation.
//
// Warps: WARPS_M warps share one K/V tile (each owns MT*16 different rows); WARPS_N such
// groups walk interleaved K/V tiles of the CTA's range and are merged at the end through
// shared memory. Prefill uses WARPS_M=4, WARPS_N=1; decode WARPS_M=1, WARPS_N=4.
// Split-KV: with num_splits > 1 each CTA covers split_tokens of the context and writes a
// normalised partial output plus its log2-sum-exp; merge_splits combines them.
//
// S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, fp32 accumulate); K/V tiles
// arrive by 16-byte cp.async into XOR-swizzled shared memory (conflict-free ldmatrix),
// STAGES deep. Online softmax in the log2 domain (scale * log2(e) folded into S).
//
// Programmatic dependent launch (PDL; the cuda backend launches the decode path so on
// sm_90): both kernels let their successor launch at once and wait
// (griddepcontrol.wait) for their predecessor before reading anything, every thread before any
// early return, so each grid completes only after its predecessor did (a successor's wait
// covers the whole chain). Launched without the PDL attribute (prefill, eager tests) the two
// instructions do nothing. The o_proj GEMV after merge_splits issues its weight loads before
// its own wait, so it streams weights while attention and the merge run.
//
// FP8 cache (KV_FP8=1): K and V are stored as e4m3 with one float scale per KV head
// (attention/kv_quant.py). Tiles arrive in shared memory as e4m3 (half the bytes) and each
// thread converts its mma fragments in registers right after the shared-memory load
// (cvt e4m3x2 -> f16x2, exact), so the mmas run in f16 whatever the model dtype: Q is
// converted to f16 once (exact for bf16 values in f16's range, saturated beyond), P is f16,
// the K scale is folded into the softmax scale and the V scale into the final normalisation.
// The fragment layouts come from relabelling, not from moving bytes:
//  - S = Q K^T sums over head dims, so any permutation of them applied to Q and K alike
//    leaves S unchanged. Thread (gid, tig) owns the D/4 contiguous dims [tig*D/4, +D/4) of
//    its K row: 16-byte loads give the B fragments of four k-steps at once, and its Q
//    fragments are read from global memory with the same map.
//  - O = P V: the output dims are relabelled so that thread gid's B-fragment column of every
//    n-tile dp is dim gid*D/8 + dp, i.e. D/8 contiguous bytes of each V row; two token rows
//    are interleaved byte-wise (prmt) into e4m3 pairs. The thread's accumulator column
//    (tig*2 + e) of n-tile dp is then dim (tig*2 + e)*D/8 + dp, undone at the final store.
// Both K and V tiles use their own XOR swizzles (kswz8, vswz8), chosen so that these
// 16-byte reads are free of bank conflicts (D=64 V reads keep a 2-way conflict).
// FP8 needs Q in registers (MT == 1) and sm_89+ (the cvt instruction).
//
// Compile-time configuration (-D): KV_BF16 (1: bf16, 0: fp16: the Q/out dtype), KV_FP8
// (1: e4m3 cache), HEAD_DIM, GQA, BN, STAGES, WARPS_M, WARPS_N, MT, MIN_CTAS (resident CTAs
// per SM the register allocation must allow).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if KV_BF16
typedef __nv_bfloat16 elem_t;
#else
typedef __half elem_t;
#endif

typedef unsigned int u32;
typedef long long i64;

#ifndef KV_FP8
#define KV_FP8 0
#endif
constexpr bool FP8 = KV_FP8;
#if KV_FP8 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "an FP8 cache needs sm_89 or newer (cvt e4m3x2)"
#endif
#if KV_FP8
typedef unsigned char kv_t;
#else
typedef elem_t kv_t;
#endif
// The mma operand type: the model dtype, or f16 for an FP8 cache (e4m3 -> f16 is exact).
#define MMA_BF16 (KV_BF16 && !KV_FP8)

constexpr int D = HEAD_DIM;
constexpr int G = GQA;
constexpr int KV_ELEM = FP8 ? 1 : 2;  // bytes per cached element
constexpr int CHUNKS = D * KV_ELEM / 16;  // 16-byte chunks per K/V row
constexpr int QCHUNKS = D / 8;  // 16-byte chunks per Q row
constexpr int BM = 16 * MT * WARPS_M;  // packed rows per CTA
constexpr int GROUP_THREADS = 32 * WARPS_M;
constexpr int NTHREADS = GROUP_THREADS * WARPS_N;
constexpr int TILE_BYTES = BN * D * KV_ELEM;
constexpr int GROUP_SMEM = STAGES * 2 * TILE_BYTES;
constexpr int OSTRIDE = D + 4;  // fp32 staging row stride, padded against bank conflicts
// With several m-tiles per warp, Q lives in shared memory (ldmatrix per k-step) instead of
// registers: the accumulators need the registers, and each K fragment feeds MT mmas.
constexpr bool QSMEM = MT > 1;
constexpr int Q_BYTES = QSMEM ? BM * D * 2 : 0;
constexpr int ROW_STEP = GROUP_THREADS / CHUNKS;  // tile rows loaded per pass
constexpr int ROWS_PER_THREAD = BN * CHUNKS / GROUP_THREADS;
#define NEG_INF (-__int_as_float(0x7f800000))

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else  // sm_80: no programmatic launch, nothing to wait for
#define PDL_TRIGGER()
#define PDL_WAIT()
#endif

static_assert(D % 16 == 0 && D >= 16, "HEAD_DIM must be a multiple of 16");
static_assert(BN % 16 == 0, "BN must be a multiple of 16");
static_assert(STAGES >= 2, "STAGES must be >= 2");
static_assert(!QSMEM || WARPS_N == 1, "Q in shared memory needs a single warp group");
static_assert(!FP8 || (MT == 1 && (D == 64 || D == 128 || D == 256)),
              "an FP8 cache needs Q in registers (MT == 1) and HEAD_DIM 64, 128 or 256");
static_assert(GROUP_THREADS % CHUNKS == 0 && (BN * CHUNKS) % GROUP_THREADS == 0,
              "a warp group must load whole K/V tiles in equal passes");

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  // src_bytes == 0 zero-fills the destination: rows past the context never hold garbage.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void group_sync(int group) {
  // The cheapest barrier covering one warp group. Named barriers (id 0 is __syncthreads)
  // only when several multi-warp groups share the CTA: they cap CTAs per SM.
  if constexpr (WARPS_M == 1) {
    __syncwarp();
  } else if constexpr (WARPS_N == 1) {
    __syncthreads();
  } else {
    asm volatile("bar.sync %0, %1;\n" ::"r"(group + 1), "n"(GROUP_THREADS));
  }
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if MMA_BF16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as the output dtype (elem_t).
__device__ __forceinline__ u32 pack2(float lo, float hi) {
#if KV_BF16
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
#else
  __half2 h = __floats2half2_rn(lo, hi);
#endif
  return *reinterpret_cast<u32*>(&h);
}

// Two floats as the mma operand type (P).
__device__ __forceinline__ u32 pack2_mma(float lo, float hi) {
#if MMA_BF16
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
#else
  __half2 h = __floats2half2_rn(lo, hi);
#endif
  return *reinterpret_cast<u32*>(&h);
}

// Two Q elements (elem_t) as the mma operand type: f16 for an FP8 cache, saturated.
__device__ __forceinline__ u32 q_operand(u32 x) {
#if KV_FP8 && KV_BF16
  float2 f = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  __half2 h = __floats2half2_rn(fminf(fmaxf(f.x, -65504.f), 65504.f),
                                fminf(fmaxf(f.y, -65504.f), 65504.f));
  return *reinterpret_cast<u32*>(&h);
#else
  return x;
#endif
}

// Two e4m3 values (low byte: low half) as f16x2; exact.
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 x) {
  u32 r;
  const unsigned short h = static_cast<unsigned short>(x & 0xffff);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(r) : "h"(h));
  return r;
}
__device__ __forceinline__ uint4 lds128(u32 addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(u32 addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// Byte offsets of 16-byte chunk c of row r in the FP8 K and V tiles ([rows][D] bytes).
// K: the 8 lanes of a 16-byte-load phase read rows gid, gid+1 at chunks tig*D/64 + j;
// V: rows 2tig(+1) (+8) at chunks gid*D/128 + j (D=64: half chunks).
__device__ __forceinline__ u32 kswz8(int r, int c) {
  return static_cast<u32>(r * D + ((c ^ (r & 1) ^ ((c >> 2) & 2)) << 4));
}
__device__ __forceinline__ u32 vswz8(int r, int c) {
  int x;
  if constexpr (D == 64) {
    x = (r >> 1) & 3;
  } else if constexpr (D == 128) {
    x = ((r >> 1) & 3) << 1;
  } else {
    x = ((r >> 1) & 1) | (((r >> 2) & 1) << 2);
  }
  return static_cast<u32>(r * D + ((c ^ x) << 4));
}

// Byte offset of 16-byte chunk c of row r in a swizzled [rows][D] tile.
__device__ __forceinline__ u32 swz(int r, int c) {
  return static_cast<u32>(r * (D * 2) + ((c ^ (r & 7)) << 4));
}

#ifndef MIN_CTAS
#define MIN_CTAS 1
#endif
extern "C" __global__ void __launch_bounds__(NTHREADS, MIN_CTAS) paged_attention(
    const elem_t* __restrict__ q, i64 q_stride_t, i64 q_stride_h,
    const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache, i64 kv_stride_b,
    i64 kv_stride_t, i64 kv_stride_h,
    const int* __restrict__ block_table, int bt_stride,  // rows of this launch's sequences
    const int* __restrict__ query_start_loc,  // [num_seqs + 1], absolute token indices
    const int* __restrict__ seq_lens,         // [num_seqs]
    elem_t* __restrict__ out, i64 out_stride_t, i64 out_stride_h,
    float* __restrict__ part_o,    // [num_splits, part_tokens, Hq, D] when num_splits > 1
    float* __restrict__ part_lse,  // [num_splits, part_tokens, Hq]
    int token_base, int part_tokens, int num_splits, int split_tokens, int block_size,
    int block_shift, float scale_log2,
    const float* __restrict__ k_scale,  // [num_kv_heads] (FP8 cache only)
    const float* __restrict__ v_scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  PDL_TRIGGER();
  PDL_WAIT();  // q and the cache rows come from the kernels before this one

  const int seq = blockIdx.z;
  const int kvh = blockIdx.y;
  // Last query tiles first: under the causal mask they carry the most work, so the
  // light tiles fill the tail of the launch.
  const int qtile = gridDim.x / num_splits - 1 - static_cast<int>(blockIdx.x / num_splits);
  const int split = blockIdx.x % num_splits;
  const int num_hq = gridDim.y * G;

  const int q_start = query_start_loc[seq];
  const int qlen = query_start_loc[seq + 1] - q_start;
  const int seq_len = seq_lens[seq];
  const int nrows = qlen * G;
  const int row0 = qtile * BM;
  if (row0 >= nrows) return;  // uniform over the CTA
  const int prefix = seq_len - qlen;  // cached tokens before the first new one

  // Causal bound of the tile's last row; a split narrows the range further.
  int kv_end = prefix + (min(row0 + BM, nrows) - 1) / G + 1;
  int kv_begin = 0;
  if (num_splits > 1) {
    kv_begin = split * split_tokens;
    kv_end = min(kv_end, kv_begin + split_tokens);
  }
  const int ntiles = kv_end > kv_begin ? (kv_end - kv_begin + BN - 1) / BN : 0;
  float qk_scale = scale_log2;  // S -> log2 domain (times the K scale for FP8)
  float out_scale = 1.f;        // the V scale for FP8
  if constexpr (FP8) {
    qk_scale *= k_scale[kvh];
    out_scale = v_scale[kvh];
  }

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int wm = warp % WARPS_M;
  const int wn = warp / WARPS_M;  // warp group
  const int gtid = threadIdx.x - wn * GROUP_THREADS;
  const int gid = lane >> 2;  // mma "groupID": fragment row
  const int tig = lane & 3;   // thread in group: fragment column pair

  const int* bt = block_table + static_cast<i64>(seq) * bt_stride;
  const i64 head_off = static_cast<i64>(kvh) * kv_stride_h;
  unsigned char* gsmem = smem + Q_BYTES + wn * GROUP_SMEM;
  const u32 qs_u32 = smem_addr(smem);
  const u32 gsmem_u32 = smem_addr(gsmem);

  // ---- Q, once per CTA: A-operand fragments straight from global memory into registers,
  // or (QSMEM) the whole tile into shared memory by cp.async.
  u32 qf[QSMEM ? 1 : MT][QSMEM ? 1 : D / 16][4];
  int lim[MT][2];  // last KV index each of my rows may see (-1: padding row)
  if constexpr (QSMEM) {
    for (int idx = threadIdx.x; idx < BM * QCHUNKS; idx += NTHREADS) {
      const int r = idx / QCHUNKS;
      const int c = idx % QCHUNKS;
      const int row = row0 + r;
      const elem_t* src = q;
      if (row < nrows) {
        src += static_cast<i64>(q_start + row / G) * q_stride_t +
               static_cast<i64>(kvh * G + row % G) * q_stride_h + c * 8;
      }
      cp_async16(qs_u32 + swz(r, c), src, row < nrows ? 16 : 0);
    }
    cp_async_commit();  // completes before the first K/V group (groups retire in order)
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + wm * 16 * MT + mt * 16 + gid + h * 8;
      const bool valid = row < nrows;
      const int t = row / G;
      lim[mt][h] = valid ? prefix + t : -1;
      if constexpr (QSMEM) continue;
      const elem_t* qrow = q + static_cast<i64>(q_start + t) * q_stride_t +
                           static_cast<i64>(kvh * G + row % G) * q_stride_h;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        u32 lo = 0, hi = 0;
        if (valid) {
          if constexpr (FP8) {  // k-step ks of thread tig: dims tig*D/4 + ks*4 + 0..3
            const uint2 w = *reinterpret_cast<const uint2*>(qrow + tig * (D / 4) + ks * 4);
            lo = q_operand(w.x);
            hi = q_operand(w.y);
          } else {
            lo = *reinterpret_cast<const u32*>(qrow + ks * 16 + tig * 2);
            hi = *reinterpret_cast<const u32*>(qrow + ks * 16 + 8 + tig * 2);
          }
        }
        qf[QSMEM ? 0 : mt][QSMEM ? 0 : ks][h] = lo;      // a0 / a1: columns tig*2..+1
        qf[QSMEM ? 0 : mt][QSMEM ? 0 : ks][h + 2] = hi;  // a2 / a3: columns 8+tig*2..+1
      }
    }
  }
  const int warp_row_first = row0 + wm * 16 * MT;
  const int warp_min_lim = prefix + warp_row_first / G;
  const bool warp_has_pad = warp_row_first + 16 * MT > nrows;

  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m[mt][0] = m[mt][1] = NEG_INF;
    l[mt][0] = l[mt][1] = 0.f;
  }

  // Tiles of this group: wn, wn + WARPS_N, ...
  const int my_tiles = ntiles > wn ? (ntiles - wn + WARPS_N - 1) / WARPS_N : 0;

  // Each thread copies one fixed 16-byte column chunk of every ROW_STEP-th row of the tile,
  // so the column math is hoisted and each row costs one block-table read and a shift.
  auto load_tile = [&](int it, int stage) {
    const int tile_start = kv_begin + (wn + it * WARPS_N) * BN;
    const u32 ks = gsmem_u32 + stage * 2 * TILE_BYTES;
    const u32 vs = ks + TILE_BYTES;
    const int c = gtid % CHUNKS;
    const int r0 = gtid / CHUNKS;
#pragma unroll
    for (int i = 0; i < ROWS_PER_THREAD; ++i) {
      const int r = r0 + i * ROW_STEP;
      const int j = tile_start + r;
      const kv_t* ksrc = k_cache;
      const kv_t* vsrc = v_cache;
      int bytes = 0;
      if (j < kv_end) {
        const int blk = bt[j >> block_shift];
        if (blk >= 0) {
          const i64 off = static_cast<i64>(blk) * kv_stride_b +
                          static_cast<i64>(j & (block_size - 1)) * kv_stride_t + head_off +
                          c * (16 / KV_ELEM);
          ksrc += off;
          vsrc += off;
          bytes = 16;
        }
      }
      if constexpr (FP8) {
        cp_async16(ks + kswz8(r, c), ksrc, bytes);
        cp_async16(vs + vswz8(r, c), vsrc, bytes);
      } else {
        cp_async16(ks + swz(r, c), ksrc, bytes);
        cp_async16(vs + swz(r, c), vsrc, bytes);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();  // always commit: keeps the group count uniform for wait_group
  }

  for (int it = 0; it < my_tiles; ++it) {
    const int nxt = it + STAGES - 1;
    if (nxt < my_tiles) load_tile(nxt, nxt % STAGES);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    group_sync(wn);

    const int stage = it % STAGES;
    const u32 ks = gsmem_u32 + stage * 2 * TILE_BYTES;
    const u32 vs = ks + TILE_BYTES;
    const int tile_start = kv_begin + (wn + it * WARPS_N) * BN;

    // ---- S = Q K^T
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
    if constexpr (FP8) {
      // 16 bytes of K row n*8+gid = the B fragments of k-steps 4j..4j+3 (see the header).
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int j = 0; j < D / 64; ++j) {
          const uint4 w = lds128(ks + kswz8(n * 8 + gid, tig * (D / 64) + j));
          const u32 ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            mma16816(s[0][n], qf[0][j * 4 + e], e4m3x2_to_f16x2(ww[e]),
                     e4m3x2_to_f16x2(ww[e] >> 16));
          }
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (QSMEM) {
            const int r = wm * 16 * MT + mt * 16 + (lane & 15);
            ldsm_x4(qs_u32 + swz(r, kk * 2 + (lane >> 4)), qa[mt][0], qa[mt][1], qa[mt][2],
                    qa[mt][3]);
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[mt][e] = qf[QSMEM ? 0 : mt][QSMEM ? 0 : kk][e];
          }
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          u32 b0, b1, b2, b3;
          const int r = np * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int c = kk * 2 + ((lane >> 3) & 1);
          ldsm_x4(ks + swz(r, c), b0, b1, b2, b3);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816(s[mt][2 * np], qa[mt], b0, b1);
            mma16816(s[mt][2 * np + 1], qa[mt], b2, b3);
          }
        }
      }
    }

    // ---- mask, online softmax (log2 domain)
    const bool need_mask =
        warp_has_pad || tile_start + BN > kv_end || tile_start + BN - 1 > warp_min_lim;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Max over raw scores (scale > 0), then p = exp2(s * scale_log2 - m): one FFMA each.
        float mx = NEG_INF;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (need_mask) {
              const int j = tile_start + n * 8 + tig * 2 + e;
              if (j > lim[mt][h] || j >= kv_end) s[mt][n][h * 2 + e] = NEG_INF;
            }
            mx = fmaxf(mx, s[mt][n][h * 2 + e]);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_new = fmaxf(m[mt][h], mx * qk_scale);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;  // fully masked so far: no NaN
        const float alpha = exp2f(m[mt][h] - m_use);
        m[mt][h] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2f(fmaf(s[mt][n][h * 2 + e], qk_scale, -m_use));
            s[mt][n][h * 2 + e] = p;
            sum += p;
          }
        }
        l[mt][h] = l[mt][h] * alpha + sum;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[mt][i][h * 2] *= alpha;
          o[mt][i][h * 2 + 1] *= alpha;
        }
      }
    }

    // ---- O += P V
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      u32 pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack2_mma(s[mt][2 * kt][0], s[mt][2 * kt][1]);
        pa[mt][1] = pack2_mma(s[mt][2 * kt][2], s[mt][2 * kt][3]);
        pa[mt][2] = pack2_mma(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
        pa[mt][3] = pack2_mma(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
      }
#if KV_FP8
      {
        // Rows 2tig, 2tig+1, 8+2tig, 9+2tig of the k-tile, dims gid*D/8 .. +D/8 of each.
        constexpr int VW = D / 32;
        u32 vr[4][VW];
#pragma unroll
        for (int t4 = 0; t4 < 4; ++t4) {
          const int r = kt * 16 + (t4 >> 1) * 8 + 2 * tig + (t4 & 1);
          if constexpr (VW >= 4) {
#pragma unroll
            for (int c4 = 0; c4 < VW / 4; ++c4) {
              const uint4 w = lds128(vs + vswz8(r, gid * (VW / 4) + c4));
              vr[t4][c4 * 4] = w.x;
              vr[t4][c4 * 4 + 1] = w.y;
              vr[t4][c4 * 4 + 2] = w.z;
              vr[t4][c4 * 4 + 3] = w.w;
            }
          } else {
            const uint2 w = lds64(vs + vswz8(r, gid >> 1) + (gid & 1) * 8);
            vr[t4][0] = w.x;
            vr[t4][1] = w.y;
          }
        }
#pragma unroll
        for (int w = 0; w < VW; ++w) {
          // Byte i of word w is dim 4w+i of my slice: pair rows (k, k+1) byte-wise.
          const u32 lo01 = __byte_perm(vr[0][w], vr[1][w], 0x5140);
          const u32 hi01 = __byte_perm(vr[0][w], vr[1][w], 0x7362);
          const u32 lo23 = __byte_perm(vr[2][w], vr[3][w], 0x5140);
          const u32 hi23 = __byte_perm(vr[2][w], vr[3][w], 0x7362);
          mma16816(o[0][4 * w], pa[0], e4m3x2_to_f16x2(lo01), e4m3x2_to_f16x2(lo23));
          mma16816(o[0][4 * w + 1], pa[0], e4m3x2_to_f16x2(lo01 >> 16),
                   e4m3x2_to_f16x2(lo23 >> 16));
          mma16816(o[0][4 * w + 2], pa[0], e4m3x2_to_f16x2(hi01), e4m3x2_to_f16x2(hi23));
          mma16816(o[0][4 * w + 3], pa[0], e4m3x2_to_f16x2(hi01 >> 16),
                   e4m3x2_to_f16x2(hi23 >> 16));
        }
      }
#else
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        u32 b0, b1, b2, b3;
        const int r = kt * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int c = dp * 2 + (lane >> 4);
        ldsm_x4_t(vs + swz(r, c), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(o[mt][2 * dp], pa[mt], b0, b1);
          mma16816(o[mt][2 * dp + 1], pa[mt], b2, b3);
        }
      }
#endif
    }
    group_sync(wn);  // the stage is refilled by the next iteration's load
  }
  cp_async_wait<0>();
  __syncthreads();  // K/V buffers are reused below as the fp32 staging area

  // ---- stage every group's unnormalised O, m, l; then merge groups and write out.
  float* so = reinterpret_cast<float*>(smem);
  float* sm = so + WARPS_N * BM * OSTRIDE;
  float* sl = sm + WARPS_N * BM;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float lsum = l[mt][h];
      lsum += __shfl_xor_sync(0xffffffff, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffff, lsum, 2);
      const int r = wm * 16 * MT + mt * 16 + gid + h * 8;
      float* orow = so + (wn * BM + r) * OSTRIDE;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        if constexpr (FP8) {  // accumulator column tig*2+e of n-tile i is dim (tig*2+e)*D/8+i
          orow[(tig * 2) * (D / 8) + i] = o[mt][i][h * 2];
          orow[(tig * 2 + 1) * (D / 8) + i] = o[mt][i][h * 2 + 1];
        } else {
          orow[i * 8 + tig * 2] = o[mt][i][h * 2];
          orow[i * 8 + tig * 2 + 1] = o[mt][i][h * 2 + 1];
        }
      }
      if (tig == 0) {
        sm[wn * BM + r] = m[mt][h];
        sl[wn * BM + r] = lsum;
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < BM * (D / 4); idx += NTHREADS) {
    const int r = idx / (D / 4);
    const int d = (idx % (D / 4)) * 4;
    const int row = row0 + r;
    if (row >= nrows) continue;
    float mmax = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) mmax = fmaxf(mmax, sm[w * BM + r]);
    const float mref = mmax == NEG_INF ? 0.f : mmax;
    float L = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) {
      const float wt = exp2f(sm[w * BM + r] - mref);
      L += sl[w * BM + r] * wt;
      const float4 ov = *reinterpret_cast<const float4*>(so + (w * BM + r) * OSTRIDE + d);
      acc[0] += ov.x * wt;
      acc[1] += ov.y * wt;
      acc[2] += ov.z * wt;
      acc[3] += ov.w * wt;
    }
    const float inv = L > 0.f ? out_scale / L : 0.f;
    const int t = q_start + row / G;
    const int head = kvh * G + row % G;
    if (num_splits == 1) {
      elem_t* dst =
          out + static_cast<i64>(t) * out_stride_t + static_cast<i64>(head) * out_stride_h + d;
      u32 packed[2] = {pack2(acc[0] * inv, acc[1] * inv), pack2(acc[2] * inv, acc[3] * inv)};
      *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
    } else {
      const i64 prow = (static_cast<i64>(split) * part_tokens + (t - token_base)) * num_hq + head;
      *reinterpret_cast<float4*>(part_o + prow * D + d) =
          make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
      if (d == 0) part_lse[prow] = L > 0.f ? mmax + log2f(L) : NEG_INF;
    }
  }
}

// Combines split-KV partial outputs by their log2-sum-exp. Grid (tokens, Hq); block
// (D/4, MERGE_LANES): the lanes walk different splits so the loads overlap, then reduce.
constexpr int MERGE_LANES = 4;
constexpr int MAX_SPLITS = 256;

extern "C" __global__ void merge_splits(const float* __restrict__ part_o,
                                        const float* __restrict__ part_lse,
                                        elem_t* __restrict__ out, i64 out_stride_t,
                                        i64 out_stride_h, int token_base, int part_tokens,
                                        int num_splits) {
  __shared__ float lse_s[MAX_SPLITS];
  __shared__ float red[MERGE_LANES][D + 4];
  __shared__ float red_l[MERGE_LANES];
  PDL_TRIGGER();  // the o_proj GEMV may start streaming its weights now
  PDL_WAIT();     // part_o / part_lse come from paged_attention
  const int t = blockIdx.x;  // relative to token_base
  const int head = blockIdx.y;
  const int num_hq = gridDim.y;
  const int d = threadIdx.x * 4;
  const int lane_s = threadIdx.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int s = tid; s < num_splits; s += blockDim.x * MERGE_LANES)
    lse_s[s] = part_lse[(static_cast<i64>(s) * part_tokens + t) * num_hq + head];
  __syncthreads();
  float mmax = NEG_INF;
  for (int s = 0; s < num_splits; ++s) mmax = fmaxf(mmax, lse_s[s]);
  const float mref = mmax == NEG_INF ? 0.f : mmax;
  float L = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int s = lane_s; s < num_splits; s += MERGE_LANES) {
    const float wt = exp2f(lse_s[s] - mref);  // empty split: lse -inf -> weight 0
    const i64 prow = (static_cast<i64>(s) * part_tokens + t) * num_hq + head;
    const float4 ov = *reinterpret_cast<const float4*>(part_o + prow * D + d);
    L += wt;
    acc[0] += ov.x * wt;
    acc[1] += ov.y * wt;
    acc[2] += ov.z * wt;
    acc[3] += ov.w * wt;
  }
  *reinterpret_cast<float4*>(&red[lane_s][d]) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  if (threadIdx.x == 0) red_l[lane_s] = L;
  __syncthreads();
  if (lane_s != 0) return;
  L = 0.f;
  for (int w = 0; w < MERGE_LANES; ++w) {
    L += red_l[w];
    if (w == 0) continue;
    for (int e = 0; e < 4; ++e) acc[e] += red[w][d + e];
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  elem_t* dst = out + static_cast<i64>(token_base + t) * out_stride_t +
                static_cast<i64>(head) * out_stride_h + d;
  u32 packed[2] = {pack2(acc[0] * inv, acc[1] * inv), pack2(acc[2] * inv, acc[3] * inv)};
  *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
}
