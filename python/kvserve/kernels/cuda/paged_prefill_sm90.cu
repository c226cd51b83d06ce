// Paged (chunked) prefill for Hopper (sm_90a): warpgroup MMA (wgmma) from 128B-swizzled
// shared memory. Same inputs and semantics as paged_attention.cu's prefill tiling (causal,
// bottom-right aligned: new token i of a sequence with L tokens sees keys 0..L-qlen+i),
// head_dim 128 only; the cuda backend uses it for prefills on sm_90 where the ws kernel
// cannot address the cache (benches/RESULTS.md has both kernels' figures).
//
// A CTA owns BM = 128 packed query rows of one sequence and one KV head (packed row r =
// new token r / GQA, query head kv_head*GQA + r % GQA: GQA heads share every K/V load) and
// walks the K/V tiles of the block table, BN = 128 tokens each, up to its causal bound.
// Two warpgroups own 64 rows each (and both issue the K/V copies; no producer warp):
//   S  = Q K^T : wgmma m64n128k16, A (Q) and B (K) from shared memory, both K-major;
//   online softmax on the fp32 accumulators (log2 domain, scale*log2e folded in);
//   O += P V   : wgmma m64n128k16, A (P, bf16/fp16) from registers, B (V) from shared
//                memory, N-major (transposed B).
// K/V rows are gathered through the block table with 16-byte cp.async (zero-filled past
// the context) into a STAGES-deep ring; every tile in shared memory is two [rows][64]
// halves of 128-byte rows whose 16-byte chunks are XOR-swizzled by (row & 7): the
// hardware's 128B swizzle, so wgmma reads it without bank conflicts through descriptors.
// The output goes back through shared memory (each warpgroup's own Q rows, no longer read)
// as 16-byte coalesced stores.
//
// Compile-time configuration (-D): KV_BF16 (1: bf16, 0: fp16), GQA, STAGES (2 or 3).

#include "sm90_wgmma.cuh"

constexpr int D = 128;
constexpr int G = GQA;
constexpr int BM = 128;  // packed query rows per CTA (2 warpgroups x 64)
constexpr int BN = 128;  // K/V tokens per tile
constexpr int NTHREADS = 256;
constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
constexpr int Q_BYTES = BM * D * 2;
constexpr int KV_TILE_BYTES = BN * D * 2;
constexpr int STAGE_BYTES = 2 * KV_TILE_BYTES;
constexpr int ROWS_PER_PASS = NTHREADS / CHUNKS;  // 16

