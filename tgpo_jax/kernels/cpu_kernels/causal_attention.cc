// Fused causal self-attention for XLA:CPU, forward and backward, through the XLA FFI.
//
// Why: at the demo's training shapes (T ~ 100, head_dim 16) XLA:CPU runs attention as batched
// matmuls of a tiny contraction (YNNPACK, one thread per op) plus elementwise passes that write
// and re-read every [t, s] score tensor. Here one task owns one (batch row, kv head): its keys
// and values stay in L1/L2, the scores of one query row live in a T-float scratch, and tasks run
// on XLA's intra-op thread pool.
//
// Layouts (row-major, fp32): q, dq [B, T, H, D]; k, v, dk, dv [B, T, K, D]; key_mask [B, T] (int32,
// nonzero = real token); out [B, T, H, D]; lse [B, H, T] (log-sum-exp of the scaled scores).
// Query row t attends key s iff s <= t and key_mask[b, s]. A row with no allowed key (left
// padding) gets out = 0, lse = +kEmpty, and zero gradients. Query head h reads kv head h / (H / K).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMasked = -3.0e38f;  // score of a masked key before the max
constexpr float kEmpty = 3.0e38f;    // lse of a row with no allowed key: exp(s - lse) = 0

// fp32 vectors through GCC / Clang vector extensions: the compiler maps them to AVX-512 (or to
// pairs of AVX2 / SSE registers), with no intrinsics and no scalar tails in the hot loops.
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

template <typename V>
struct VecOf;
template <>
struct VecOf<v16> {
  typedef v16u unaligned;
  static constexpr int64_t kWidth = 16;
};
template <>
struct VecOf<v8> {
  typedef v8u unaligned;
  static constexpr int64_t kWidth = 8;
};

template <typename V>
inline V Load(const float* p) {
  return *reinterpret_cast<const typename VecOf<V>::unaligned*>(p);
}
template <typename V>
inline void Store(float* p, V x) {
  *reinterpret_cast<typename VecOf<V>::unaligned*>(p) = x;
}

