// Native CPU kernels called through the XLA FFI (kernels/native/__init__.py builds and registers them).
//
// pmem_bag_fwd     out[s]     = sum_j w[s, j] * table[idx[s, j]]            (ids outside [0, V) skipped; summed in
//                  (block of table rows, j) order)
// pmem_bag_wgrad   dw[s, j]   = <g[s], table[idx[s, j]]>       (0 for ids outside [0, V); by block of table rows)
// pmem_bag_grads   dtable[v]  = sum over (s, j) with idx[s, j] = v, in row-major (s, j) order, of w[s, j] * g[s],
//                  and dw as pmem_bag_wgrad, in one pass over blocks of table rows
// pmem_bag_rows    the table gradient of a bag as compact rows (sorted distinct ids and their summed w * g)
// pmem_row_scatter ds[r, i[r, j]] += v[r, j] into zeros [R, n]        (the backward of a take along rows)
// pmem_topk_pairs  the k best slots i*n + j of s1[i] + s2[j] (see kernels/product_topk/ops.py)
// pmem_attn_fwd    causal (segment, window) GQA attention: o and the rows' logsumexp (FlashAttention-2)
// pmem_attn_bwd    its dq, dk, dv from q, k, v, o, lse and do
// pmem_row_adam    lazy Adam of the rows ids of table, mu, nu [R, D] in place (pmem/train/sparse.py row_step's
//                  adam branch fused with the row gather and scatter), and each new row's sum of squares
//
// Float32 throughout. Built with -ffp-contract=off: the dense and compact gradients add the products w * g one
// by one in the order XLA's scatter does, so they equal kernels/embedding/xla.py bit for bit; the row Adam fuses
// multiply-adds only where it says so (std::fma). Work is split over the
// thread pool XLA hands to FFI calls; the calling thread takes chunks too, so no call waits on an idle pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// f(begin, end) over [0, n) split into `chunks` ranges, taken by the calling thread and the pool's threads.
template <class F>
void ParallelChunks(ffi::ThreadPool& pool, int64_t n, int64_t chunks, const F& f) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  chunks = std::max<int64_t>(1, std::min(chunks, n));
  if (chunks <= 1 || threads <= 1) {
    f(int64_t{0}, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, chunks, n, &f] {  // a task starting after every chunk is taken touches nothing else
    for (int64_t c; (c = st->next.fetch_add(1)) < chunks;) {
      f(n * c / chunks, n * (c + 1) / chunks);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// The same in chunks of at least `grain` items, at most 4 per thread.
template <class F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const F& f) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  ParallelChunks(pool, n, std::min<int64_t>(n / std::max<int64_t>(1, grain), 4 * threads), f);
}

ffi::Error CheckBag(int64_t v, int64_t d, int64_t s, int64_t k, int64_t ws, int64_t wk) {
  if (ws != s || wk != k) return ffi::Error::InvalidArgument("pmem bag: ids and weights differ in shape");
  if (v < 0 || d <= 0) return ffi::Error::InvalidArgument("pmem bag: empty table width");
  if (s * k >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("pmem bag: more than 2^31 entries");
  return ffi::Error::Success();
}

// <a, b> over d floats with 16 independent partial sums (vectorizes without reassociating one chain).
inline float Dot(const float* a, const float* b, int64_t d) {
  float acc[16] = {0};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[c + l] * b[c + l];
  for (; c < d; ++c) acc[c & 15] += a[c] * b[c];
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += acc[l];
  return total;
}

// The entries (id, s, w, p = s * k + j) of a bag grouped by block of table rows (a counting sort, p
// ascending within a block): a block's entries touch one small slab of the table and of its gradient,
// and are read in sequence rather than gathered from idx and w.
struct Entry {
  int32_t id, s;
  float w;
  int32_t p;
};

struct Buckets {
  int64_t rows_per_block, blocks;
  std::vector<int64_t> start;  // [blocks + 1]
  std::vector<Entry> entries;  // those with an id in [0, V), grouped
};

inline int64_t RowsPerBlock(int64_t d) { return std::max<int64_t>(1, (256 << 10) / (4 * d)); }  // 256 KiB

// The entries of outputs [s0, s1) (idx, w: all S outputs'; w may be null) grouped by block of table rows,
// counted and placed in `parts` ranges of outputs on the pool's threads (parts = 1: on the calling thread
// alone); a block's entries stay in p order.
Buckets ByRowBlock(ffi::ThreadPool& pool, const int32_t* idx, const float* w, int64_t s0, int64_t s1, int64_t k,
                   int64_t v, int64_t d, int64_t parts) {
  Buckets b;
  b.rows_per_block = RowsPerBlock(d);
  b.blocks = (v + b.rows_per_block - 1) / b.rows_per_block;
  parts = std::max<int64_t>(1, parts);
  const int32_t rpb = static_cast<int32_t>(b.rows_per_block);
  std::vector<std::vector<int64_t>> count(parts, std::vector<int64_t>(b.blocks + 1, 0));
  auto range = [&](int64_t t) {
    return std::pair<int64_t, int64_t>{(s0 + (s1 - s0) * t / parts) * k, (s0 + (s1 - s0) * (t + 1) / parts) * k};
  };
  ParallelChunks(pool, parts, parts, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      auto [p0, p1] = range(t);
      for (int64_t p = p0; p < p1; ++p)
        if (static_cast<uint64_t>(idx[p]) < static_cast<uint64_t>(v)) ++count[t][idx[p] / rpb];
    }
  });
  b.start.assign(b.blocks + 1, 0);
  for (int64_t i = 0, at = 0; i < b.blocks; ++i) {  // part t's entries of block i follow parts < t's
    b.start[i] = at;
    for (int64_t t = 0; t < parts; ++t) {
      const int64_t c = count[t][i];
      count[t][i] = at;
      at += c;
    }
    b.start[i + 1] = at;
  }
  b.entries.resize(b.start[b.blocks]);
  ParallelChunks(pool, parts, parts, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      auto [p0, p1] = range(t);
      for (int64_t p = p0; p < p1; ++p)
        if (static_cast<uint64_t>(idx[p]) < static_cast<uint64_t>(v))
          b.entries[count[t][idx[p] / rpb]++] =
              Entry{idx[p], static_cast<int32_t>(p / k), w ? w[p] : 0.0f, static_cast<int32_t>(p)};
    }
  });
  return b;
}