static_assert(STAGES >= 2 && STAGES <= 3, "STAGES must be 2 or 3 (shared memory)");
static_assert(Q_BYTES + STAGES * STAGE_BYTES + 1024 <= 227 * 1024, "shared memory");

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Byte offset of 16-byte chunk c (0..15) of row r in a [2][rows][64] swizzled tile.
__device__ __forceinline__ u32 tile_off(int rows, int r, int c) {
  return static_cast<u32>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) paged_prefill_sm90(
    const elem_t* __restrict__ q, i64 q_stride_t, i64 q_stride_h,
    const elem_t* __restrict__ k_cache, const elem_t* __restrict__ v_cache, i64 kv_stride_b,
    i64 kv_stride_t, i64 kv_stride_h,
    const int* __restrict__ block_table, int bt_stride,  // rows of this launch's sequences
    const int* __restrict__ query_start_loc,  // [num_seqs + 1], absolute token indices
    const int* __restrict__ seq_lens,         // [num_seqs]
    elem_t* __restrict__ out, i64 out_stride_t, i64 out_stride_h, int block_size,
    int block_shift, float scale_log2) {
  extern __shared__ unsigned char smem_raw[];
  // wgmma's 128B swizzle repeats every 1024 bytes: align the tiles to it.
  const u32 raw_u32 = smem_addr(smem_raw);
  const u32 q_s = (raw_u32 + 1023u) & ~1023u;
  unsigned char* q_ptr = smem_raw + (q_s - raw_u32);
  const u32 kv_s = q_s + Q_BYTES;

  const int seq = blockIdx.z;
  const int kvh = blockIdx.y;
  // Last query tiles first: under the causal mask they carry the most work.
  const int qtile = gridDim.x - 1 - static_cast<int>(blockIdx.x);
  const int q_start = query_start_loc[seq];
  const int qlen = query_start_loc[seq + 1] - q_start;
  const int nrows = qlen * G;
  const int row0 = qtile * BM;
  if (row0 >= nrows) return;  // uniform over the CTA
  const int prefix = seq_lens[seq] - qlen;
  const int kv_end = prefix + (min(row0 + BM, nrows) - 1) / G + 1;
  const int ntiles = (kv_end + BN - 1) / BN;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int warp = (tid >> 5) & 3;  // warp within the warpgroup: accumulator rows 16*warp..
  const int lane = tid & 31;
  const int gid = lane >> 2;
  const int tig = lane & 3;

  const int* bt = block_table + static_cast<i64>(seq) * bt_stride;
  // Cache strides fit 32 bits (checked by the caller): 32x32->64-bit multiplies only.
  const int sb = static_cast<int>(kv_stride_b);
  const int st = static_cast<int>(kv_stride_t);

  // ---- Q tile (zero rows past the sequence), its own cp.async group.
  for (int idx = tid; idx < BM * CHUNKS; idx += NTHREADS) {
    const int r = idx / CHUNKS;
    const int c = idx % CHUNKS;
    const int row = row0 + r;
    const elem_t* src = q;
    if (row < nrows) {
      src += static_cast<i64>(q_start + row / G) * q_stride_t +
             static_cast<i64>(kvh * G + row % G) * q_stride_h + c * 8;
    }
    cp_async16(q_s + tile_off(BM, r, c), src, row < nrows ? 16 : 0);
  }
  cp_async_commit();

  // Each thread copies chunk (tid % 16) of rows tid/16 + 16*i of the K and V tiles: the
  // same swizzle for all i, so the shared address is one base plus i * 2048. Rows past the
  // causal bound (or unmapped) are zero-filled without branches.
  const int ld_c = tid % CHUNKS;
  const int ld_r0 = tid / CHUNKS;
  const u32 ld_soff = tile_off(BN, ld_r0, ld_c);
  const i64 ld_goff = static_cast<i64>(kvh) * kv_stride_h + ld_c * 8;
  auto load_tile = [&](int it, int stage) {
    const u32 ks = kv_s + stage * STAGE_BYTES + ld_soff;
#pragma unroll
    for (int i = 0; i < BN / ROWS_PER_PASS; ++i) {
      const int j = it * BN + ld_r0 + i * ROWS_PER_PASS;
      const int jc = min(j, kv_end - 1);
      const int blk = bt[jc >> block_shift];
      const bool ok = j < kv_end && blk >= 0;
      const i64 off = static_cast<i64>(blk) * sb + ((jc & (block_size - 1)) * st) + ld_goff;
      cp_async16(ks + i * ROWS_PER_PASS * 128, ok ? k_cache + off : k_cache, ok ? 16 : 0);
      cp_async16(ks + KV_TILE_BYTES + i * ROWS_PER_PASS * 128, ok ? v_cache + off : v_cache,
                 ok ? 16 : 0);
    }
  };

  // My two accumulator rows (gid, gid + 8 of my warp's 16) and their causal limits.
  const int wg_row0 = row0 + wg * 64;
  int lim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = wg_row0 + warp * 16 + gid + h * 8;
    lim[h] = row < nrows ? prefix + row / G : -1;
  }
  // Last tile with a key visible to this warpgroup (-1: all its rows are padding).
  const bool wg_active = wg_row0 < nrows;
  const int wg_last_key = wg_active ? prefix + (min(wg_row0 + 64, nrows) - 1) / G : -1;
  const int wg_last_tile = wg_active ? wg_last_key / BN : -1;
  const int wg_min_lim = prefix + wg_row0 / G;
  const bool wg_has_pad = wg_row0 + 64 > nrows;

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m[2] = {NEG_INF, NEG_INF};
  float l[2] = {0.f, 0.f};
  float s[64];
  u32 pa[BN / 16][4];

  const u32 q_wg = q_s + wg * 64 * 128;  // this warpgroup's 64 rows in each Q half

  // S = Q K^T: 8 k-steps of 16; within a 128-byte swizzled row a k-step is +32 bytes.
  auto issue_s = [&](u32 ks) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const u32 koff = (kk & 3) << 5;
      const u64 da = make_desc(q_wg + (kk >> 2) * (BM * 128) + koff, 16, 1024);
      const u64 db = make_desc(ks + (kk >> 2) * (BN * 128) + koff, 16, 1024);
      wgmma_ss(s, da, db, kk > 0);
    }
  };
  // O += P V: P from registers (the S accumulator layout is the A fragment layout), V an
  // N-major B: 64-column halves BN*128 bytes apart (LBO), 8-row groups 1024 apart (SBO).
  auto issue_pv = [&](u32 vs) {
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      wgmma_rs(o, pa[kt], make_desc(vs + kt * 16 * 128, BN * 128, 1024));
    }
  };
  auto fence_pa = [&]() {
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt)
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(pa[kt][e])::"memory");
  };
  // Mask, online softmax (log2 domain) on s; the O rescale factor goes to alpha. The mask
  // is compiled in only for tiles that reach past a row's causal bound (or padding rows):
  // a uniform branch between two inlined copies (constant `masked`), so unmasked tiles
  // skip ~150 instructions. (A generic lambda would be neater; NVRTC 13.0 rejects it.)
  auto softmax_impl = [&](const bool masked, int tile_start, float(&alpha)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = NEG_INF;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (masked) {
            const int j = tile_start + n * 8 + tig * 2 + e;
            if (j > lim[h]) s[n * 4 + h * 2 + e] = NEG_INF;
          }
          mx = fmaxf(mx, s[n * 4 + h * 2 + e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float m_new = fmaxf(m[h], mx * scale_log2);
      const float m_use = m_new == NEG_INF ? 0.f : m_new;  // nothing visible yet: no NaN
      alpha[h] = exp2f(m[h] - m_use);
      m[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(fmaf(s[n * 4 + h * 2 + e], scale_log2, -m_use));
          s[n * 4 + h * 2 + e] = p;
          sum += p;
        }
      }
      l[h] = l[h] * alpha[h] + sum;
    }
  };
  auto softmax = [&](int tile_start, float(&alpha)[2]) {
    if (wg_has_pad || tile_start + BN - 1 > wg_min_lim) {
      softmax_impl(true, tile_start, alpha);
    } else {
      softmax_impl(false, tile_start, alpha);
    }
  };
  auto rescale_and_pack = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n * 4 + 0] *= alpha[0];
      o[n * 4 + 1] *= alpha[0];
      o[n * 4 + 2] *= alpha[1];
      o[n * 4 + 3] *= alpha[1];
    }
