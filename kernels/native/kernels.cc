// Native CPU kernels called through the XLA FFI (kernels/native/__init__.py builds and registers them).
//
// pmem_bag_fwd     out[s]     = sum_j w[s, j] * table[idx[s, j]]            (ids outside [0, V) skipped)
// pmem_bag_wgrad   dw[s, j]   = <g[s], table[idx[s, j]]>                     (0 for ids outside [0, V))
// pmem_bag_grads   dtable[v]  = sum over (s, j) with idx[s, j] = v, in row-major (s, j) order, of w[s, j] * g[s],
//                  and dw as pmem_bag_wgrad, in one pass over blocks of table rows
// pmem_row_scatter ds[r, i[r, j]] += v[r, j] into zeros [R, n]        (the backward of a take along rows)
// pmem_topk_pairs  the k best slots i*n + j of s1[i] + s2[j] (see kernels/product_topk/ops.py)
//
// Float32 throughout. Built with -ffp-contract=off: the dense gradient adds the products w * g one by one in
// the order XLA's scatter does, so it equals kernels/embedding/xla.py bit for bit. Work is split over the
// thread pool XLA hands to FFI calls; the calling thread takes chunks too, so no call waits on an idle pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// f(begin, end) over [0, n) in chunks of at least `grain`, on the calling thread and the pool's threads.
template <class F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const F& f) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(1, n / std::max<int64_t>(1, grain)), 4 * threads);
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
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

ffi::Error CheckBag(int64_t v, int64_t d, int64_t s, int64_t k, int64_t ws, int64_t wk) {
  if (ws != s || wk != k) return ffi::Error::InvalidArgument("pmem bag: ids and weights differ in shape");
  if (v < 0 || d <= 0) return ffi::Error::InvalidArgument("pmem bag: empty table width");
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
  ParallelFor(pool, s, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* o = ob + r * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t id = ib[r * k + j];
        if (j + 1 < k && static_cast<uint64_t>(ib[r * k + j + 1]) < static_cast<uint64_t>(v))
          __builtin_prefetch(tb + ib[r * k + j + 1] * d);
        if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(v)) continue;
        const float* row = tb + id * d;
        const float wj = wb[r * k + j];
        for (int64_t c = 0; c < d; ++c) o[c] += wj * row[c];
      }
    }
  });
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

ffi::Error BagWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t v = table.dimensions()[0], d = table.dimensions()[1];
  const int64_t s = idx.dimensions()[0], k = idx.dimensions()[1];
  if (g.dimensions()[0] != s || g.dimensions()[1] != d)
    return ffi::Error::InvalidArgument("pmem bag wgrad: cotangent shape differs from [S, D]");
  const float* tb = table.typed_data();
  const int32_t* ib = idx.typed_data();
  const float* gb = g.typed_data();
  float* ob = dw->typed_data();
  ParallelFor(pool, s, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t id = ib[r * k + j];
        if (j + 1 < k && static_cast<uint64_t>(ib[r * k + j + 1]) < static_cast<uint64_t>(v))
          __builtin_prefetch(tb + ib[r * k + j + 1] * d);
        ob[r * k + j] = static_cast<uint64_t>(id) < static_cast<uint64_t>(v) ? Dot(gb + r * d, tb + id * d, d) : 0.0f;
      }
  });
  return ffi::Error::Success();
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