// Ranges of outputs for bucketing on every thread (at least 64 outputs each).
inline int64_t Parts(ffi::ThreadPool& pool, int64_t s) { return std::min<int64_t>(pool.num_threads(), s / 64); }

// dw[s, j] = <g[s], table[idx[s, j]]> visited by block of table rows (each block's rows stay in cache; 0 for ids
// outside [0, V)). Every dot is the same whatever the order, so the result equals a visit in (s, j) order.
ffi::Error BagWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t v = table.dimensions()[0], d = table.dimensions()[1];
  const int64_t s = idx.dimensions()[0], k = idx.dimensions()[1];
  if (g.dimensions()[0] != s || g.dimensions()[1] != d)
    return ffi::Error::InvalidArgument("pmem bag wgrad: cotangent shape differs from [S, D]");
  const float* tb = table.typed_data();
  const float* gb = g.typed_data();
  float* ob = dw->typed_data();
  std::fill(ob, ob + s * k, 0.0f);
  const Buckets bk = ByRowBlock(pool, idx.typed_data(), nullptr, 0, s, k, v, d, Parts(pool, s));
  const Entry* en = bk.entries.data();
  ParallelFor(pool, bk.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t e = bk.start[b0], e1 = bk.start[b1]; e < e1; ++e) {
      if (e + 4 < e1)
        for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(gb + static_cast<int64_t>(en[e + 4].s) * d + c);
      ob[en[e].p] = Dot(gb + static_cast<int64_t>(en[e].s) * d, tb + static_cast<int64_t>(en[e].id) * d, d);
    }
  });
  return ffi::Error::Success();
}

ffi::Error BagFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx,
                  ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t v = table.dimensions()[0], d = table.dimensions()[1];
  const int64_t s = idx.dimensions()[0], k = idx.dimensions()[1];
  if (auto e = CheckBag(v, d, s, k, w.dimensions()[0], w.dimensions()[1]); e.failure()) return e;
  const float* tb = table.typed_data();
  const int32_t* ib = idx.typed_data();
  const float* wb = w.typed_data();
  float* ob = out->typed_data();
  // One range of outputs per thread, its entries visited by block of table rows: the table is swept in
  // ascending order and a block's rows are reused from cache (2.3x over visiting them in (s, j) order
  // at V = 2^16, S = 4096, k = 128). Each output sums its rows in (block, j) order whatever the split.
  ParallelChunks(pool, s, Parts(pool, s), [&](int64_t b, int64_t e) {
    std::fill(ob + b * d, ob + e * d, 0.0f);
    const Buckets bk = ByRowBlock(pool, ib, wb, b, e, k, v, d, 1);
    const Entry* en = bk.entries.data();
    const int64_t m = static_cast<int64_t>(bk.entries.size());
    for (int64_t x = 0; x < m; ++x) {
      if (x + 4 < m)
        for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(tb + static_cast<int64_t>(en[x + 4].id) * d + c);
      const float* row = tb + static_cast<int64_t>(en[x].id) * d;
      float* o = ob + static_cast<int64_t>(en[x].s) * d;
      const float wj = en[x].w;
      for (int64_t c = 0; c < d; ++c) o[c] += wj * row[c];
    }
  });
  return ffi::Error::Success();
}

// Both gradients of the bag in one pass over the row blocks: per entry (in (s, j) order within its
// block) dw = <g[s], table[id]> and dtable[id] += w * g[s]. A block is one thread's, so every row sums
// in the order of one sequential scatter; entries with ids outside [0, V) get dw = 0.
ffi::Error BagGrads(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx,
                    ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dtable,
                    ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t v = table.dimensions()[0], d = table.dimensions()[1];
  const int64_t s = idx.dimensions()[0], k = idx.dimensions()[1];
  if (auto e = CheckBag(v, d, s, k, w.dimensions()[0], w.dimensions()[1]); e.failure()) return e;
  if (g.dimensions()[0] != s || g.dimensions()[1] != d)
    return ffi::Error::InvalidArgument("pmem bag grads: cotangent shape differs from [S, D]");
  const float* tb = table.typed_data();
  const float* gb = g.typed_data();
  float* db = dtable->typed_data();
  float* ob = dw->typed_data();
  std::fill(ob, ob + s * k, 0.0f);
  const Buckets bk = ByRowBlock(pool, idx.typed_data(), w.typed_data(), 0, s, k, v, d, Parts(pool, s));
  const Entry* en = bk.entries.data();
  std::vector<float> dots(bk.entries.size());  // in bucket order, written to dw after the pass
  ParallelFor(pool, bk.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bk.rows_per_block, r1 = std::min(v, r0 + bk.rows_per_block);
      const int64_t e1 = bk.start[blk + 1];
      std::memset(db + r0 * d, 0, sizeof(float) * (r1 - r0) * d);
      for (int64_t e = bk.start[blk]; e < e1; ++e) {
        if (e + 4 < e1)
          for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(gb + static_cast<int64_t>(en[e + 4].s) * d + c);
        const float* gr = gb + static_cast<int64_t>(en[e].s) * d;
        float* row = db + static_cast<int64_t>(en[e].id) * d;
        dots[e] = Dot(gr, tb + static_cast<int64_t>(en[e].id) * d, d);
        const float we = en[e].w;
        for (int64_t c = 0; c < d; ++c) row[c] += we * gr[c];
      }
    }
  });
  ParallelFor(pool, static_cast<int64_t>(dots.size()), 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) ob[en[e].p] = dots[e];
  });
  return ffi::Error::Success();
}