// exp(x) for x <= ~0 (Cephes' expf polynomial, ~1 ulp on [-87, 0]) on 16 lanes. x is clamped to
// [-87, 1]: a masked or future key's score may exceed the row max by any amount, and its lane must
// stay finite until the caller selects 0 for it.
inline v16 ExpNeg(v16 x) {
  x = x < -87.0f ? v16{} - 87.0f : x;
  x = x > 1.0f ? v16{} + 1.0f : x;
  // round to nearest through the 1.5 * 2^23 trick (|x * log2 e| < 2^22 here)
  const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 y = v16{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  return y * reinterpret_cast<const v16&>(bits);
}

inline float HMax(v16 x) {
  float m = x[0];
  for (int l = 1; l < 16; ++l) m = std::max(m, x[l]);
  return m;
}
inline float HSum(v16 x) {
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += x[l];
  return s;
}

// Runs f(0..n-1) on the caller and the pool's threads; returns when every call has finished.
// Work is handed out through a shared counter, so a pool thread that starts late finds none left
// and never touches f; the caller waits only for calls that were actually taken.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F&& f) {
  int64_t workers = std::min<int64_t>(pool.num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto st = std::make_shared<State>();
  auto* fp = &f;
  auto run = [st, n, fp]() {
    for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
      (*fp)(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < workers; ++w) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Dims {
  int64_t B, T, H, K, D, G;
  float scale;
};

constexpr int64_t kLanes = 16;  // keys per score chunk: one AVX-512 register of fp32

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One (batch row, kv head), copied once per task into padded, contiguous buffers: the key mask as
// 0 / 1 floats and the keys transposed [D, Tp] for both passes; the values as rows [Tp, D] for the
// forward's P V; the values transposed and the keys as rows for the backward's dO V^T and dS K.
// Tp = T rounded up to kLanes, the padding zero and masked, so every key loop runs whole chunks.
struct KvTile {
  int64_t Tp;
  std::vector<float> k, v, kT, vT, maskf;  // k, vT: backward only; v: forward only
  KvTile(const Dims& d, const float* kg, const float* vg, const int32_t* mask, int64_t b, int64_t kh, bool backward)
      : Tp(RoundUp(d.T, kLanes)), k(backward ? Tp * d.D : 0, 0.0f), v(backward ? 0 : Tp * d.D, 0.0f),
        kT(d.D * Tp, 0.0f), vT(backward ? d.D * Tp : 0, 0.0f), maskf(Tp, 0.0f) {
    for (int64_t j = 0; j < d.T; ++j) {
      const int64_t row = ((b * d.T + j) * d.K + kh) * d.D;
      for (int64_t e = 0; e < d.D; ++e) {
        kT[e * Tp + j] = kg[row + e];
        if (backward) {
          k[j * d.D + e] = kg[row + e];
          vT[e * Tp + j] = vg[row + e];
        } else {
          v[j * d.D + e] = vg[row + e];
        }
      }
      maskf[j] = mask[b * d.T + j] ? 1.0f : 0.0f;
    }
  }
};

// out[r, j] = sum_e a[r, e] * bT[e, j] for R rows and keys j < n (n a multiple of kLanes); the
// R accumulators (one vector of keys each) stay in registers across the D-long contraction.
template <int64_t R, int64_t kD>
inline void RowsTimesKeys(const float (&a)[R][kD], const float* bT, int64_t Tp, int64_t n, float* out) {
  for (int64_t jb = 0; jb < n; jb += kLanes) {
    v16 acc[R] = {};
    for (int64_t e = 0; e < kD; ++e) {
      const v16 b = Load<v16>(bT + e * Tp + jb);
      for (int64_t r = 0; r < R; ++r) acc[r] += a[r][e] * b;
    }
    for (int64_t r = 0; r < R; ++r) Store(out + r * Tp + jb, acc[r]);
  }
}

// The lanes of key chunk jb that query i may attend: j <= i and key j real (1.0f), else 0.0f.
inline v16 Allowed(const float* maskf, int64_t jb, int64_t i) {
  const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const v16 m = Load<v16>(maskf + jb);
  return (lane + static_cast<float>(jb)) <= static_cast<float>(i) ? m : v16{};
}

// Row s [n] of scores (query i) becomes its probabilities exp(s - lse) on allowed keys, 0 elsewhere.
// Without a given lse (forward) computes it; returns kEmpty for a row with no allowed key. *sum
// gets the sum of exp(s - max) (forward only).
inline float Softmax(float* s, const float* maskf, int64_t i, int64_t n, float given_lse, bool given,
                     float* sum = nullptr) {
  float m = given_lse;
  if (!given) {
    v16 mv = v16{} + kMasked;
    for (int64_t jb = 0; jb < n; jb += kLanes) {
      const v16 x = Load<v16>(s + jb);
      const v16 ok = Allowed(maskf, jb, i);
      const v16 xm = ok > 0.0f ? x : v16{} + kMasked;
      mv = xm > mv ? xm : mv;
    }
    m = HMax(mv);
    if (m == kMasked) {
      std::fill(s, s + n, 0.0f);
      if (sum) *sum = 0.0f;
      return kEmpty;
    }
  }
  v16 lv = {};
  for (int64_t jb = 0; jb < n; jb += kLanes) {
    const v16 p = Allowed(maskf, jb, i) > 0.0f ? ExpNeg(Load<v16>(s + jb) - m) : v16{};
    Store(s + jb, p);
    lv += p;
  }
  const float l = HSum(lv);
  if (sum) *sum = l;
  return given ? given_lse : m + std::log(l);
}

// Vector type of one head_dim row: 16 lanes, or 8 for head_dim 8.
template <int64_t kD>
using RowVec = typename std::conditional<(kD >= 16), v16, v8>::type;

template <int64_t kD>
void ForwardTile(const Dims& d, const float* q, const float* k, const float* v, const int32_t* mask,
                 float* out, float* lse, int64_t task) {
  constexpr int64_t R = kD <= 32 ? 8 : 4;
  using V = RowVec<kD>;
  constexpr int64_t W = VecOf<V>::kWidth, C = kD / W;
  const int64_t b = task / d.K, kh = task % d.K;
  KvTile t(d, k, v, mask, b, kh, false);
  std::vector<float> s(R * t.Tp);
  for (int64_t g = 0; g < d.G; ++g) {
    const int64_t h = kh * d.G + g;
    for (int64_t i0 = 0; i0 < d.T; i0 += R) {
      const int64_t rows = std::min(R, d.T - i0), n = RoundUp(i0 + rows, kLanes);
      float qs[R][kD] = {}, l[R] = {};
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t e = 0; e < kD; ++e) qs[r][e] = q[((b * d.T + i0 + r) * d.H + h) * kD + e] * d.scale;
      RowsTimesKeys<R, kD>(qs, t.kT.data(), t.Tp, n, s.data());
      for (int64_t r = 0; r < R; ++r) {
        float* sr = s.data() + r * t.Tp;
        if (r >= rows) {
          std::fill(sr, sr + n, 0.0f);
          continue;
        }
        float sum;
        lse[(b * d.H + h) * d.T + i0 + r] = Softmax(sr, t.maskf.data(), i0 + r, n, 0.0f, false, &sum);
        l[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
      }
      V o[R][C] = {};
      for (int64_t j = 0; j < n; ++j) {
        V vr[C];
        for (int64_t c = 0; c < C; ++c) vr[c] = Load<V>(t.v.data() + j * kD + c * W);
        for (int64_t r = 0; r < R; ++r) {
          const float p = s[r * t.Tp + j];
          for (int64_t c = 0; c < C; ++c) o[r][c] += p * vr[c];
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) Store(out + ((b * d.T + i0 + r) * d.H + h) * kD + c * W, o[r][c] * l[r]);
    }
  }
}

// One pass over keys j < n for a block of R query rows (p, ds: their [R, Tp] probabilities and
// score gradients): dQ[r] += ds[r, j] K[j] (in registers), dK[j] += sum_r ds[r, j] Q[r] and
// dV[j] += sum_r p[r, j] dO[r] (each key row read and written once per block).
template <int64_t R, int64_t kD>
inline void KeyGrads(const float (&qu)[R][kD], const float (&dos)[R][kD], const float* p, const float* ds,
                     const KvTile& t, int64_t n, RowVec<kD> (&dqv)[R][kD / VecOf<RowVec<kD>>::kWidth],
                     float* dk_acc, float* dv_acc) {
  using V = RowVec<kD>;
  constexpr int64_t W = VecOf<V>::kWidth, C = kD / W;
  V qv[R][C], dov[R][C];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      qv[r][c] = Load<V>(&qu[r][c * W]);
      dov[r][c] = Load<V>(&dos[r][c * W]);
    }
  for (int64_t j = 0; j < n; ++j) {
    V kr[C], dkj[C] = {}, dvj[C] = {};
    for (int64_t c = 0; c < C; ++c) kr[c] = Load<V>(t.k.data() + j * kD + c * W);
    for (int64_t r = 0; r < R; ++r) {
      const float pr = p[r * t.Tp + j], dsr = ds[r * t.Tp + j];
      for (int64_t c = 0; c < C; ++c) {
        dqv[r][c] += dsr * kr[c];
        dkj[c] += dsr * qv[r][c];
        dvj[c] += pr * dov[r][c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      float* dkp = dk_acc + j * kD + c * W;
      float* dvp = dv_acc + j * kD + c * W;
      Store(dkp, Load<V>(dkp) + dkj[c]);
      Store(dvp, Load<V>(dvp) + dvj[c]);
    }
  }
}

// P = exp(S - lse), dP = dO V^T, dS = P (dP - rowsum(dO * O)) * scale, dQ = dS K, dK += dS^T Q,
// dV += P^T dO; dK / dV accumulate over the G query heads of this kv head.
template <int64_t kD>
void BackwardTile(const Dims& d, const float* q, const float* k, const float* v, const int32_t* mask,
                  const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                  int64_t task) {
  constexpr int64_t R = kD <= 32 ? 8 : 4;
  using V = RowVec<kD>;
  constexpr int64_t W = VecOf<V>::kWidth, C = kD / W;
  const int64_t b = task / d.K, kh = task % d.K;
  KvTile t(d, k, v, mask, b, kh, true);
  std::vector<float> s(R * t.Tp), dp(R * t.Tp), dk_acc(t.Tp * kD, 0.0f), dv_acc(t.Tp * kD, 0.0f);
  for (int64_t g = 0; g < d.G; ++g) {
    const int64_t h = kh * d.G + g;
    for (int64_t i0 = 0; i0 < d.T; i0 += R) {
      const int64_t rows = std::min(R, d.T - i0), n = RoundUp(i0 + rows, kLanes);
      float qu[R][kD] = {}, qs[R][kD] = {}, dos[R][kD] = {}, delta[R] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = ((b * d.T + i0 + r) * d.H + h) * kD;
        for (int64_t e = 0; e < kD; ++e) {
          qu[r][e] = q[row + e];
          qs[r][e] = q[row + e] * d.scale;
          dos[r][e] = dout[row + e];
          delta[r] += dout[row + e] * out[row + e];
        }
      }
      RowsTimesKeys<R, kD>(qs, t.kT.data(), t.Tp, n, s.data());
      RowsTimesKeys<R, kD>(dos, t.vT.data(), t.Tp, n, dp.data());
      for (int64_t r = 0; r < R; ++r) {
        float *sr = s.data() + r * t.Tp, *dpr = dp.data() + r * t.Tp;
        const float li = r < rows ? lse[(b * d.H + h) * d.T + i0 + r] : kEmpty;
        if (li == kEmpty) {
          std::fill(sr, sr + n, 0.0f);
          std::fill(dpr, dpr + n, 0.0f);
          continue;
        }
        Softmax(sr, t.maskf.data(), i0 + r, n, li, true);
        // dS carries the 1 / sqrt(D) of S = scale * Q K^T, for dQ = dS K and dK = dS^T Q alike
        for (int64_t jb = 0; jb < n; jb += kLanes)
          Store(dpr + jb, Load<v16>(sr + jb) * (Load<v16>(dpr + jb) - delta[r]) * d.scale);
      }
      V dqv[R][C] = {};
      KeyGrads<R, kD>(qu, dos, s.data(), dp.data(), t, n, dqv, dk_acc.data(), dv_acc.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) Store(dq + ((b * d.T + i0 + r) * d.H + h) * kD + c * W, dqv[r][c]);
    }
  }
  for (int64_t j = 0; j < d.T; ++j) {
    const int64_t row = ((b * d.T + j) * d.K + kh) * kD;
    std::copy(dk_acc.begin() + j * kD, dk_acc.begin() + (j + 1) * kD, dk + row);
    std::copy(dv_acc.begin() + j * kD, dv_acc.begin() + (j + 1) * kD, dv + row);
  }
}

ffi::Error GetDims(const ffi::AnyBuffer::Dimensions& qd, const ffi::AnyBuffer::Dimensions& kd,
                   const ffi::AnyBuffer::Dimensions& md, Dims& d) {
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("tgpo causal attention: q, k must be rank 4 and key_mask rank 2");
  d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], 0, 0.0f};
  if (kd[0] != d.B || kd[1] != d.T || kd[3] != d.D || md[0] != d.B || md[1] != d.T || d.K <= 0 || d.H % d.K)
    return ffi::Error::InvalidArgument("tgpo causal attention: shapes of q [B,T,H,D], k [B,T,K,D], mask [B,T] disagree");
  if (d.D != 8 && d.D != 16 && d.D != 32 && d.D != 64 && d.D != 128)
    return ffi::Error::InvalidArgument("tgpo causal attention: head_dim must be 8, 16, 32, 64 or 128");
  d.G = d.H / d.K;
  d.scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  return ffi::Error::Success();
}

template <typename F>
void DispatchD(int64_t D, F&& f) {
  switch (D) {
    case 8: f(std::integral_constant<int64_t, 8>{}); break;
    case 16: f(std::integral_constant<int64_t, 16>{}); break;
    case 32: f(std::integral_constant<int64_t, 32>{}); break;
    case 64: f(std::integral_constant<int64_t, 64>{}); break;
    case 128: f(std::integral_constant<int64_t, 128>{}); break;
  }
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> mask, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (ffi::Error e = GetDims(q.dimensions(), k.dimensions(), mask.dimensions(), d); e.failure()) return e;
  DispatchD(d.D, [&](auto kd) {
    ParallelFor(pool, d.B * d.K, [&](int64_t task) {
      ForwardTile<decltype(kd)::value>(d, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
                                       out->typed_data(), lse->typed_data(), task);
    });
  });
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                   ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (ffi::Error e = GetDims(q.dimensions(), k.dimensions(), mask.dimensions(), d); e.failure()) return e;
  DispatchD(d.D, [&](auto kd) {
    ParallelFor(pool, d.B * d.K, [&](int64_t task) {
      BackwardTile<decltype(kd)::value>(d, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
                                        out.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(),
                                        dk->typed_data(), dv->typed_data(), task);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TgpoCausalAttentionFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TgpoCausalAttentionBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
