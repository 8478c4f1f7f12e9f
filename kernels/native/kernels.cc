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
#include <memory>
#include <thread>
#include <vector>

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