// The table gradient of a bag as compact rows: ids [M] the distinct looked-up ids ascending, then V; rows [M, D]
// each id's sum of w[s, j] * g[s] in (s, j) order (as the XLA compaction's segment sum), then zeros; count the
// distinct ids. Blocks of table rows are independent: one pass counts each block's distinct ids (its slots
// follow the earlier blocks'), a second sums its entries into its slots.
ffi::Error BagRows(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                   int64_t v, ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> rows,
                   ffi::ResultBuffer<ffi::S32> count) {
  const int64_t s = idx.dimensions()[0], k = idx.dimensions()[1], d = g.dimensions()[1];
  const int64_t m = ids->dimensions()[0];
  if (auto e = CheckBag(v, d, s, k, w.dimensions()[0], w.dimensions()[1]); e.failure()) return e;
  if (g.dimensions()[0] != s || rows->dimensions()[0] != m || rows->dimensions()[1] != d || m < std::min(s * k, v))
    return ffi::Error::InvalidArgument("pmem bag rows: cotangent [S, D] or output [>= min(S k, V), D] shape differs");
  const float* gb = g.typed_data();
  int32_t* ib = ids->typed_data();
  float* rb = rows->typed_data();
  const Buckets bk = ByRowBlock(pool, idx.typed_data(), w.typed_data(), 0, s, k, v, d, Parts(pool, s));
  const Entry* en = bk.entries.data();
  const int64_t rpb = bk.rows_per_block;
  std::vector<int64_t> start(bk.blocks + 1, 0);  // first slot of each block
  ParallelFor(pool, bk.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> seen(rpb);
    for (int64_t blk = b0; blk < b1; ++blk) {
      std::fill(seen.begin(), seen.end(), 0);
      int64_t n = 0;
      for (int64_t e = bk.start[blk]; e < bk.start[blk + 1]; ++e) {
        const int64_t r = en[e].id - blk * rpb;
        n += !seen[r];
        seen[r] = 1;
      }
      start[blk + 1] = n;
    }
  });
  for (int64_t blk = 0; blk < bk.blocks; ++blk) start[blk + 1] += start[blk];
  ParallelFor(pool, bk.blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> slot(rpb);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rpb, e0 = bk.start[blk], e1 = bk.start[blk + 1];
      std::fill(slot.begin(), slot.end(), -1);
      for (int64_t e = e0; e < e1; ++e) slot[en[e].id - r0] = 0;
      for (int64_t r = 0, next = start[blk]; r < rpb; ++r)
        if (slot[r] == 0) {
          slot[r] = next;
          ib[next] = static_cast<int32_t>(r0 + r);
          std::memset(rb + next * d, 0, sizeof(float) * d);
          ++next;
        }
      for (int64_t e = e0; e < e1; ++e) {
        if (e + 4 < e1)
          for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(gb + static_cast<int64_t>(en[e + 4].s) * d + c);
        const float* gr = gb + static_cast<int64_t>(en[e].s) * d;
        float* o = rb + slot[en[e].id - r0] * d;
        const float we = en[e].w;
        for (int64_t c = 0; c < d; ++c) o[c] += we * gr[c];
      }
    }
  });
  const int64_t total = start[bk.blocks];
  std::fill(ib + total, ib + m, static_cast<int32_t>(v));
  std::memset(rb + total * d, 0, sizeof(float) * (m - total) * d);
  *count->typed_data() = static_cast<int32_t>(total);
  return ffi::Error::Success();
}

// A float and its position as one integer that orders as lax.top_k ranks: the score in XLA's total order
// (-NaN < -inf < ... < -0 < +0 < ... < +inf < NaN) above, the complemented position (ties: lower first) below.
inline uint64_t Packed(float x, int32_t pos) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | static_cast<uint32_t>(~pos);
}

// Positions (into pos) of the k largest of m distinct keys, best first: a key's rank is the number of keys
// above it, counted without branches in vectorized compares (no data-dependent branch to mispredict, as
// sorting ~50 keys has). out has k + 1 slots: the last one takes every key ranked below k.
inline void RankSelect(const int64_t* keys, const int32_t* pos, int64_t m, int64_t k, int32_t* out) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t x = keys[i];
    int64_t r = 0;
    for (int64_t j = 0; j < m; ++j) r += keys[j] > x;
    out[std::min(r, k)] = pos[i];
  }
}

// Scratch of one thread's TopK over at most m keys (k + 1 output slots).
struct TopKBuffers {
  std::vector<int64_t> keys, cand, sample;
  std::vector<int32_t> pos;
  explicit TopKBuffers(int64_t m) : keys(m), cand(m), sample(m), pos(m) {}
};

// Positions of the k best of keys[0..m) (Packed), best first. Every (m/k)-th key is sampled and ranked; the
// keys at or above the sample's 1.5k·ns/m-th best (about 1.5k of them) are ranked by RankSelect, the
// threshold lowered (twice as many samples above it) until at least k pass.
inline void TopK(const uint64_t* packed, int64_t m, int64_t k, int32_t* out, TopKBuffers& t) {
  int64_t *kb = t.keys.data(), *cb = t.cand.data(), *sr = t.sample.data();
  for (int64_t i = 0; i < m; ++i) kb[i] = static_cast<int64_t>(packed[i] ^ (uint64_t{1} << 63));  // signed order
  const int64_t step = std::max<int64_t>(1, m / k);
  int64_t ns = 0;
  for (int64_t i = 0; i < m; i += step) cb[ns++] = kb[i];
  for (int64_t i = 0; i < ns; ++i) {  // the samples sorted, best first
    int64_t r = 0;
    for (int64_t j = 0; j < ns; ++j) r += cb[j] > cb[i];
    sr[r] = cb[i];
  }
  for (int64_t q = std::min<int64_t>(ns - 1, (3 * k * ns) / (2 * m));; q = std::min(ns - 1, 2 * q + 1)) {
    const int64_t thr = q == ns - 1 ? INT64_MIN : sr[q];  // the last try keeps every key
    int64_t c = 0;
    for (int64_t i = 0; i < m; ++i) {
      cb[c] = kb[i];
      t.pos[c] = static_cast<int32_t>(i);
      c += kb[i] >= thr;
    }
    if (c >= k) return RankSelect(cb, t.pos.data(), c, k, out);
  }
}

