// Paged (chunked) prefill for Hopper (sm_90a), warp-specialised (FlashAttention-3 style).
// Same inputs and semantics as paged_prefill_sm90.cu (causal, bottom-right aligned: new token
// i of a sequence with L tokens sees keys 0..L-qlen+i; packed query rows r = new token r / GQA,
// query head kv_head*GQA + r % GQA, so GQA heads share every K/V load), head_dim 128.
//
// 384 threads = 3 warpgroups:
//   WG0 producer (setmaxnreg.dec to PRODUCER_REGS): warp 0 gathers K and V tiles (BN = 128
//       tokens) through the block table with TMA (cp.async.bulk.tensor, 4-D tensor map over
//       the cache, [block][kv head][token][dim] for HND, [block][token][kv head][dim] for
//       NHD, 128B swizzle) into STAGES-deep rings, one
//       mbarrier pair (full / empty) per stage, K and V in separate rings so K(j+1) can land
//       while V(j) is still being read; warps 1-3 load the Q tile (cp.async, zero-filled past
//       the sequence) into one of QBUF buffers and signal it with an mbarrier.
//   WG1, WG2 consumers (setmaxnreg.inc to CONSUMER_REGS), 64 query rows each:
//       S(j) = Q K(j)^T (wgmma m64n128k16, both operands from shared memory) is issued
//       before O += P(j-1) V(j-1) (wgmma, P from registers), and the softmax of S(j) runs
//       while the P V product is in the tensor pipe (intra-warpgroup overlap); the two
//       consumers take turns issuing their GEMMs (named barriers 1 and 2, ping-pong), so
//       one's softmax runs under the other's GEMMs. An item's last P V product is issued
//       with the next item's first S product (and that item's first softmax runs under it)
//       before the epilogue, so item boundaries do not drain the tensor pipe.
// Work items (sequence, kv head, 128-row query tile) are walked by a persistent grid
// (item = blockIdx.x + k * gridDim.x; with gridDim.x = #items every CTA takes one item):
// query tiles of one (sequence, kv head) are adjacent, last (heaviest) tile first, so the
// CTAs in flight share K/V in L2. The producer runs ahead into the next item (Q double
// buffered) while the consumers finish the current one.
// Tokens past the context in the last tile: their K rows are masked (-inf scores); their V
// rows (cache garbage from the block's unwritten slots, or stale tiles) are zeroed in shared
// memory by the consumers before the last P V product, so NaN/Inf garbage cannot leak.
// Output: straight from the accumulator registers (4-byte stores; quads fill 16 bytes).
//
// Compile-time configuration (-D): KV_BF16 (1: bf16, 0: fp16), GQA, STAGES (K ring, 2 or 3),
// VSTAGES (V ring, 2 or 3), QBUF (1 or 2: Q buffers). What made it fast (benches/RESULTS.md,
// "Prefill, warp-specialised Hopper kernel"): a warp-uniform role branch (see wgi), wgmma
// descriptors as a word + constants (see desc_lo), a running max that moves only by > 8
// (see the softmax) and the cross-item overlap above. Slower variants measured and removed:
// tree reductions in the softmax, packed bf16x2 ex2, the O rescale under the next S product.

#include "sm90_wgmma.cuh"

constexpr int D = 128;
constexpr int G = GQA;
constexpr int BM = 128;  // packed query rows per work item (2 consumer warpgroups x 64)
constexpr int BN = 128;  // K/V tokens per tile
constexpr int NTHREADS = 384;
constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
constexpr int TILE_BYTES = 128 * D * 2;  // Q, K or V tile: [2 halves][128 rows][64] swizzled
constexpr int PRODUCER_REGS = 40;
constexpr int CONSUMER_REGS = 232;
constexpr int Q_LOADERS = 64;  // producer warps 2-3

#ifndef VSTAGES
#define VSTAGES STAGES
#endif
static_assert(STAGES >= 2 && STAGES <= 3 && VSTAGES >= 2 && VSTAGES <= 3, "2 or 3 stages");
static_assert(QBUF >= 1 && QBUF <= 2, "QBUF must be 1 or 2");
static_assert((QBUF + STAGES + VSTAGES) * TILE_BYTES + 1024 <= 227 * 1024, "shared memory");
static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 256 <= 65536, "register file");