Buckets ByRowBlock(const int32_t* idx, const float* w, int64_t s, int64_t k, int64_t v, int64_t d) {
  Buckets b;
  b.rows_per_block = std::max<int64_t>(1, (256 << 10) / (4 * d));  // 256 KiB of float32 rows
  b.blocks = (v + b.rows_per_block - 1) / b.rows_per_block;
  b.start.assign(b.blocks + 1, 0);
  const int32_t rpb = static_cast<int32_t>(b.rows_per_block);
  for (int64_t p = 0; p < s * k; ++p)
    if (static_cast<uint64_t>(idx[p]) < static_cast<uint64_t>(v)) ++b.start[idx[p] / rpb + 1];
  for (int64_t i = 0; i < b.blocks; ++i) b.start[i + 1] += b.start[i];
  b.entries.resize(b.start[b.blocks]);
  std::vector<int64_t> fill(b.start.begin(), b.start.end() - 1);
  for (int64_t r = 0, p = 0; r < s; ++r)
    for (int64_t j = 0; j < k; ++j, ++p)
      if (static_cast<uint64_t>(idx[p]) < static_cast<uint64_t>(v))
        b.entries[fill[idx[p] / rpb]++] = Entry{idx[p], static_cast<int32_t>(r), w[p], static_cast<int32_t>(p)};
  return b;
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
  if (s * k >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("pmem bag grads: more than 2^31 entries");
  const float* tb = table.typed_data();
  const float* gb = g.typed_data();
  float* db = dtable->typed_data();
  float* ob = dw->typed_data();
  std::fill(ob, ob + s * k, 0.0f);
  const Buckets bk = ByRowBlock(idx.typed_data(), w.typed_data(), s, k, v, d);
  std::vector<float> dots(bk.entries.size());  // in bucket order, written back to dw after the pass
  ParallelFor(pool, bk.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bk.rows_per_block, r1 = std::min(v, r0 + bk.rows_per_block);
      std::memset(db + r0 * d, 0, sizeof(float) * (r1 - r0) * d);
      for (int64_t e = bk.start[blk]; e < bk.start[blk + 1]; ++e) {
        const Entry& en = bk.entries[e];
        const float* gr = gb + static_cast<int64_t>(en.s) * d;
        float* row = db + static_cast<int64_t>(en.id) * d;
        dots[e] = Dot(gr, tb + static_cast<int64_t>(en.id) * d, d);
        for (int64_t c = 0; c < d; ++c) row[c] += en.w * gr[c];
      }
    }
  });
  for (size_t e = 0; e < dots.size(); ++e) ob[bk.entries[e].p] = dots[e];
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

// Positions of the k best of keys[0..m) (Packed), best first. A threshold from every (m/k)-th key keeps
// about 1.5k candidates without a branch per key; the selection then sorts only those (or all m when
// the sample misjudged). buf holds m keys; keys is reordered.
inline void TopK(uint64_t* keys, int64_t m, int64_t k, int32_t* pos, uint64_t* buf) {
  const int64_t step = std::max<int64_t>(1, m / k);
  int64_t ns = 0;
  for (int64_t i = 0; i < m; i += step) buf[ns++] = keys[i];
  const int64_t q = std::min<int64_t>(ns - 1, (3 * k * ns) / (2 * m));
  std::nth_element(buf, buf + q, buf + ns, std::greater<uint64_t>());
  const uint64_t thr = buf[q];
  int64_t c = 0;
  for (int64_t i = 0; i < m; ++i) {
    buf[c] = keys[i];
    c += keys[i] >= thr;
  }
  uint64_t* sel = c >= k ? buf : keys;
  const int64_t len = c >= k ? c : m;
  std::nth_element(sel, sel + (k - 1), sel + len, std::greater<uint64_t>());
  std::sort(sel, sel + k, std::greater<uint64_t>());
  for (int64_t i = 0; i < k; ++i) pos[i] = static_cast<int32_t>(~static_cast<uint32_t>(sel[i]));
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
    std::vector<uint64_t> keys(std::max(n, p)), buf(std::max(n, p));
    std::vector<int32_t> i1(k), i2(k), best(k);
    for (int64_t row = b; row < e; ++row) {
      const float *x1 = a1 + row * n, *x2 = a2 + row * n;
      for (int64_t i = 0; i < n; ++i) keys[i] = Packed(x1[i], i);
      TopK(keys.data(), n, k, i1.data(), buf.data());
      for (int64_t i = 0; i < n; ++i) keys[i] = Packed(x2[i], i);
      TopK(keys.data(), n, k, i2.data(), buf.data());
      for (int64_t c = 0; c < p; ++c) keys[c] = Packed(x1[i1[ra[c]]] + x2[i2[rb[c]]], c);
      TopK(keys.data(), p, k, best.data(), buf.data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PmemTopkPairs, TopkPairs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