// s1, s2 [R, n]; pa, pb [P]: the candidate rank pairs (a, b) in candidate_pairs(k) order.
// slots [R, k]: the k best i1[a] * n + i2[b] by t1[a] + t2[b], ties to the earlier candidate.
ffi::Error TopkPairs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> s2,
                     ffi::Buffer<ffi::S32> pa, ffi::Buffer<ffi::S32> pb, ffi::ResultBuffer<ffi::S32> slots) {
  const int64_t r = s1.dimensions()[0], n = s1.dimensions()[1];
  const int64_t k = slots->dimensions()[1], p = pa.dimensions()[0];
  if (s2.dimensions()[0] != r || s2.dimensions()[1] != n || pb.dimensions()[0] != p || slots->dimensions()[0] != r)
    return ffi::Error::InvalidArgument("pmem topk_pairs: shapes of s1, s2, pairs and slots disagree");
  if (k < 1 || k > n || p < k) return ffi::Error::InvalidArgument("pmem topk_pairs: need 1 <= k <= n and k pairs");
  const float *a1 = s1.typed_data(), *a2 = s2.typed_data();
  const int32_t *ra = pa.typed_data(), *rb = pb.typed_data();
  for (int64_t c = 0; c < p; ++c)
    if (ra[c] < 0 || ra[c] >= k || rb[c] < 0 || rb[c] >= k)
      return ffi::Error::InvalidArgument("pmem topk_pairs: a candidate rank lies outside [0, k)");
  int32_t* out = slots->typed_data();
  ParallelFor(pool, r, 64, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> keys(std::max(n, p));
    TopKBuffers buf(std::max(n, p));
    std::vector<int32_t> i1(k + 1), i2(k + 1), best(k + 1);
    for (int64_t row = b; row < e; ++row) {
      const float *x1 = a1 + row * n, *x2 = a2 + row * n;
      for (int64_t i = 0; i < n; ++i) keys[i] = Packed(x1[i], i);
      TopK(keys.data(), n, k, i1.data(), buf);
      for (int64_t i = 0; i < n; ++i) keys[i] = Packed(x2[i], i);
      TopK(keys.data(), n, k, i2.data(), buf);
      for (int64_t c = 0; c < p; ++c) keys[c] = Packed(x1[i1[ra[c]]] + x2[i2[rb[c]]], c);
      TopK(keys.data(), p, k, best.data(), buf);
      for (int64_t j = 0; j < k; ++j)
        out[row * k + j] = static_cast<int32_t>(i1[ra[best[j]]] * n + i2[rb[best[j]]]);
    }
  });
  return ffi::Error::Success();
}

// ds [R, n] = 0, then ds[r, i[r, j]] += v[r, j] in j order (the gradient of a take along rows).
ffi::Error RowScatter(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> i, ffi::Buffer<ffi::F32> v,
                      ffi::ResultBuffer<ffi::F32> ds) {
  const int64_t r = ds->dimensions()[0], n = ds->dimensions()[1], k = i.dimensions()[1];
  if (i.dimensions()[0] != r || v.dimensions()[0] != r || v.dimensions()[1] != k)
    return ffi::Error::InvalidArgument("pmem row_scatter: shapes of ids, values and output disagree");
  const int32_t* ib = i.typed_data();
  const float* vb = v.typed_data();
  float* ob = ds->typed_data();
  ParallelFor(pool, r, 256, [&](int64_t b, int64_t e) {
    std::fill(ob + b * n, ob + e * n, 0.0f);
    for (int64_t row = b; row < e; ++row)
      for (int64_t j = 0; j < k; ++j)
        if (static_cast<uint64_t>(ib[row * k + j]) < static_cast<uint64_t>(n)) ob[row * n + ib[row * k + j]] += vb[row * k + j];
  });
  return ffi::Error::Success();
}

// One row of lazy Adam (kDecay 0: none, 1: coupled L2 in the gradient, 2: AdamW's decoupled decay); branch-free
// per configuration so it vectorizes. Multiply-adds are fused as XLA:CPU fuses them without clipping or decay.
template <bool kClip, int kDecay>
void AdamRow(float* __restrict p, float* __restrict m1, float* __restrict m2, const float* __restrict g, int64_t d,
             float r1, float r2, const float (&k)[9]) {
  const float lr = k[0], norm = k[1], max_norm = k[2], wd = k[3], b1 = k[4], b2 = k[5], c1 = k[6], c2 = k[7];
  const float eps = k[8];
  for (int64_t c = 0; c < d; ++c) {
    float x = g[c];
    if constexpr (kClip) x = (x / norm) * max_norm;
    if constexpr (kDecay == 1) x = std::fma(wd, p[c], x);
    m1[c] = std::fma(c1, x, b1 * m1[c]);
    m2[c] = std::fma(c2, x * x, b2 * m2[c]);
    float step = (m1[c] * r1) / (std::sqrt(m2[c] * r2) + eps);
    if constexpr (kDecay == 2) step = std::fma(wd, p[c], step);
    p[c] = std::fma(-lr, step, p[c]);
  }
}