// A CUtensorMap (opaque, 128 bytes, 64-byte aligned), passed by value as a grid constant.
struct alignas(64) TmaDesc {
  u64 w[16];
};

// ---- mbarriers
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@p bra.uni DONE;\n"
      "bra.uni LAB_WAIT;\n"
      "DONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaDesc* map, u32 bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Named barriers: 1, 2 = consumer ping-pong (256 threads: one warpgroup syncs, the other
// arrives); 3, 4 = one consumer warpgroup alone; 5 = the Q loaders.
__device__ __forceinline__ void named_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

// Byte offset of 16-byte chunk c (0..15) of row r in a [2][128][64] swizzled tile.
__device__ __forceinline__ u32 tile_off(int r, int c) {
  return static_cast<u32>((c >> 3) * 128 * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// The low word of a wgmma descriptor (start address >> 4, leading byte offset >> 4 at bit 16)
// and its constant high word (stride byte offset 1024, 128B swizzle): the start address field
// holds any shared address (< 256 KiB) >> 4 without carry, so the descriptor of a sub-tile is
// the tile's low word + (offset >> 4): one add per wgmma instead of rebuilding all 64 bits.
__device__ __forceinline__ u32 desc_lo(u32 addr, u32 lbo) {
  return ((addr & 0x3FFFFu) >> 4) | ((lbo >> 4) << 16);
}
constexpr u32 DESC_HI = (1024u >> 4) | (1u << 30);
__device__ __forceinline__ u64 desc64(u32 lo) {
  return (static_cast<u64>(DESC_HI) << 32) | lo;
}

// One work item: what both roles derive from its index (identically, so they agree on
// which items are empty and how many tiles each has).
struct Item {
  int seq, kvh, row0, nrows, q_start, prefix, kv_end, ntiles, w;
};

__device__ __forceinline__ bool decode_item(int w, int n_qtiles, int kv_heads,
                                            const int* __restrict__ query_start_loc,
                                            const int* __restrict__ seq_lens, Item& it) {
  const int pair = w / n_qtiles;
  const int qtile = n_qtiles - 1 - (w - pair * n_qtiles);  // heaviest (last) query tile first
  it.seq = pair / kv_heads;
  it.kvh = pair - it.seq * kv_heads;
  it.q_start = query_start_loc[it.seq];
  const int qlen = query_start_loc[it.seq + 1] - it.q_start;
  it.nrows = qlen * G;
  it.row0 = qtile * BM;
  if (it.row0 >= it.nrows) return false;
  it.prefix = seq_lens[it.seq] - qlen;
  it.kv_end = it.prefix + (min(it.row0 + BM, it.nrows) - 1) / G + 1;
  it.ntiles = (it.kv_end + BN - 1) / BN;
  return true;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) paged_prefill_sm90_ws(
    const __grid_constant__ TmaDesc tm_k, const __grid_constant__ TmaDesc tm_v,
    const elem_t* __restrict__ q, i64 q_stride_t, i64 q_stride_h,
    const int* __restrict__ block_table, int bt_stride,  // rows of this launch's sequences
    const int* __restrict__ query_start_loc,  // [num_seqs + 1], absolute token indices
    const int* __restrict__ seq_lens,         // [num_seqs]
    elem_t* __restrict__ out, i64 out_stride_t, i64 out_stride_h, int block_shift,
    int box_shift,  // log2(rows per TMA box) = min(block_shift, 7)
    int nhd,  // tensor map dims: 0 (HND) [dim, token, head, block]; 1 (NHD) [dim, head, token, block]
    int n_qtiles, int kv_heads, int num_items, float scale_log2,
    int* __restrict__ sched) {  // null: static schedule; else {next item, CTAs done}, zeroed
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 bars[2 * STAGES + 2 * VSTAGES + 2 * QBUF];
  __shared__ Item items_s[QBUF];  // the item whose Q sits in each buffer (ntiles 0: the end)
  // wgmma's (and TMA's) 128B swizzle repeats every 1024 bytes: align the tiles to it.
  const u32 raw_u32 = smem_addr(smem_raw);
  const u32 q_s = (raw_u32 + 1023u) & ~1023u;
  const u32 k_s = q_s + QBUF * TILE_BYTES;
  const u32 v_s = k_s + STAGES * TILE_BYTES;  // V ring: VSTAGES tiles
  const u32 bar0 = smem_addr(bars);
  // bars: full_k[STAGES], empty_k[STAGES], full_v[VSTAGES], empty_v[VSTAGES], q_full[QBUF],
  // q_empty[QBUF]
  auto full_k = [&](int s) { return bar0 + 8u * s; };
  auto empty_k = [&](int s) { return bar0 + 8u * (STAGES + s); };
  auto full_v = [&](int s) { return bar0 + 8u * (2 * STAGES + s); };
  auto empty_v = [&](int s) { return bar0 + 8u * (2 * STAGES + VSTAGES + s); };
  auto q_full = [&](int b) { return bar0 + 8u * (2 * STAGES + 2 * VSTAGES + b); };
  auto q_empty = [&](int b) { return bar0 + 8u * (2 * STAGES + 2 * VSTAGES + QBUF + b); };

  const int tid = threadIdx.x;
  // The same value, but ptxas cannot see that tid >> 7 is warp-uniform: the role branch
  // counts as divergent and everything under it runs on the vector datapath (descriptors
  // rebuilt per wgmma and moved by R2UR, shuffles behind BRA.DIV checks). Lane 0's value,
  // broadcast, is uniform by construction (CUTLASS's canonical_warp_group_idx).
  const int wgi = __shfl_sync(0xffffffffu, tid >> 7, 0);  // 0 producer, 1-2 consumers
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full_k(s), 1);   // the producer's arrive.expect_tx (+ TMA bytes)
      mbar_init(empty_k(s), 8);  // one arrive per consumer warp
    }
    for (int s = 0; s < VSTAGES; ++s) {
      mbar_init(full_v(s), 1);
      mbar_init(empty_v(s), 8);
    }
    for (int b = 0; b < QBUF; ++b) {
      mbar_init(q_full(b), Q_LOADERS);  // every Q-loading thread, after its copies landed
      mbar_init(q_empty(b), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wgi == 0) {
    // ===================================================================== producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (warp < 2) {
      // K (warp 0) and V (warp 1) gathers by TMA, each into its own ring, so neither waits
      // for the other's free stage. Lane i copies box i of a tile (box = min(block, 128)
      // tokens x 64 dims; the two 64-dim halves land BN*128 bytes apart).
      const bool is_v = warp == 1;
      const TmaDesc* map = is_v ? &tm_v : &tm_k;
      const int nst = is_v ? VSTAGES : STAGES;
      const u32 ring = is_v ? v_s : k_s;
      const u32 full0 = is_v ? full_v(0) : full_k(0);
      const u32 empty0 = is_v ? empty_v(0) : empty_k(0);
      const int box_rows = 1 << box_shift;
      const int nbox = BN >> box_shift;
      const u32 box_bytes = static_cast<u32>(box_rows) * 128u;
      int st = 0, ph = 0;  // ring position of the next tile
      for (int nq = 0;; ++nq) {
        // The Q loaders publish each item with its Q tile; they run QBUF items ahead.
        mbar_wait(q_full(nq % QBUF), (nq / QBUF) & 1);
        const int ntiles = items_s[nq % QBUF].ntiles;
        if (ntiles == 0) break;
        const int seq = items_s[nq % QBUF].seq;
        const int kvh = items_s[nq % QBUF].kvh;
        const int kv_end = items_s[nq % QBUF].kv_end;
        const int* bt = block_table + static_cast<i64>(seq) * bt_stride;
        for (int j = 0; j < ntiles; ++j) {
          const int t0 = j * BN;
          const int nb = min(nbox, (kv_end - t0 + box_rows - 1) >> box_shift);
          const int tok = t0 + (lane << box_shift);
          int blk = 0;
          if (lane < nb) blk = bt[tok >> block_shift];
          const int off = tok & ((1 << block_shift) - 1);
          mbar_wait(empty0 + 8u * st, ph ^ 1);
          const u32 full = full0 + 8u * st;
          if (lane == 0) mbar_arrive_expect_tx(full, static_cast<u32>(nb) * box_bytes * 2u);
          __syncwarp();
          if (lane < nb) {
            const u32 d = ring + st * TILE_BYTES + static_cast<u32>(lane) * box_bytes;
            const int c1 = nhd ? kvh : off;
            const int c2 = nhd ? off : kvh;
            tma_load_4d(d, map, full, 0, c1, c2, blk);
            tma_load_4d(d + BN * 128, map, full, 64, c1, c2, blk);
          }
          if (++st == nst) {
            st = 0;
            ph ^= 1;
          }
        }
      }
    } else {
      // Work items and Q tiles, 64 threads. Thread 0 of them takes the next item (atomic
      // counter, or the static stride) and publishes it in items_s with the Q tile (rows
      // past the sequence zero-filled), signalled by q_full; an item with ntiles 0 ends.
      const int qt = tid - 64;
      int k = 0;
      for (int nq = 0;; ++nq) {
        const int b = nq % QBUF;
        mbar_wait(q_empty(b), ((nq / QBUF) & 1) ^ 1);
        if (qt == 0) {
          Item nx;
          nx.ntiles = 0;
          nx.w = -1;
          for (;;) {
            const int w = sched ? atomicAdd(sched, 1) : static_cast<int>(blockIdx.x) + k * gridDim.x;
            ++k;
            if (w >= num_items) break;
            if (decode_item(w, n_qtiles, kv_heads, query_start_loc, seq_lens, nx)) {
              nx.w = w;
              break;
            }
          }
          items_s[b] = nx;
        }
        named_sync(5, Q_LOADERS);
        const Item it = items_s[b];
        if (it.ntiles != 0) {
          const u32 qb = q_s + b * TILE_BYTES;
          for (int idx = qt; idx < BM * CHUNKS; idx += Q_LOADERS) {
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const int row = it.row0 + r;
            const elem_t* src = q;
            if (row < it.nrows) {
              src += static_cast<i64>(it.q_start + row / G) * q_stride_t +
                     static_cast<i64>(it.kvh * G + row % G) * q_stride_h + c * 8;
            }
            cp_async16(qb + tile_off(r, c), src, row < it.nrows ? 16 : 0);
          }
          asm volatile("cp.async.commit_group;\n" ::);
          asm volatile("cp.async.wait_group 0;\n" ::: "memory");
          fence_proxy_async();  // the consumers read Q through wgmma (async proxy)
        }
        mbar_arrive(q_full(b));
        if (it.ntiles == 0) break;
      }
      if (qt == 0 && sched) {
        // The last CTA out re-arms the counter for the next launch (same stream: in order).
        __threadfence();
        if (atomicAdd(sched + 1, 1) == static_cast<int>(gridDim.x) - 1) {
          atomicExch(sched, 0);
          atomicExch(sched + 1, 0);
        }
      }
    }
  } else {
    // ===================================================================== consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
    const int cw = wgi - 1;  // consumer warpgroup 0 / 1: rows cw*64..
    const int gid = lane >> 2;
    const int tig = lane & 3;
    const int my_bar = 1 + cw, other_bar = 2 - cw;
    // Ping-pong: consumer 0 issues first; after its GEMMs it lets consumer 1 go, and so on.
    if (cw == 1) named_arrive(1, 256);
    auto sched_sync = [&]() { named_sync(my_bar, 256); };
    auto sched_arrive = [&]() { named_arrive(other_bar, 256); };
    auto release = [&](u32 bar) {
      if (lane == 0) mbar_arrive(bar);
    };

    int g = 0;  // tiles consumed so far (ring positions)
    // The current item and what the softmax and the GEMM issue derive from it (reassigned
    // when the next item is taken: while this item's last P V is in flight).
    int nq = 0;  // items taken so far (Q buffer positions)
    int qb = 0;
    Item it;
    u32 q_wg = 0;
    int lim[2];
    int wg_min_lim = 0;
    bool wg_has_pad = false;
    u32 dq = 0;
    float o[64];
    float m[2], l[2];
    float s[64];
    u32 pa[BN / 16][4];
    // Waits for item nq's Q tile and sets the item state; false at the end.
    auto take_item = [&]() -> bool {
      qb = nq % QBUF;
      mbar_wait(q_full(qb), (nq / QBUF) & 1);
      it = items_s[qb];  // published by the Q loaders with the Q tile
      if (it.ntiles == 0) return false;
      q_wg = q_s + qb * TILE_BYTES + cw * 64 * 128;  // my 64 rows in each half
      const int wg_row0 = it.row0 + cw * 64;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wg_row0 + warp * 16 + gid + h * 8;
        lim[h] = row < it.nrows ? it.prefix + row / G : -1;
      }
      wg_min_lim = it.prefix + wg_row0 / G;
      wg_has_pad = wg_row0 + 64 > it.nrows;
      dq = desc_lo(q_wg, 16);
      m[0] = m[1] = NEG_INF;
      l[0] = l[1] = 0.f;
      return true;
    };
    auto zero_o = [&]() {
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] = 0.f;
    };

    auto issue_s = [&](u32 ks) {
      const u32 dk = desc_lo(ks, 16);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const u32 koff = (kk & 3) << 5;
        const u64 da = desc64(dq + (((kk >> 2) * (BM * 128) + koff) >> 4));
        const u64 db = desc64(dk + (((kk >> 2) * (BN * 128) + koff) >> 4));
        wgmma_ss(s, da, db, kk > 0);
      }
    };
    // P from registers (the S accumulator layout is the A fragment layout), V an N-major
    // B: 64-column halves BN*128 bytes apart (LBO), 8-row groups 1024 apart (SBO).
    auto issue_pv = [&](u32 vs) {
      const u32 dv = desc_lo(vs, BN * 128);
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        wgmma_rs(o, pa[kt], desc64(dv + ((kt * 16 * 128) >> 4)));
      }
    };
    auto fence_pa = [&]() {
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(pa[kt][e])::"memory");
    };
    // One row after the other, one running max / sum each.
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
        // FlashAttention-4's conditional rescale: the max used for P moves only when the
        // row's max exceeds it by more than 8 (log2 units), so P <= 2^8 (bf16 / fp16 keep
        // their relative precision there; sums in fp32); else alpha is 1 and O needs no
        // rescale (most tiles). m[h] = -inf (nothing seen yet): +inf > 8 moves it; both
        // -inf: NaN > 8 is false, m stays -inf.
        const float m_cand = fmaxf(m[h], mx * scale_log2);
        const float m_new = m_cand - m[h] > 8.f ? m_cand : m[h];
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
    // The mask is compiled in only for tiles reaching past a row's causal bound (or with
    // padding rows): a uniform branch between two inlined copies.
    auto softmax = [&](int tile_start, float(&alpha)[2]) {
      if (wg_has_pad || tile_start + BN - 1 > wg_min_lim) {
        softmax_impl(true, tile_start, alpha);
      } else {
        softmax_impl(false, tile_start, alpha);
      }
    };
    auto rescale_o = [&](const float(&alpha)[2]) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n * 4 + 0] *= alpha[0];
        o[n * 4 + 1] *= alpha[0];
        o[n * 4 + 2] *= alpha[1];
        o[n * 4 + 3] *= alpha[1];
      }
    };
    // P of the last softmax into the P V operand (only once the previous P V has completed).
    auto pack_p = [&]() {
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        pa[kt][0] = pack2(s[(2 * kt) * 4 + 0], s[(2 * kt) * 4 + 1]);
        pa[kt][1] = pack2(s[(2 * kt) * 4 + 2], s[(2 * kt) * 4 + 3]);
        pa[kt][2] = pack2(s[(2 * kt + 1) * 4 + 0], s[(2 * kt + 1) * 4 + 1]);
        pa[kt][3] = pack2(s[(2 * kt + 1) * 4 + 2], s[(2 * kt + 1) * 4 + 3]);
      }
    };
    auto rescale_and_pack = [&](const float(&alpha)[2]) {
      // alpha is exactly 1 unless the max moved: skip the 64 multiplies (warp-uniform).
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) rescale_o(alpha);
      pack_p();
    };
    // Normalise and store straight from the accumulator registers (item e, row sums lsum).
    auto epilogue = [&](const Item& e, const float(&lrow)[2]) {
      const int e_row0 = e.row0 + cw * 64;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float lsum = lrow[h];
        lsum += __shfl_xor_sync(0xffffffff, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffff, lsum, 2);
        const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
        const int row = e_row0 + warp * 16 + gid + h * 8;
        if (row < e.nrows) {
          elem_t* dst = out + static_cast<i64>(e.q_start + row / G) * out_stride_t +
                        static_cast<i64>(e.kvh * G + row % G) * out_stride_h + tig * 2;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            *reinterpret_cast<u32*>(dst + n * 8) =
                pack2(o[n * 4 + h * 2] * inv, o[n * 4 + h * 2 + 1] * inv);
          }
        }
      }
    };

    bool more = take_item();
    bool s0_done = false;  // the item's first S product and softmax already ran
    while (more) {
      if (!s0_done) {
        // ---- tile 0: S only
        zero_o();
        const int st = g % STAGES;
        mbar_wait(full_k(st), (g / STAGES) & 1);
        sched_sync();
        wgmma_fence();
        issue_s(k_s + st * TILE_BYTES);
        wgmma_commit();
        sched_arrive();
        wgmma_wait<0>();
        fence_regs(s);
        release(empty_k(st));
        float alpha[2];
        softmax(0, alpha);
        rescale_and_pack(alpha);
      }
      // ---- tiles 1..n-1: S(j) and P(j-1) V(j-1) in flight together
      for (int j = 1; j < it.ntiles; ++j) {
        const int st = (g + j) % STAGES;
        const int sp = (g + j - 1) % VSTAGES;
        mbar_wait(full_k(st), ((g + j) / STAGES) & 1);
        mbar_wait(full_v(sp), ((g + j - 1) / VSTAGES) & 1);
        sched_sync();
        fence_regs(o);
        wgmma_fence();
        issue_s(k_s + st * TILE_BYTES);
        wgmma_commit();
        issue_pv(v_s + sp * TILE_BYTES);
        wgmma_commit();
        sched_arrive();
        wgmma_wait<1>();
        fence_regs(s);
        release(empty_k(st));
        float alpha[2];
        softmax(j * BN, alpha);
        wgmma_wait<0>();
        fence_regs(o);
        fence_pa();
        release(empty_v(sp));
        rescale_and_pack(alpha);
      }
      release(q_empty(qb));  // every S product of this item has completed
      // ---- last P V (with the next item's first S product)
      const Item cur = it;
      const float l_cur[2] = {l[0], l[1]};
      const int jl = cur.ntiles - 1;
      const int sp = (g + jl) % VSTAGES;
      const u32 vs = v_s + sp * TILE_BYTES;
      mbar_wait(full_v(sp), ((g + jl) / VSTAGES) & 1);
      const int valid = cur.kv_end - jl * BN;
      if (valid < BN) {
        // Rows past the context: zero them (garbage times p = 0 could still be NaN).
        const int wt = tid & 127;
        const uint4 z = make_uint4(0u, 0u, 0u, 0u);
        for (int idx = valid * 16 + wt; idx < BN * 16; idx += 128) {
          const int r = idx >> 4;
          const int c = idx & 15;
          *reinterpret_cast<uint4*>(smem_raw + (vs - raw_u32) + tile_off(r, c)) = z;
        }
        fence_proxy_async();
        named_sync(3 + cw, 128);
      }
      g += cur.ntiles;
      ++nq;
      // The next item's Q is normally in its buffer already (the Q loaders run QBUF items
      // ahead): its first S product goes into the tensor pipe with this item's last P V,
      // and its softmax runs under that P V, instead of both items' ends and starts
      // running one after the other (both consumer warpgroups reach them together).
      more = take_item();
      s0_done = more;
      if (more) {
        const int st = g % STAGES;
        mbar_wait(full_k(st), (g / STAGES) & 1);
        sched_sync();
        fence_regs(o);
        wgmma_fence();
        issue_s(k_s + st * TILE_BYTES);
        wgmma_commit();
        issue_pv(vs);
        wgmma_commit();
        sched_arrive();
        wgmma_wait<1>();
        fence_regs(s);
        release(empty_k(st));
        float alpha[2];
        softmax(0, alpha);  // the next item's tile 0 (O is rezeroed below: alpha unused)
        wgmma_wait<0>();
        fence_regs(o);
        fence_pa();
        release(empty_v(sp));
        epilogue(cur, l_cur);
        zero_o();
        pack_p();
        continue;
      }
      sched_sync();
      fence_regs(o);
      wgmma_fence();
      issue_pv(vs);
      wgmma_commit();
      sched_arrive();
      wgmma_wait<0>();
      fence_regs(o);
      fence_pa();
      release(empty_v(sp));
      epilogue(cur, l_cur);
    }
  }
}