#pragma unroll
    for (int kt = 0; kt < BN / 16; ++kt) {
      pa[kt][0] = pack2(s[(2 * kt) * 4 + 0], s[(2 * kt) * 4 + 1]);
      pa[kt][1] = pack2(s[(2 * kt) * 4 + 2], s[(2 * kt) * 4 + 3]);
      pa[kt][2] = pack2(s[(2 * kt + 1) * 4 + 0], s[(2 * kt + 1) * 4 + 1]);
      pa[kt][3] = pack2(s[(2 * kt + 1) * 4 + 2], s[(2 * kt + 1) * 4 + 3]);
    }
  };

#pragma unroll
  for (int st_i = 0; st_i < STAGES - 1; ++st_i) {
    if (st_i < ntiles) load_tile(st_i, st_i);
    cp_async_commit();  // always commit: uniform group count for wait_group
  }
  for (int it = 0; it < ntiles; ++it) {
    const int nxt = it + STAGES - 1;
    if (nxt < ntiles) load_tile(nxt, nxt % STAGES);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();  // Q and tile `it` have landed (this thread's copies)
    fence_proxy_async();
    __syncthreads();
    if (it <= wg_last_tile) {
      const u32 ks = kv_s + (it % STAGES) * STAGE_BYTES;
      wgmma_fence();
      issue_s(ks);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      float alpha[2];
      softmax(it * BN, alpha);
      rescale_and_pack(alpha);
      fence_regs(o);
      wgmma_fence();
      issue_pv(ks + KV_TILE_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      fence_pa();
    }
    __syncthreads();  // the stage is refilled STAGES-1 iterations later
  }
  cp_async_wait<0>();

  // ---- normalise, stage bf16/fp16 rows in this warpgroup's Q rows (no longer read),
  // then 16-byte coalesced stores.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lsum = l[h];
    lsum += __shfl_xor_sync(0xffffffff, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffff, lsum, 2);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const int r = wg * 64 + warp * 16 + gid + h * 8;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const u32 v = pack2(o[n * 4 + h * 2] * inv, o[n * 4 + h * 2 + 1] * inv);
      *reinterpret_cast<u32*>(q_ptr + tile_off(BM, r, n) + tig * 4) = v;
    }
  }
  asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1) : "memory");  // this warpgroup only
  const int wtid = tid & 127;
#pragma unroll
  for (int i = 0; i < 64 * CHUNKS / 128; ++i) {
    const int idx = wtid + i * 128;
    const int r = wg * 64 + idx / CHUNKS;
    const int c = idx % CHUNKS;
    const int row = row0 + r;
    if (row >= nrows) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(q_ptr + tile_off(BM, r, c));
    elem_t* dst = out + static_cast<i64>(q_start + row / G) * out_stride_t +
                  static_cast<i64>(kvh * G + row % G) * out_stride_h + c * 8;
    *reinterpret_cast<uint4*>(dst) = v;
  }
}