// Lazy Adam on rows ids [M] (ids outside [0, R) skipped) of table, mu, nu [R, D], which the outputs alias (XLA
// donates them; copied first if it did not), with gradient rows g [M, D] and bias corrections bc [M, 2] =
// (1 - b1^c, 1 - b2^c) of each row's new step count c. scal = (lr, global norm, clip norm (0: none), weight
// decay); decay: 0 none, 1 coupled, 2 decoupled. sq [M]: each new row's sum of squares (0 for skipped ids).
// Every row is independent, so results do not depend on the thread split.
ffi::Error RowAdam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> mu,
                   ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> g,
                   ffi::Buffer<ffi::F32> bc, ffi::Buffer<ffi::F32> scal, float b1, float b2, float one_minus_b1,
                   float one_minus_b2, float eps, int64_t decay, ffi::ResultBuffer<ffi::F32> table_out,
                   ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out,
                   ffi::ResultBuffer<ffi::F32> sq) {
  const int64_t r = table.dimensions()[0], d = table.dimensions()[1], m = ids.dimensions()[0];
  if (mu.dimensions()[0] != r || nu.dimensions()[0] != r || mu.dimensions()[1] != d || nu.dimensions()[1] != d ||
      g.dimensions()[0] != m || g.dimensions()[1] != d || bc.dimensions()[0] != m || bc.dimensions()[1] != 2 ||
      scal.dimensions()[0] != 4 || sq->dimensions()[0] != m || decay < 0 || decay > 2)
    return ffi::Error::InvalidArgument("pmem row_adam: shapes of table, moments, ids, grads, bc differ or bad decay");
  float* out[3] = {table_out->typed_data(), mu_out->typed_data(), nu_out->typed_data()};
  const float* in[3] = {table.typed_data(), mu.typed_data(), nu.typed_data()};
  for (int a = 0; a < 3; ++a)
    if (out[a] != in[a]) std::memcpy(out[a], in[a], sizeof(float) * r * d);
  const int32_t* ib = ids.typed_data();
  const float *gb = g.typed_data(), *bb = bc.typed_data(), *sc = scal.typed_data();
  const float k[9] = {sc[0], sc[1], sc[2], sc[3], b1, b2, one_minus_b1, one_minus_b2, eps};
  const bool clip = sc[2] != 0.0f && !(sc[1] < sc[2]);  // optax clip_by_global_norm's select
  using Row = void (*)(float*, float*, float*, const float*, int64_t, float, float, const float (&)[9]);
  const Row rows[2][3] = {{AdamRow<false, 0>, AdamRow<false, 1>, AdamRow<false, 2>},
                          {AdamRow<true, 0>, AdamRow<true, 1>, AdamRow<true, 2>}};
  const Row row = rows[clip][sc[3] != 0.0f ? decay : 0];
  float* qb = sq->typed_data();
  ParallelFor(pool, m, 64, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t id = ib[u];
      if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(r)) {
        qb[u] = 0.0f;
        continue;
      }
      if (u + 2 < e && static_cast<uint64_t>(ib[u + 2]) < static_cast<uint64_t>(r))
        for (int a = 0; a < 3; ++a)
          for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(out[a] + ib[u + 2] * d + c, 1);
      float* p = out[0] + id * d;
      row(p, out[1] + id * d, out[2] + id * d, gb + u * d, d, 1.0f / bb[2 * u], 1.0f / bb[2 * u + 1], k);
      qb[u] = Dot(p, p, d);
    }
  });
  return ffi::Error::Success();
}

// ---- Causal self-attention (FlashAttention-2, Dao 2023): see kernels/attention/native.py ----
//
// q [B, T, N, H], k, v [B, T, K, H] (GQA: query head n reads kv head n / G, G = N / K), seg, pos [B, T].
// Query i sees key j iff j <= i, seg[j] == seg[i] > 0 and (window == 0 or pos[i] - pos[j] < window);
// a padding query (seg 0) sees no key and, as jax.nn.dot_product_attention's masked softmax gives, averages
// every v (scores all equal: lse = log T). Tiles of kBq queries x kBk keys; one kv head's G query heads
// are stacked as the G * kBq rows of a tile so each key tile is packed once for the group.

constexpr int64_t kBq = 64, kBk = 64;  // queries, keys per tile

// One SIMD register of floats (GCC / Clang vector extensions) at the width -march=native gives.
#if defined(__AVX512F__)
constexpr int kW = 16;
#elif defined(__AVX__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
typedef float Vec __attribute__((vector_size(4 * kW)));
typedef int32_t IVec __attribute__((vector_size(4 * kW)));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec Splat(float x) { return x - Vec{}; }  // exact (x - 0 = x, -0 included): a plain broadcast

// a * b + c, fused where the CPU has FMA (-ffp-contract=off fuses nothing by itself).
inline Vec Fma(Vec a, Vec b, Vec c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

constexpr int kNr = 16, kNv = kNr / kW, kMr = 8 / kNv;  // the register tile of Gemm: kMr x kNr of C, 8 registers

// C[m x n] (+)= A[m x k] B[k x n] (m % kMr == 0, n % kNr == 0): A(r, p) = a[r * ars + p * acs]; B, C row-major
// with row strides ldb, ldc. Each kMr x kNr block of C is summed in registers over p.
template <bool kAdd>
void Gemm(float* __restrict c, int64_t ldc, const float* __restrict a, int64_t ars, int64_t acs,
          const float* __restrict b, int64_t ldb, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; i += kMr)
    for (int64_t j = 0; j < n; j += kNr) {
      Vec acc[kMr][kNv];
      for (int r = 0; r < kMr; ++r)
        for (int u = 0; u < kNv; ++u) acc[r][u] = kAdd ? Load(c + (i + r) * ldc + j + u * kW) : Vec{};
      const float* ar = a + i * ars;
      for (int64_t p = 0; p < k; ++p) {
        Vec bp[kNv];
        for (int u = 0; u < kNv; ++u) bp[u] = Load(b + p * ldb + j + u * kW);
        for (int r = 0; r < kMr; ++r) {
          const Vec x = Splat(ar[r * ars + p * acs]);
          for (int u = 0; u < kNv; ++u) acc[r][u] = Fma(x, bp[u], acc[r][u]);
        }
      }
      for (int r = 0; r < kMr; ++r)
        for (int u = 0; u < kNv; ++u) Store(c + (i + r) * ldc + j + u * kW, acc[r][u]);
    }
}

// e^x (0 below -87): 2^n e^r with n = round(x log2 e), r = x - n ln 2 in two parts (Cody-Waite), e^r by its
// degree-6 Taylor polynomial (|r| <= ln2 / 2: truncation below 1 ulp).
inline Vec Exp(Vec x) {
  Vec z = x < -87.0f ? Splat(-87.0f) : x;
  z = z > 88.0f ? Splat(88.0f) : z;
  const Vec n = (z * 1.44269502f + 12582912.0f) - 12582912.0f;  // round to nearest by 1.5 * 2^23
  const Vec r = Fma(n, Splat(-1.42860677e-6f), Fma(n, Splat(-0.693145752f), z));  // ln 2 = 0.693145752 + 1.42860677e-6
  Vec p = Fma(Splat(1.0f / 720), r, Splat(1.0f / 120));
  for (float c : {1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = Fma(p, r, Splat(c));
  const IVec e = (__builtin_convertvector(n, IVec) + 127) << 23;
  return x < -87.0f ? Vec{} : p * __builtin_bit_cast(Vec, e);
}

inline float MaxLane(Vec v) {
  float m = v[0];
  for (int l = 1; l < kW; ++l) m = std::max(m, v[l]);
  return m;
}

inline float SumLanes(Vec v) {
  float t = 0.0f;
  for (int l = 0; l < kW; ++l) t += v[l];
  return t;
}

struct AttnShape {
  int64_t b, t, n, kv, h, g, hp, nqt, window;  // g = n / kv; hp: h rounded up to kNr; nqt query tiles
  const int32_t *seg, *pos;
};

ffi::Error AttnCheck(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                     const ffi::Buffer<ffi::S32>& seg, const ffi::Buffer<ffi::S32>& pos, int64_t window, AttnShape* s) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("pmem attention: q, k, v must be [B, T, heads, H]");
  *s = {qd[0], qd[1], qd[2], kd[2], qd[3], 0, (qd[3] + kNr - 1) / kNr * kNr, (qd[1] + kBq - 1) / kBq, window,
        seg.typed_data(), pos.typed_data()};
  for (int a = 0; a < 4; ++a)
    if (kd[a] != vd[a] || (a != 2 && kd[a] != qd[a]))
      return ffi::Error::InvalidArgument("pmem attention: q [B, T, N, H], k and v [B, T, K, H] disagree");
  if (s->kv < 1 || s->n % s->kv || seg.dimensions()[0] != s->b || seg.dimensions()[1] != s->t ||
      pos.dimensions()[0] != s->b || pos.dimensions()[1] != s->t || window < 0)
    return ffi::Error::InvalidArgument("pmem attention: N % K != 0, segment ids / positions not [B, T], or window < 0");
  s->g = s->n / s->kv;
  return ffi::Error::Success();
}

// bias[ii, c] = 0 where query i0 + ii sees key j0 + c, else -inf; whether any is seen.
bool TileBias(const AttnShape& s, int64_t b, int64_t i0, int64_t j0, float* bias) {
  const int32_t *seg = s.seg + b * s.t, *pos = s.pos + b * s.t;
  const float inf = std::numeric_limits<float>::infinity();
  bool any = false;
  for (int64_t ii = 0; ii < kBq; ++ii) {
    const int64_t i = i0 + ii;
    float* row = bias + ii * kBk;
    const int64_t nc = i < s.t && seg[i] > 0 ? std::min(kBk, i - j0 + 1) : 0;  // keys j0 .. min(i, j0 + kBk - 1)
    for (int64_t c = 0; c < nc; ++c) {
      const bool see = seg[j0 + c] == seg[i] && (s.window == 0 || pos[i] - pos[j0 + c] < s.window);
      row[c] = see ? 0.0f : -inf;
      any |= see;
    }
    std::fill(row + std::max<int64_t>(nc, 0), row + kBk, -inf);
  }
  return any;
}

// x [B, T, heads, H] rows (t0 .. t0 + rows) of head hd, times `mul`, into dst [rows, hp] (zero past T and H);
// transposed: into dst [hp, rows].
void Pack(const AttnShape& s, const float* x, int64_t heads, int64_t b, int64_t hd, int64_t t0, int64_t rows,
          float mul, bool transposed, float* dst) {
  std::fill(dst, dst + rows * s.hp, 0.0f);
  for (int64_t r = 0; r < rows && t0 + r < s.t; ++r) {
    const float* src = x + ((b * s.t + t0 + r) * heads + hd) * s.h;
    for (int64_t d = 0; d < s.h; ++d) (transposed ? dst[d * rows + r] : dst[r * s.hp + d]) = mul * src[d];
  }
}

// Forward (Alg. 1): per (b, kv head, query tile), over the key tiles with a seen key, the online softmax
// m' = max(m, rowmax S), P = exp(S - m'), l' = e^(m - m') l + rowsum P, O' = e^(m - m') O + P V;
// then o = O / l, lse = m + log l.
ffi::Error AttnFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> pos, int64_t window,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  AttnShape s;
  if (auto e = AttnCheck(q, k, v, seg, pos, window, &s); e.failure()) return e;
  const float *qb = q.typed_data(), *kb = k.typed_data(), *vb = v.typed_data();
  float *ob = o->typed_data(), *lb = lse->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.h)), inf = std::numeric_limits<float>::infinity();
  const float inv_t = 1.0f / static_cast<float>(s.t);
  const int64_t rows = s.g * kBq, hp = s.hp;
  ParallelChunks(pool, s.b * s.kv * s.nqt, s.b * s.kv * s.nqt, [&](int64_t w0, int64_t w1) {
    std::vector<float> qs(rows * hp), kt(hp * kBk), vt(kBk * hp), acc(rows * hp), sc(rows * kBk), bias(kBq * kBk);
    std::vector<float> m(rows), l(rows);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / (s.kv * s.nqt), g = w / s.nqt % s.kv, i0 = w % s.nqt * kBq;
      for (int64_t h = 0; h < s.g; ++h) Pack(s, qb, s.n, b, g * s.g + h, i0, kBq, scale, false, &qs[h * kBq * hp]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t j0 = 0; j0 < std::min(i0 + kBq, s.t); j0 += kBk) {
        if (!TileBias(s, b, i0, j0, bias.data())) continue;
        Pack(s, kb, s.kv, b, g, j0, kBk, 1.0f, true, kt.data());
        Pack(s, vb, s.kv, b, g, j0, kBk, 1.0f, false, vt.data());
        Gemm<false>(sc.data(), kBk, qs.data(), hp, 1, kt.data(), kBk, rows, kBk, s.h);  // S = Q K^T / sqrt(H)
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = &sc[r * kBk];
          const float* br = &bias[r % kBq * kBk];
          Vec mv = Splat(-inf);
          for (int64_t c = 0; c < kBk; c += kW) {
            const Vec x = Load(sr + c) + Load(br + c);
            Store(sr + c, x);
            mv = x > mv ? x : mv;
          }
          const float mx = std::max(m[r], MaxLane(mv));
          if (mx == -inf) {  // nothing seen yet: P = 0
            std::fill(sr, sr + kBk, 0.0f);
            continue;
          }
          Vec sum{};
          for (int64_t c = 0; c < kBk; c += kW) {
            const Vec e = Exp(Load(sr + c) - mx);
            Store(sr + c, e);
            sum += e;
          }
          const float alpha = m[r] == -inf ? 0.0f : Exp(Splat(m[r] - mx))[0];
          l[r] = alpha * l[r] + SumLanes(sum);
          m[r] = mx;
          for (int64_t d = 0; d < hp; d += kW) Store(&acc[r * hp + d], Load(&acc[r * hp + d]) * alpha);
        }
        Gemm<true>(acc.data(), hp, sc.data(), kBk, 1, vt.data(), hp, rows, hp, kBk);  // O += P V
      }
      const int32_t* sg = s.seg + b * s.t;
      std::vector<float> mean;  // the padding rows' output: mean_j v[j]
      for (int64_t ii = 0; ii < kBq && i0 + ii < s.t; ++ii) {
        const int64_t i = i0 + ii;
        if (sg[i] == 0 && mean.empty()) {
          mean.assign(s.h, 0.0f);
          for (int64_t j = 0; j < s.t; ++j)
            for (int64_t d = 0; d < s.h; ++d) mean[d] += inv_t * vb[((b * s.t + j) * s.kv + g) * s.h + d];
        }
        for (int64_t h = 0; h < s.g; ++h) {
          const int64_t r = h * kBq + ii, hd = g * s.g + h;
          float* out = ob + ((b * s.t + i) * s.n + hd) * s.h;
          if (sg[i] == 0) {
            std::copy(mean.begin(), mean.end(), out);
            lb[(b * s.t + i) * s.n + hd] = std::log(static_cast<float>(s.t));
            continue;
          }
          const float inv = 1.0f / l[r];
          for (int64_t d = 0; d < s.h; ++d) out[d] = acc[r * hp + d] * inv;
          lb[(b * s.t + i) * s.n + hd] = m[r] + std::log(l[r]);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Backward (Alg. 2): per (b, kv head), key tiles outer (dK, dV of the tile summed over every query tile and
// the group's heads), query tiles inner (dQ of the whole sequence kept): P = exp(S - lse), D = rowsum(dO o O),
// dV += P^T dO, dP = dO V^T, dS = P o (dP - D), dQ += dS K / sqrt(H), dK += dS^T Q / sqrt(H). A padding query
// (P = 1/T on every key, no score gradient) adds its dO / T to every dv.
ffi::Error AttnBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::F32> o,
                   ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int64_t window,
                   ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  AttnShape s;
  if (auto e = AttnCheck(q, k, v, seg, pos, window, &s); e.failure()) return e;
  const float *qb = q.typed_data(), *kb = k.typed_data(), *vb = v.typed_data(), *ob = o.typed_data();
  const float *lb = lse.typed_data(), *gb = dout.typed_data();
  float *dqb = dq->typed_data(), *dkb = dk->typed_data(), *dvb = dv->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.h)), inv_t = 1.0f / static_cast<float>(s.t);
  const int64_t rows = s.g * kBq, hp = s.hp, tile = rows * hp;  // one query tile of the group
  ParallelChunks(pool, s.b * s.kv, s.b * s.kv, [&](int64_t w0, int64_t w1) {
    std::vector<float> qs(s.nqt * tile), go(s.nqt * tile), gq(s.nqt * tile), dd(s.nqt * rows), ls(s.nqt * rows);
    std::vector<float> kt(hp * kBk), vt(hp * kBk), kr(kBk * hp), gk(kBk * hp), gv(kBk * hp), p(rows * kBk);
    std::vector<float> dp(rows * kBk), bias(kBq * kBk), pad(s.h);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / s.kv, g = w % s.kv;
      const int32_t* sg = s.seg + b * s.t;
      std::fill(gq.begin(), gq.end(), 0.0f);
      std::fill(dd.begin(), dd.end(), 0.0f);
      std::fill(ls.begin(), ls.end(), 0.0f);
      std::fill(pad.begin(), pad.end(), 0.0f);
      for (int64_t it = 0; it < s.nqt; ++it)
        for (int64_t h = 0; h < s.g; ++h) {
          const int64_t hd = g * s.g + h, at = it * tile + h * kBq * hp;
          Pack(s, qb, s.n, b, hd, it * kBq, kBq, scale, false, &qs[at]);
          Pack(s, gb, s.n, b, hd, it * kBq, kBq, 1.0f, false, &go[at]);
          for (int64_t ii = 0; ii < kBq && it * kBq + ii < s.t; ++ii) {
            const int64_t i = it * kBq + ii, x = ((b * s.t + i) * s.n + hd) * s.h;
            float d = 0.0f;
            for (int64_t c = 0; c < s.h; ++c) d += gb[x + c] * ob[x + c];
            dd[it * rows + h * kBq + ii] = d;
            ls[it * rows + h * kBq + ii] = lb[(b * s.t + i) * s.n + hd];
            if (sg[i] == 0)
              for (int64_t c = 0; c < s.h; ++c) pad[c] += inv_t * gb[x + c];
          }
        }
      for (int64_t j0 = 0; j0 < s.t; j0 += kBk) {
        Pack(s, kb, s.kv, b, g, j0, kBk, 1.0f, true, kt.data());
        Pack(s, vb, s.kv, b, g, j0, kBk, 1.0f, true, vt.data());
        Pack(s, kb, s.kv, b, g, j0, kBk, 1.0f, false, kr.data());
        std::fill(gk.begin(), gk.end(), 0.0f);
        std::fill(gv.begin(), gv.end(), 0.0f);
        for (int64_t it = j0 / kBq; it < s.nqt; ++it) {
          if (!TileBias(s, b, it * kBq, j0, bias.data())) continue;
          const float *qt = &qs[it * tile], *gt = &go[it * tile];
          Gemm<false>(p.data(), kBk, qt, hp, 1, kt.data(), kBk, rows, kBk, s.h);  // S
          Gemm<false>(dp.data(), kBk, gt, hp, 1, vt.data(), kBk, rows, kBk, s.h);  // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            const float lr = ls[it * rows + r], dr = dd[it * rows + r], *br = &bias[r % kBq * kBk];
            float *pr = &p[r * kBk], *sr = &dp[r * kBk];
            for (int64_t c = 0; c < kBk; c += kW) {
              const Vec pc = Exp(Load(pr + c) + Load(br + c) - lr);  // P = exp(S - lse)
              Store(pr + c, pc);
              Store(sr + c, pc * (Load(sr + c) - dr));  // dS = P o (dP - D)
            }
          }
          Gemm<true>(gv.data(), hp, p.data(), 1, kBk, gt, hp, kBk, hp, rows);      // dV += P^T dO
          Gemm<true>(gk.data(), hp, dp.data(), 1, kBk, qt, hp, kBk, hp, rows);     // dK += dS^T Q / sqrt(H)
          Gemm<true>(&gq[it * tile], hp, dp.data(), kBk, 1, kr.data(), hp, rows, hp, kBk);  // dQ += dS K
        }
        for (int64_t c = 0; c < kBk && j0 + c < s.t; ++c) {
          const int64_t x = ((b * s.t + j0 + c) * s.kv + g) * s.h;
          for (int64_t d = 0; d < s.h; ++d) {
            dkb[x + d] = gk[c * hp + d];
            dvb[x + d] = gv[c * hp + d] + pad[d];
          }
        }
      }
      for (int64_t i = 0; i < s.t; ++i)
        for (int64_t h = 0; h < s.g; ++h) {
          const float* src = &gq[i / kBq * tile + (h * kBq + i % kBq) * hp];
          float* out = dqb + ((b * s.t + i) * s.n + g * s.g + h) * s.h;
          for (int64_t d = 0; d < s.h; ++d) out[d] = src[d] * scale;
        }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// (thread pool, table f32 [V, D], ids s32 [S, k], f32 [S, k] or [S, D]) -> f32: the bag forward and wgrad.
static auto TableIdsRows() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemRowScatter, RowScatter,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemBagFwd, BagFwd, TableIdsRows());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemBagWgrad, BagWgrad, TableIdsRows());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemBagGrads, BagGrads,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemBagRows, BagRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_rows")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemTopkPairs, TopkPairs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemRowAdam, RowAdam,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("decay")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// (thread pool, q [B, T, N, H], k, v [B, T, K, H], seg, pos s32 [B, T]): the attention kernels' leading args.
static auto Attn() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemAttnFwd, AttnFwd,
                              Attn().Attr<int64_t>("window").Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemAttnBwd, AttnBwd,
                              Attn()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ---- Host-resident tables (pmem/train/host_tables.py): plain C functions called through ctypes ----
//
// pmem_host_row_adam  RowAdam's lazy Adam (the same AdamRow) on a host table in place: gather, update and
//                     scatter of each touched row and its moments in one pass, and its step count incremented.
//
// Not FFI handlers: their arrays are NumPy's (no XLA buffers, no copies); ctypes releases the GIL during a call.

// Lazy Adam on the rows ids [L, n] (the first m of each layer's n slots; ids outside [0, V) skipped) of table, mu,
// nu [L, V, D] and count [L, V] (int32, incremented) in place, with gradient rows g [L, n, D]. bc [nbc, 2] holds
// (1 - b1^c, 1 - b2^c) by step count c (XLA's pow, as RowAdam's caller computes them). k = (lr, global norm, clip
// norm (0: none), weight decay, b1, b2, 1 - b1, 1 - b2, eps); decay as RowAdam. Returns the rows written; -1 for
// a bad decay, -2 (nothing written) if a new count is not below nbc. Each row is updated as RowAdam updates it
// (rows are independent: any split over threads gives the same), so the results equal a gather, pmem_row_adam
// and a scatter bit for bit. Ranges of at least 1024 rows go to std::threads, one per core at most.
extern "C" int64_t PmemHostRowAdam(float* table, float* mu, float* nu, int32_t* count, int64_t layers, int64_t v,
                                   int64_t d, const int32_t* ids, const float* g, int64_t n, int64_t m,
                                   const float* bc, int64_t nbc, const float* k, int64_t decay) {
  if (decay < 0 || decay > 2) return -1;
  const auto valid = [v](int32_t id) { return static_cast<uint64_t>(id) < static_cast<uint64_t>(v); };
  for (int64_t l = 0; l < layers; ++l)  // the counts first (their lines then stay in cache)
    for (int64_t u = 0; u < m; ++u)
      if (valid(ids[l * n + u]) && count[l * v + ids[l * n + u]] >= nbc - 1) return -2;
  const float kk[9] = {k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], k[8]};
  const bool clip = k[2] != 0.0f && !(k[1] < k[2]);  // as RowAdam
  using Row = void (*)(float*, float*, float*, const float*, int64_t, float, float, const float (&)[9]);
  const Row rows[2][3] = {{AdamRow<false, 0>, AdamRow<false, 1>, AdamRow<false, 2>},
                          {AdamRow<true, 0>, AdamRow<true, 1>, AdamRow<true, 2>}};
  const Row row = rows[clip][k[3] != 0.0f ? decay : 0];
  const int64_t total = layers * m;
  // slots [b, e) of the flattened (layer, slot) order; the rows 16 slots ahead prefetched
  const auto run = [&](int64_t b, int64_t e, int64_t* written) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t l = i / m, u = i % m;
      if (i + 16 < e) {
        const int64_t la = (i + 16) / m, id = ids[la * n + (i + 16) % m];
        if (valid(id))
          for (float* x : {table, mu, nu})
            for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(x + (la * v + id) * d + c, 1);
      }
      const int32_t id = ids[l * n + u];
      if (!valid(id)) continue;
      const int64_t r = (l * v + id) * d;
      const int32_t c = ++count[l * v + id];
      row(table + r, mu + r, nu + r, g + (l * n + u) * d, d, 1.0f / bc[2 * c], 1.0f / bc[2 * c + 1], kk);
      ++*written;
    }
  };
  const int64_t parts = std::clamp<int64_t>(total / 1024, 1, std::max(1u, std::thread::hardware_concurrency()));
  std::vector<int64_t> written(parts, 0);
  std::vector<std::thread> threads;
  for (int64_t p = 1; p < parts; ++p)
    threads.emplace_back(run, total * p / parts, total * (p + 1) / parts, &written[p]);
  run(0, total / parts, &written[0]);
  int64_t sum = 0;
  for (int64_t p = 0; p < parts; ++p) {
    if (p) threads[p - 1].join();
    sum += written[p];
  }
  return sum;
}
