// Single-pass CPU kernels for the per-step neuron updates (built on first use by
// stas_core/kernels.py; the PyTorch-op path is the fallback and the reference).
//
// Each kernel reads its inputs once and writes its outputs once per element, where the
// PyTorch-op form makes 5-13 passes over memory. Results are bitwise those of the
// reference: every step is one IEEE operation in the same order, and the build disables
// floating-point contraction (no fused multiply-add).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>  // Vectorized<float>::erf for the GELU (built for torch's CPU capability)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 16384;
constexpr int64_t kTile = 8192;  // membranes kept in cache across the T steps
constexpr int64_t kTileB = 2048;  // backward, moments: per-position sums of a tile kept in cache

// exp(x) for float in plain arithmetic (so loops vectorize): x = k ln2 + r, |r| <= ln2 / 2,
// a degree-6 polynomial for exp(r) and 2^k through the exponent bits; about 2 ulp. Used for
// the sigmoid surrogate's gradient only.
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = std::fma(-k, 1.428606765330187045e-06f, std::fma(-k, 0.693145751953125f, x));
  float p = 1.f / 720;  // Horner steps as explicit FMAs (the build turns contraction off)
  p = std::fma(p, r, 1.f / 120);
  p = std::fma(p, r, 1.f / 24);
  p = std::fma(p, r, 1.f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return p * scale;
}

using VecF = at::vec::Vectorized<float>;

// exp(x) on a vector: the polynomial and rounding of the scalar fast_exp, with fmadd as
// the fused multiply-add (a true FMA with AVX2/AVX-512 vectors, where every lane equals
// fast_exp of it; the portable DEFAULT vectors round the product first).
inline VecF fast_exp_vec(VecF x) {
  x = at::vec::minimum(at::vec::maximum(x, VecF(-87.f)), VecF(88.f));
  const VecF k = (x * VecF(1.44269504088896341f)).round();
  const VecF nk = k.neg();
  const VecF r = at::vec::fmadd(nk, VecF(1.428606765330187045e-06f),
                                at::vec::fmadd(nk, VecF(0.693145751953125f), x));
  VecF q(1.f / 720);
  q = at::vec::fmadd(q, r, VecF(1.f / 120));
  q = at::vec::fmadd(q, r, VecF(1.f / 24));
  q = at::vec::fmadd(q, r, VecF(1.f / 6));
  q = at::vec::fmadd(q, r, VecF(0.5f));
  q = at::vec::fmadd(q, r, VecF(1.f));
  q = at::vec::fmadd(q, r, VecF(1.f));
  using VecI = at::vec::Vectorized<int32_t>;
  const VecI bits = (at::vec::convert_to_int_of_same_size(k) + VecI(127)) << VecI(23);
  return q * at::vec::cast<float, int32_t>(bits);
}

template <typename T, typename I>
inline T nearest_pow2_signed(T u, I half, I keep) {
  // nearest power of two of |u| with the mantissa rounded ([0.75, 1.5) 2^k -> 2^k), sign
  // dropped: add half an exponent unit to the bits, keep the exponent field
  return __builtin_bit_cast(T, static_cast<I>((__builtin_bit_cast(I, u) + half) & keep));
}

// InPlace: the membrane is read from and written to vo (vv unused).
template <typename T, typename I, bool HasV, bool Grid, bool InPlace>
inline void fire_span(const T* __restrict vv, const T* __restrict xv, T* __restrict sv,
                      T* __restrict vo, int64_t len, T theta, T smallest, I half, I keep) {
  // locals, not captures: a store through T* could alias a captured T, which would stop
  // the loop from vectorising
  const T th = theta, lo = smallest, grid = static_cast<T>(1099511627776.0);  // 2^40, see
  const I h = half, k = keep;                                // TIE_GRID in convert/ops.py
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    T vi = (InPlace ? vo[i] : HasV ? vv[i] : T(0)) + xv[i];
    T u = vi / th;
    if (Grid) u = std::nearbyint(u * grid) / grid;
    T a = std::abs(u);
    T p = nearest_pow2_signed<T, I>(a, h, k);
    p = p < lo ? T(0) : p;
    T whole = std::floor(a);
    p = p < whole ? whole : p;  // torch.maximum without NaNs
    T sig = u < T(0) ? -p : p;
    T si = sig * th;
    sv[i] = si;
    vo[i] = vi - si;
  }
}

// x: n elements in rows of ``width`` at element offsets ``row_at`` (null: contiguous);
// v, s, v_out contiguous.
template <typename T, typename I, bool HasV, bool Grid, bool InPlace>
void fire_loop(const T* v, const T* x, const int64_t* row_at, int64_t width, T* s, T* v_out,
               int64_t n, T theta, T smallest, I half, I keep) {
  if (!row_at) {
    at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
      fire_span<T, I, HasV, Grid, InPlace>(HasV ? v + begin : nullptr, x + begin, s + begin,
                                  v_out + begin, end - begin, theta, smallest, half, keep);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(width, 1));
  at::parallel_for(0, n / width, grain, [=](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t o = r * width;
      fire_span<T, I, HasV, Grid, InPlace>(HasV ? v + o : nullptr, x + row_at[r], s + o, v_out + o,
                                  width, theta, smallest, half, keep);
    }
  });
}

template <typename T, typename I, bool Grid>
void fire_dispatch(const T* v, const T* x, const int64_t* row_at, int64_t width, T* s,
                   T* v_out, int64_t n, T theta, T smallest, I half, I keep) {
  if (v == v_out) {
    fire_loop<T, I, true, Grid, true>(nullptr, x, row_at, width, s, v_out, n, theta, smallest,
                                      half, keep);
  } else if (v) {
    fire_loop<T, I, true, Grid, false>(v, x, row_at, width, s, v_out, n, theta, smallest, half,
                                       keep);
  } else {
    fire_loop<T, I, false, Grid, false>(v, x, row_at, width, s, v_out, n, theta, smallest,
                                        half, keep);
  }
}

// Element offsets of the rows of x (its last dim, contiguous, is a row), or empty when x
// is contiguous. A view such as a chunk of Q/K/V or its heads is then read where it lies,
// without the copy .contiguous() would make.
std::vector<int64_t> row_offsets(const at::Tensor& x) {
  std::vector<int64_t> at;
  if (x.is_contiguous() || x.numel() == 0) return at;
  const int64_t dims = x.dim(), width = x.size(dims - 1), rows = x.numel() / width;
  at.resize(rows);
  std::vector<int64_t> idx(dims > 1 ? dims - 1 : 0, 0);
  int64_t off = 0;
  for (int64_t r = 0; r < rows; ++r) {
    at[r] = off;
    for (int64_t d = dims - 2; d >= 0; --d) {  // next row: an odometer over the leading dims
      off += x.stride(d);
      if (++idx[d] < x.size(d)) break;
      off -= x.stride(d) * x.size(d);
      idx[d] = 0;
    }
  }
  return at;
}

// One step of the signed multi-threshold neuron (convert/ops.py: integrate_and_fire):
// returns (emitted value, new membrane) for membrane v (None: at rest) and input x. With
// in_place (and a contiguous v) the new membrane is written over v, which is returned.
std::vector<at::Tensor> multi_threshold_fire(const c10::optional<at::Tensor>& v_opt,
                                             const at::Tensor& x_in, double theta,
                                             double smallest, bool in_place) {
  TORCH_CHECK(x_in.device().is_cpu(), "multi_threshold_fire: CPU tensors only");
  // rows of a view are read in place when its last dim is contiguous; else one copy
  at::Tensor x = x_in.dim() >= 2 && x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  const std::vector<int64_t> rows = row_offsets(x);
  const int64_t* row_at = rows.empty() ? nullptr : rows.data();
  const int64_t width = x.dim() ? x.size(-1) : 1;
  at::Tensor v;
  if (v_opt.has_value() && v_opt->defined()) {
    TORCH_CHECK(v_opt->sizes() == x.sizes() && v_opt->scalar_type() == x.scalar_type(),
                "multi_threshold_fire: membrane and input differ in shape or dtype");
    v = v_opt->contiguous();
  }
  at::Tensor s = at::empty(x.sizes(), x.options());  // contiguous, as the input's copy was
  const bool over = in_place && v.defined() && v.is_same(*v_opt);
  at::Tensor v_out = over ? v : at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    fire_dispatch<float, int32_t, false>(
        v.defined() ? v.data_ptr<float>() : nullptr, x.data_ptr<float>(), row_at, width,
        s.data_ptr<float>(), v_out.data_ptr<float>(), n, static_cast<float>(theta),
        static_cast<float>(smallest), 0x00400000, 0x7F800000);
  } else if (x.scalar_type() == at::kDouble) {
    fire_dispatch<double, int64_t, true>(
        v.defined() ? v.data_ptr<double>() : nullptr, x.data_ptr<double>(), row_at, width,
        s.data_ptr<double>(), v_out.data_ptr<double>(), n, theta, smallest,
        int64_t(1) << 51, INT64_C(0x7FF0000000000000));
  } else {
    TORCH_CHECK(false, "multi_threshold_fire: float32 or float64 only");
  }
  return {s, v_out};
}

// The LIF update of one step on a tile: H = V * decay + scale * X + bias, S = H >= thr,
// then the reset. The forward and the backward's recomputation share it, so the
// recomputed membranes are bit for bit the forward's (x * 1 and h + 0 are exact, so the
// Python reference's shortcuts agree). Inner loop contiguous and branch-free; the
// parameters are copied to locals so that no store can alias them.
struct LifParams {
  float decay, scale, bias, thr, reset;
};

// BN: the step's input is first normalised per channel, y = x * ca[j] + cb[j] (the
// BatchNorm folded to one multiply and one add; ca, cb expanded to the tile, channel
// innermost), then charged as above.
template <bool Soft, bool StoreS, bool StoreH, bool BN = false>
inline void lif_tile_step(const LifParams& p, const float* __restrict xt, float* __restrict v,
                          float* __restrict st, float* __restrict ht, int64_t len,
                          const float* __restrict ca = nullptr,
                          const float* __restrict cb = nullptr) {
  const float d = p.decay, sc = p.scale, b = p.bias, thr = p.thr, rst = p.reset;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    float xi = xt[j];
    if (BN) {
      xi = xi * ca[j];
      xi = xi + cb[j];
    }
    float hi = v[j] * d;
    hi = hi + sc * xi;
    hi = hi + b;
    const float si = hi >= thr ? 1.f : 0.f;
    if (StoreH) ht[j] = hi;
    if (StoreS) st[j] = si;
    v[j] = Soft ? hi - thr * si : (hi >= thr ? rst : hi);
  }
}

// Tiles of whole channel rows. With the channel innermost (a contiguous [..., C], or a
// channels-last activation in its memory order), a tile of L = C * rows elements that
// starts at a multiple of L starts at channel 0, so per-channel parameters are expanded
// once to L entries and every inner loop stays contiguous. Without channels, L = target.
inline int64_t channel_tile(int64_t channels, int64_t target) {
  return channels > 0 ? channels * std::max<int64_t>(1, target / channels) : target;
}

std::vector<float> expand(const at::Tensor& per_channel, int64_t len) {
  const at::Tensor c = per_channel.contiguous().to(at::kFloat);
  const float* p = c.data_ptr<float>();
  const int64_t channels = c.numel();
  std::vector<float> out(static_cast<size_t>(len));
  for (int64_t j = 0; j < len; ++j) out[j] = p[j % channels];
  return out;
}

// Tiles 0 .. tiles-1 split into `count` consecutive chunks of `per` tiles: a chunk owns its
// partial sums, so a reduction's result does not depend on how threads pick chunks.
struct Chunks {
  int64_t count, per;
  explicit Chunks(int64_t tiles) {
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(tiles, 4 * at::get_num_threads()));
    per = tiles > 0 ? (tiles + want - 1) / want : 1;
    count = tiles > 0 ? (tiles + per - 1) / per : 0;
  }
};

// The chunks' partial sums (count x width, float64) added in chunk order: a fixed
// summation order.
at::Tensor sum_chunks(const std::vector<double>& part, int64_t count, int64_t width) {
  at::Tensor sums = at::zeros({width}, at::TensorOptions().dtype(at::kDouble));
  double* sp = sums.data_ptr<double>();
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t i = 0; i < width; ++i) sp[i] += part[c * width + i];
  }
  return sums;
}

void check_channels(const at::Tensor& x, int64_t per_step, int64_t channels, const char* who) {
  TORCH_CHECK(channels > 0 && per_step % channels == 0, who,
              ": the channel count must divide the elements of a step (channel innermost)");
}

// A BatchNorm folded into a neuron step (ca, cb given; none: off), expanded to tiles of
// whole channel rows of about `target` elements (channel_tile).
struct Fold {
  bool on;
  int64_t channels, tile;
  std::vector<float> a, b;
  Fold(const c10::optional<at::Tensor>& ca, const c10::optional<at::Tensor>& cb,
       const at::Tensor& x, int64_t per_step, int64_t target, const char* who)
      : on(ca.has_value() && ca->defined()), channels(on ? ca->numel() : 0) {
    if (on) check_channels(x, per_step, channels, who);
    tile = channel_tile(channels, target);
    if (on) a = expand(*ca, tile), b = expand(*cb, tile);
  }
};

// Forward of a LIF/IF over x_seq[T, ...] (stas_core/neurons.py: _FusedNeuronFn.forward):
// per element the membrane stays in a register across the T steps. Returns
// (spikes[T, ...], last membrane). Nothing else is written: the backward recomputes the
// membranes from x_seq (one store per element and step fewer than saving them).
// With ca, cb ([C], channel innermost) the input is first batch-normalised, x * ca + cb
// (stas_core/neurons.py: _KernelBNNeuronFn): BatchNorm and neuron in one pass.
std::vector<at::Tensor> lif_forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& v0_opt,
                                    double decay, double scale, double bias, double v_th,
                                    c10::optional<double> v_reset,
                                    const c10::optional<at::Tensor>& ca_opt,
                                    const c10::optional<at::Tensor>& cb_opt) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "lif_forward: float32 CPU tensors only");
  at::Tensor x = x_in.contiguous();
  const int64_t steps = x.size(0);
  const int64_t n = steps ? x.numel() / steps : 0;
  at::Tensor v0;
  if (v0_opt.has_value() && v0_opt->defined()) v0 = v0_opt->contiguous();
  const Fold fold(ca_opt, cb_opt, x, n, kTile, "lif_forward");
  const bool bn = fold.on;
  const int64_t tile = fold.tile;
  at::Tensor s = at::empty_like(x);
  at::Tensor v_last = at::empty(x.sizes().slice(1), x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = v0.defined() ? v0.data_ptr<float>() : nullptr;
  float* sp = s.data_ptr<float>();
  float* vl = v_last.data_ptr<float>();
  const float* pa = fold.a.data();
  const float* pb = fold.b.data();
  const LifParams prm{static_cast<float>(decay), static_cast<float>(scale),
                      static_cast<float>(bias), static_cast<float>(v_th),
                      v_reset.has_value() ? static_cast<float>(*v_reset) : 0.f};
  const int64_t tiles = (n + tile - 1) / tile;
  auto run = [&](auto soft_tag, auto bn_tag) {
    constexpr bool Soft = decltype(soft_tag)::value;
    constexpr bool BN = decltype(bn_tag)::value;
    at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / tile), [=](int64_t tb, int64_t te) {
      std::vector<float> v(static_cast<size_t>(tile));  // stays in cache over the T steps
      for (int64_t k = tb; k < te; ++k) {
        const int64_t b0 = k * tile, len = std::min<int64_t>(tile, n - b0);
        for (int64_t j = 0; j < len; ++j) v[j] = vp ? vp[b0 + j] : 0.f;
        for (int64_t t = 0; t < steps; ++t) {
          lif_tile_step<Soft, true, false, BN>(prm, xp + t * n + b0, v.data(), sp + t * n + b0,
                                               nullptr, len, pa, pb);
        }
        for (int64_t j = 0; j < len; ++j) vl[b0 + j] = v[j];
      }
    });
  };
  using Y = std::true_type;
  using N = std::false_type;
  if (v_reset.has_value()) bn ? run(N{}, Y{}) : run(N{}, N{});
  else bn ? run(Y{}, Y{}) : run(Y{}, N{});
  return {s, v_last};
}

// Backward of lif_forward through time, with the sigmoid (kind 0) or atan (kind 1)
// surrogate of slope alpha (stas_core/neurons.py: Sigmoid, ATan; _FusedNeuronFn.backward).
// Per vector of elements, the T membranes are first recomputed from the forward's input x
// (and v0), then walked backwards with everything else in registers (at::vec, so 16 lanes
// where torch runs AVX-512; the compiler's own vectorisation of the scalar form used 8 and
// kept the running gradient in memory: 0.86 -> 0.61 ns per element on [4, 100352, 64]).
// Returns (grad x, grad v0).
// With ca, cb (the BatchNorm of lif_forward) the first output is the gradient of the
// normalised input y = x * ca + cb, and two more follow: its per-channel sums, sum(gy)
// and sum(gy * x), in float64 (summed in float over a tile's T steps, then in float64:
// what the BatchNorm's backward reduces over; see bn_backward_input).
std::vector<at::Tensor> lif_backward(const at::Tensor& x_in, const c10::optional<at::Tensor>& v0_opt,
                                     const c10::optional<at::Tensor>& gs_opt,
                                     const c10::optional<at::Tensor>& gv_opt, double decay,
                                     double scale, double bias, double v_th,
                                     c10::optional<double> v_reset, bool detach_reset,
                                     int64_t kind, double alpha,
                                     const c10::optional<at::Tensor>& ca_opt,
                                     const c10::optional<at::Tensor>& cb_opt) {
  at::Tensor x = x_in.contiguous();
  const int64_t steps = x.size(0);
  const int64_t n = steps ? x.numel() / steps : 0;
  at::Tensor v0, gs, gv;
  if (v0_opt.has_value() && v0_opt->defined()) v0 = v0_opt->contiguous();
  gs = (gs_opt.has_value() && gs_opt->defined()) ? gs_opt->contiguous() : at::zeros_like(x);
  if (gv_opt.has_value() && gv_opt->defined()) gv = gv_opt->contiguous();
  const Fold fold(ca_opt, cb_opt, x, n, kTileB, "lif_backward");
  const bool bn = fold.on;
  const int64_t channels = fold.channels, tile = fold.tile;
  at::Tensor gx = at::empty_like(x);
  at::Tensor gv0 = at::empty(x.sizes().slice(1), x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = v0.defined() ? v0.data_ptr<float>() : nullptr;
  const float* gsp = gs.data_ptr<float>();
  const float* gvp = gv.defined() ? gv.data_ptr<float>() : nullptr;
  float* gxp = gx.data_ptr<float>();
  float* g0 = gv0.data_ptr<float>();
  const float* pa = fold.a.data();
  const float* pb = fold.b.data();
  const float fd = decay, fs = scale, th = v_th, a = alpha;
  const bool soft = !v_reset.has_value();
  const float vr = soft ? 0.f : static_cast<float>(*v_reset);
  const LifParams prm{fd, fs, static_cast<float>(bias), th, vr};
  const float half_pi_a = static_cast<float>(M_PI / 2 * alpha), half_a = static_cast<float>(alpha / 2);
  const int64_t tiles = (n + tile - 1) / tile;
  const Chunks chunks(tiles);
  std::vector<double> part(bn ? static_cast<size_t>(chunks.count * 2 * channels) : 0, 0.0);
  double* partp = part.data();
  auto run = [&](auto kind_tag, auto soft_tag, auto detach_tag, auto bn_tag) {
    constexpr int Kind = decltype(kind_tag)::value;
    constexpr bool Soft = decltype(soft_tag)::value;
    constexpr bool Detach = decltype(detach_tag)::value;
    constexpr bool BN = decltype(bn_tag)::value;
    at::parallel_for(0, chunks.count, 1, [=](int64_t cb0, int64_t ce) {
      constexpr int64_t W = VecF::size();
      const VecF dv(fd), scv(fs), bv(static_cast<float>(prm.bias)), thrv(th), rstv(vr), alv(a),
          hpav(half_pi_a), hav(half_a), one(1.f), zero(0.f);
      std::vector<float> hbuf(static_cast<size_t>(steps * W));  // one vector's T membranes
      float* __restrict hv = hbuf.data();
      // BN sums: float over a tile's T steps, then float64 over the chunk's tiles
      std::vector<float> tile_g(BN ? tile : 0), tile_gx(BN ? tile : 0);
      std::vector<double> sum_g(BN ? tile : 0), sum_gx(BN ? tile : 0);
      float* __restrict tg = tile_g.data();
      float* __restrict tgx = tile_gx.data();
      double* __restrict sg_acc = sum_g.data();
      double* __restrict sgx_acc = sum_gx.data();
      for (int64_t c = cb0; c < ce; ++c) {
        if (BN) std::fill(sum_g.begin(), sum_g.end(), 0.0), std::fill(sum_gx.begin(), sum_gx.end(), 0.0);
        const int64_t k_end = std::min<int64_t>(tiles, (c + 1) * chunks.per);
        for (int64_t k = c * chunks.per; k < k_end; ++k) {
          const int64_t b0 = k * tile, len = std::min<int64_t>(tile, n - b0);
          // One vector of elements at a time: its T membranes recomputed into hv (L1),
          // then walked backwards with the membrane's gradient and the BatchNorm's sums in
          // registers. Per element: x and the spikes' gradient read once from memory, the
          // gradient written once. The same IEEE operations, in the same order, as
          // lif_tile_step and the scalar form this replaced (the spikes are bitwise the
          // forward's); a tail is a partial vector, so no lane depends on where it lies.
          for (int64_t j = 0; j < len; j += W) {
            const int lanes = static_cast<int>(std::min<int64_t>(W, len - j));
            const int64_t e = b0 + j;
            VecF ca, cb;
            if (BN) ca = VecF::loadu(pa + j, lanes), cb = VecF::loadu(pb + j, lanes);
            VecF v = vp ? VecF::loadu(vp + e, lanes) : zero;
            for (int64_t t = 0; t < steps; ++t) {
              VecF xi = VecF::loadu(xp + t * n + e, lanes);
              if (BN) xi = xi * ca + cb;
              const VecF hi = v * dv + scv * xi + bv;
              hi.store(hv + t * W);
              v = Soft ? hi - thrv * hi.ge(thrv) : VecF::blendv(hi, rstv, hi >= thrv);
            }
            VecF g_v = gvp ? VecF::loadu(gvp + e, lanes) : zero;
            VecF sum_g = zero, sum_gx = zero;
            for (int64_t t = steps - 1; t >= 0; --t) {
              const VecF hi = VecF::loadu(hv + t * W);
              VecF sg;
              if (Kind == 0) {
                const VecF sig = one / (one + fast_exp_vec((alv * (hi - thrv)).neg()));
                sg = alv * sig * (one - sig);
              } else {
                const VecF u = hpav * (hi - thrv);
                sg = hav / (one + u * u);
              }
              VecF g_h = sg * VecF::loadu(gsp + t * n + e, lanes);
              if (Soft) {
                g_h = g_h + g_v;
                if (!Detach) g_h = g_h - (thrv * sg) * g_v;
              } else {
                g_h = g_h + g_v * hi.lt(thrv);
                if (!Detach) g_h = g_h + g_v * (rstv - hi) * sg;
              }
              const VecF g_in = g_h * scv;
              g_in.store(gxp + t * n + e, lanes);
              if (BN) {
                sum_g = sum_g + g_in;
                sum_gx = sum_gx + g_in * VecF::loadu(xp + t * n + e, lanes);
              }
              g_v = g_h * dv;
            }
            g_v.store(g0 + e, lanes);
            if (BN) sum_g.store(tg + j, lanes), sum_gx.store(tgx + j, lanes);
          }
          if (BN) {
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              sg_acc[j] += static_cast<double>(tg[j]);
              sgx_acc[j] += static_cast<double>(tgx[j]);
            }
          }
        }
        if (BN) {  // fold the tile positions onto their channels
          double* out = partp + c * 2 * channels;
          for (int64_t j = 0; j < tile; ++j) {
            out[j % channels] += sg_acc[j];
            out[channels + j % channels] += sgx_acc[j];
          }
        }
      }
    });
  };
  using T0 = std::integral_constant<int, 0>;
  using T1 = std::integral_constant<int, 1>;
  using Y = std::true_type;
  using N = std::false_type;
  auto by_bn = [&](auto k, auto s, auto d) { bn ? run(k, s, d, Y{}) : run(k, s, d, N{}); };
  if (kind == 0) {
    if (soft) detach_reset ? by_bn(T0{}, Y{}, Y{}) : by_bn(T0{}, Y{}, N{});
    else detach_reset ? by_bn(T0{}, N{}, Y{}) : by_bn(T0{}, N{}, N{});
  } else {
    if (soft) detach_reset ? by_bn(T1{}, Y{}, Y{}) : by_bn(T1{}, Y{}, N{});
    else detach_reset ? by_bn(T1{}, N{}, Y{}) : by_bn(T1{}, N{}, N{});
  }
  if (!bn) return {gx, gv0};
  const at::Tensor sums = sum_chunks(part, chunks.count, 2 * channels).view({2, channels});
  return {gx, gv0, sums[0], sums[1]};
}

// Per-channel sum and sum of squares of x (channel innermost), in float64: the batch
// statistics of a BatchNorm in one read of its input. Returns [2, C] float64.
at::Tensor channel_moments(const at::Tensor& x_in, int64_t channels) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "channel_moments: float32 CPU tensors only");
  at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  check_channels(x, n, channels, "channel_moments");
  const int64_t tile = channel_tile(channels, kTileB);
  const int64_t tiles = (n + tile - 1) / tile;
  const Chunks chunks(tiles);
  std::vector<double> part(static_cast<size_t>(chunks.count * 2 * channels), 0.0);
  double* partp = part.data();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, chunks.count, 1, [=](int64_t cb0, int64_t ce) {
    std::vector<double> s1(tile), s2(tile);
    double* __restrict a1 = s1.data();
    double* __restrict a2 = s2.data();
    for (int64_t c = cb0; c < ce; ++c) {
      std::fill(s1.begin(), s1.end(), 0.0), std::fill(s2.begin(), s2.end(), 0.0);
      const int64_t k_end = std::min<int64_t>(tiles, (c + 1) * chunks.per);
      for (int64_t k = c * chunks.per; k < k_end; ++k) {
        const int64_t b0 = k * tile, len = std::min<int64_t>(tile, n - b0);
        const float* __restrict xt = xp + b0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const double xi = xt[j];
          a1[j] += xi;
          a2[j] += xi * xi;
        }
      }
      double* out = partp + c * 2 * channels;
      for (int64_t j = 0; j < tile; ++j) {
        out[j % channels] += a1[j];
        out[channels + j % channels] += a2[j];
      }
    }
  });
  return sum_chunks(part, chunks.count, 2 * channels).view({2, channels});
}

// The input gradient of a BatchNorm, in place on gy (channel innermost):
// gx = (gy - k1 - (x - mean) * k2) * k0 per channel (training: k0 = weight * invstd,
// k1 = mean of gy, k2 = invstd^2 * mean of gy * (x - mean); evaluation: k1 = k2 = 0).
void bn_backward_input(at::Tensor& gy, const at::Tensor& x_in, const at::Tensor& mean,
                       const at::Tensor& k0, const at::Tensor& k1, const at::Tensor& k2) {
  TORCH_CHECK(gy.is_contiguous() && gy.scalar_type() == at::kFloat && gy.sizes() == x_in.sizes(),
              "bn_backward_input: gy must be a contiguous float32 tensor shaped like x");
  at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel(), channels = mean.numel();
  check_channels(x, n, channels, "bn_backward_input");
  const int64_t tile = channel_tile(channels, kTileB);
  const std::vector<float> em = expand(mean, tile), e0 = expand(k0, tile),
                           e1 = expand(k1, tile), e2 = expand(k2, tile);
  const float* pm = em.data();
  const float* p0 = e0.data();
  const float* p1 = e1.data();
  const float* p2 = e2.data();
  const float* xp = x.data_ptr<float>();
  float* gp = gy.data_ptr<float>();
  const int64_t tiles = (n + tile - 1) / tile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kGrain / tile), [=](int64_t tb, int64_t te) {
    for (int64_t k = tb; k < te; ++k) {
      const int64_t b0 = k * tile, len = std::min<int64_t>(tile, n - b0);
      const float* __restrict xt = xp + b0;
      float* __restrict gt = gp + b0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        float g = gt[j] - p1[j];
        g = g - (xt[j] - pm[j]) * p2[j];
        gt[j] = g * p0[j];
      }
    }
  });
}

// One LIF step on gathered rows, in place (token halting's row execution at inference):
// row i of x ([M, W]) charges row index[i] of the dense membrane v_full ([rows, W]), which
// is updated where it lies; returns the spikes [M, W]. The same step as lif_forward with
// T = 1 on v_full.index_select(0, index), bit for bit, without the gather and scatter of
// the state. ca, cb ([C], C dividing W): a BatchNorm folded in, as in lif_forward.
at::Tensor lif_rows_step(at::Tensor v_full, const at::Tensor& index, const at::Tensor& x_in,
                         double decay, double scale, double bias, double v_th,
                         c10::optional<double> v_reset, const c10::optional<at::Tensor>& ca_opt,
                         const c10::optional<at::Tensor>& cb_opt) {
  TORCH_CHECK(v_full.device().is_cpu() && v_full.scalar_type() == at::kFloat &&
                  v_full.is_contiguous() && x_in.scalar_type() == at::kFloat,
              "lif_rows_step: a contiguous float32 CPU membrane and float32 rows only");
  at::Tensor x = x_in.contiguous();
  const at::Tensor idx = index.contiguous().to(at::kLong);
  const int64_t rows = x.size(0), total = v_full.size(0);
  const int64_t width = rows ? x.numel() / rows : 0;
  TORCH_CHECK(idx.numel() == rows && (total == 0 || v_full.numel() / total == width),
              "lif_rows_step: rows, index and membrane rows differ in shape");
  const Fold fold(ca_opt, cb_opt, x, width, width, "lif_rows_step");  // tile: one row
  const bool bn = fold.on;
  at::Tensor s = at::empty_like(x);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < total, "lif_rows_step: index out of range");
  }
  const float* xp = x.data_ptr<float>();
  float* vp = v_full.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  const float* pa = fold.a.data();
  const float* pb = fold.b.data();
  const LifParams prm{static_cast<float>(decay), static_cast<float>(scale),
                      static_cast<float>(bias), static_cast<float>(v_th),
                      v_reset.has_value() ? static_cast<float>(*v_reset) : 0.f};
  auto run = [&](auto soft_tag, auto bn_tag) {
    constexpr bool Soft = decltype(soft_tag)::value;
    constexpr bool BN = decltype(bn_tag)::value;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(width, 1));
    at::parallel_for(0, rows, grain, [=](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i) {
        lif_tile_step<Soft, true, false, BN>(prm, xp + i * width, vp + ip[i] * width,
                                             sp + i * width, nullptr, width, pa, pb);
      }
    });
  };
  using Y = std::true_type;
  using N = std::false_type;
  if (v_reset.has_value()) bn ? run(N{}, Y{}) : run(N{}, N{});
  else bn ? run(Y{}, Y{}) : run(Y{}, N{});
  return s;
}

// ---------------------------------------------------------------------------------------
// Max pooling of channels-last float32 images (stas_core/layers.py: MaxPool2d), dilation 1,
// floor mode. The forward stores, per output, the window offset of its maximum as one byte
// (kh * kw_size + kw, counted from the unclipped window's corner), not ATen's int64 input
// index: 8x less to write and read back. The first maximum in the window's row-major
// order wins, NaN beats everything (ATen's rule, so ties, which spikes make common, go
// where ATen sends them). The backward gathers: each input element sums the gradients of
// the windows whose maximum it is, in increasing output order (ATen's scatter order, so the
// sums are bitwise ATen's), and is written once: no zero fill, no scatter.
struct Pool {
  int64_t kh, kw, sh, sw, ph, pw;
};

inline void check_pool(const at::Tensor& t, const Pool& p, const char* who) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4, who,
              ": a float32 CPU [N, C, H, W] tensor only");
  TORCH_CHECK(p.kh > 0 && p.kw > 0 && p.kh * p.kw <= 255 && p.sh > 0 && p.sw > 0 &&
                  p.ph >= 0 && p.pw >= 0 && 2 * p.ph <= p.kh && 2 * p.pw <= p.kw,
              who, ": window of at most 255 elements, padding at most half the window");
}

// Returns (output, window offsets) channels-last; with_index false: the output only (the
// offsets left undefined), for inference.
std::vector<at::Tensor> max_pool_forward(const at::Tensor& x_in, int64_t kh, int64_t kw,
                                         int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                         bool with_index) {
  const Pool p{kh, kw, sh, sw, ph, pw};
  check_pool(x_in, p, "max_pool_forward");
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h + 2 * ph >= kh && w + 2 * pw >= kw,
              "max_pool_forward: the window is larger than the padded input");
  const int64_t oh = (h + 2 * ph - kh) / sh + 1, ow = (w + 2 * pw - kw) / sw + 1;
  at::Tensor y = at::empty({n, c, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor idx;
  if (with_index) {
    idx = at::empty({n, c, oh, ow},
                    x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* ip = with_index ? idx.data_ptr<uint8_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(ow * c * kh * kw, 1));
  at::parallel_for(0, n * oh, grain, [=](int64_t rb, int64_t re) {
    std::vector<int32_t> arg(static_cast<size_t>(c));  // offsets as int32: the compare and
    int32_t* __restrict a = arg.data();                 // select then vectorise at one width
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = r / oh, i = r % oh;
      const int64_t h0 = i * p.sh - p.ph;
      const int64_t hs = std::max<int64_t>(h0, 0), he = std::min<int64_t>(h0 + p.kh, h);
      for (int64_t j = 0; j < ow; ++j) {
        const int64_t w0 = j * p.sw - p.pw;
        const int64_t ws = std::max<int64_t>(w0, 0), we = std::min<int64_t>(w0 + p.kw, w);
        float* __restrict m = yp + (r * ow + j) * c;
        const int32_t first = static_cast<int32_t>((hs - h0) * p.kw + (ws - w0));
        for (int64_t ch = 0; ch < c; ++ch) m[ch] = -std::numeric_limits<float>::infinity();
        for (int64_t ch = 0; ch < c; ++ch) a[ch] = first;
        for (int64_t u = hs; u < he; ++u) {
          for (int64_t v = ws; v < we; ++v) {
            const float* __restrict src = xp + ((b * h + u) * w + v) * c;
            const int32_t off = static_cast<int32_t>((u - h0) * p.kw + (v - w0));
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) {
              const float val = src[ch];
              const bool take = val > m[ch] || val != val;
              m[ch] = take ? val : m[ch];
              a[ch] = take ? off : a[ch];
            }
          }
        }
        if (ip) {
          uint8_t* __restrict dst = ip + (r * ow + j) * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) dst[ch] = static_cast<uint8_t>(a[ch]);
        }
      }
    }
  });
  return {y, idx};
}

// The input gradient [N, C, h, w] (channels-last) of max_pool_forward from the output
// gradient gy and the window offsets.
at::Tensor max_pool_backward(const at::Tensor& gy_in, const at::Tensor& idx_in, int64_t h,
                             int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                             int64_t ph, int64_t pw) {
  const Pool p{kh, kw, sh, sw, ph, pw};
  check_pool(gy_in, p, "max_pool_backward");
  const at::Tensor gy = gy_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor idx = idx_in.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.sizes() == gy.sizes(),
              "max_pool_backward: offsets must be uint8 and shaped like the gradient");
  const int64_t n = gy.size(0), c = gy.size(1), oh = gy.size(2), ow = gy.size(3);
  TORCH_CHECK(h + 2 * ph >= kh && w + 2 * pw >= kw &&
                  (h + 2 * ph - kh) / sh + 1 == oh && (w + 2 * pw - kw) / sw + 1 == ow,
              "max_pool_backward: input size does not give the gradient's size");
  at::Tensor gx = at::empty({n, c, h, w}, gy.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* gp = gy.data_ptr<float>();
  const uint8_t* ip = idx.data_ptr<uint8_t>();
  float* xp = gx.data_ptr<float>();
  // windows i with i * s - p <= u <= i * s - p + k - 1, inside [0, out)
  auto first_window = [](int64_t u, int64_t k, int64_t s, int64_t pad) {
    const int64_t lo = u + pad - k + 1;
    return lo <= 0 ? int64_t(0) : (lo + s - 1) / s;
  };
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(w * c, 1));
  at::parallel_for(0, n * h, grain, [=](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = r / h, u = r % h;
      const int64_t is = first_window(u, p.kh, p.sh, p.ph);
      const int64_t ie = std::min<int64_t>((u + p.ph) / p.sh, oh - 1);
      for (int64_t v = 0; v < w; ++v) {
        const int64_t js = first_window(v, p.kw, p.sw, p.pw);
        const int64_t je = std::min<int64_t>((v + p.pw) / p.sw, ow - 1);
        float* __restrict g = xp + (r * w + v) * c;
        for (int64_t ch = 0; ch < c; ++ch) g[ch] = 0.f;
        for (int64_t i = is; i <= ie; ++i) {
          for (int64_t j = js; j <= je; ++j) {
            const int64_t o = ((b * oh + i) * ow + j) * c;
            const float* __restrict go = gp + o;
            const uint8_t* __restrict io = ip + o;
            const uint8_t off = static_cast<uint8_t>((u - (i * p.sh - p.ph)) * p.kw +
                                                     (v - (j * p.sw - p.pw)));
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) g[ch] += io[ch] == off ? go[ch] : 0.f;
          }
        }
      }
    }
  });
  return gx;
}

// ---------------------------------------------------------------------------------------
// GELU (erf form) and its expectation compensation (convert/ops.py: compensated_update).
// The GELU runs the same vector code on every element, tails included (a masked load), so
// it does not depend on how the work is split; it differs from torch's own GELU by float32
// rounding, which is why the converted model uses this one everywhere on the CPU.

// erf(x) as an odd rational function x P(x^2) / Q(x^2) of degrees 13 / 8 on [-4, 4] (the
// minimax fit Eigen and XLA use; float32 erf is +-1 beyond), clamped to [-1, 1]: the fit
// is within 6.5e-8 of erf, and the float32 GELU built on it within 1.0e-6 of float64
// (tested on a fine grid); one division and 12 multiply-adds, about half the time of
// at::vec's erf (an exponential per element) in the compensated GELU.
inline VecF erf_vec(VecF x) {
  const VecF one(1.f), minus_one(-1.f);
  x = at::vec::minimum(at::vec::maximum(x, VecF(-4.f)), VecF(4.f));
  const VecF x2 = x * x;
  VecF p = at::vec::fmadd(x2, VecF(-2.72614225801306e-10f), VecF(2.77068142495902e-08f));
  p = at::vec::fmadd(x2, p, VecF(-2.10102402082508e-06f));
  p = at::vec::fmadd(x2, p, VecF(-5.69250639462346e-05f));
  p = at::vec::fmadd(x2, p, VecF(-7.34990630326855e-04f));
  p = at::vec::fmadd(x2, p, VecF(-2.95459980854025e-03f));
  p = at::vec::fmadd(x2, p, VecF(-1.60960333262415e-02f));
  VecF q = at::vec::fmadd(x2, VecF(-1.45660718464996e-05f), VecF(-2.13374055278905e-04f));
  q = at::vec::fmadd(x2, q, VecF(-1.68282697438203e-03f));
  q = at::vec::fmadd(x2, q, VecF(-7.37332916720468e-03f));
  q = at::vec::fmadd(x2, q, VecF(-1.42647390514189e-02f));
  return at::vec::minimum(at::vec::maximum(x * p / q, minus_one), one);
}

inline VecF gelu_vec(VecF x) {
  const VecF alpha(static_cast<float>(M_SQRT1_2)), one(1.f), half(0.5f);
  return x * half * (one + erf_vec(x * alpha));
}

// Apply op(offset, lanes) over [0, n) in vectors, in parallel; ``lanes`` < VecF::size()
// only for the last vector.
template <typename Op>
void for_vectors(int64_t n, const Op& op) {
  const int64_t width = VecF::size();
  const int64_t vectors = (n + width - 1) / width;
  at::parallel_for(0, vectors, kGrain / width, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t o = i * width;
      op(o, static_cast<int>(std::min<int64_t>(width, n - o)));
    }
  });
}

void check_float_cpu(const at::Tensor& t, const char* who) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              who, ": float32 CPU tensors only");
}

at::Tensor gelu_erf(const at::Tensor& x_in) {
  check_float_cpu(x_in, "gelu_erf");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_vectors(x.numel(), [=](int64_t o, int k) {
    gelu_vec(VecF::loadu(xp + o, k)).store(yp + o, k);
  });
  return y;
}

// The sums of one compensation step (compensated_gelu, compensated_rows): total and emitted
// (undefined on the first step, a sum of nothing) read where they lie when in_place (then
// they must be contiguous, and must not alias x), else from contiguous copies; the new sums
// are written over them when in_place and both exist, else to new tensors.
struct CompensationSums {
  at::Tensor total, emitted, total_out, emitted_out, out;
  CompensationSums(const c10::optional<at::Tensor>& total_opt,
                   const c10::optional<at::Tensor>& emitted_opt, const at::Tensor& x,
                   bool in_place, const char* who) {
    const int64_t n = x.numel();
    auto state = [&](const c10::optional<at::Tensor>& t, const char* what) -> at::Tensor {
      if (!t.has_value() || !t->defined()) return at::Tensor();
      check_float_cpu(*t, who);
      TORCH_CHECK(t->numel() == n, who, ": ", what, " and input differ in size");
      if (!in_place) return t->contiguous();
      TORCH_CHECK(t->is_contiguous(), who, ": in place needs a contiguous ", what);
      return *t;
    };
    total = state(total_opt, "total");
    emitted = state(emitted_opt, "emitted");
    const bool keep = in_place && total.defined() && emitted.defined();
    total_out = keep ? total : at::empty_like(x);
    emitted_out = keep ? emitted : at::empty_like(x);
    out = at::empty_like(x);
  }
  // (total, emitted, new total, new emitted, output): null for a sum of nothing
  std::tuple<const float*, const float*, float*, float*, float*> pointers() const {
    return {total.defined() ? total.data_ptr<float>() : nullptr,
            emitted.defined() ? emitted.data_ptr<float>() : nullptr,
            total_out.data_ptr<float>(), emitted_out.data_ptr<float>(), out.data_ptr<float>()};
  }
};

// One step of GELU's expectation compensation, one pass: total += x;
// cumulative = gelu(total / count) * count; out = cumulative - emitted; emitted = cumulative.
// count: one value, or one per row of x ([rows, ...] with count.numel() == rows). With
// ``in_place`` total and emitted (which must be contiguous and not alias x) are updated
// where they lie; else (and when undefined: the first step, a sum of nothing) new ones are
// made. Returns (total, emitted, out), the ops form's values bit for bit (same IEEE
// operations in the same order, with gelu_erf as the GELU).
std::vector<at::Tensor> compensated_gelu(const c10::optional<at::Tensor>& total_opt,
                                         const at::Tensor& x_in,
                                         const c10::optional<at::Tensor>& emitted_opt,
                                         const at::Tensor& count_in, bool in_place) {
  check_float_cpu(x_in, "compensated_gelu");
  check_float_cpu(count_in, "compensated_gelu");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor count = count_in.contiguous();
  const int64_t n = x.numel();
  const int64_t rows = count.numel();
  TORCH_CHECK(rows >= 1 && n % rows == 0 && (rows == 1 || x.dim() >= 1 && x.size(0) == rows),
              "compensated_gelu: count must hold one value or one per row of the input");
  const int64_t inner = n / rows;
  const CompensationSums sums(total_opt, emitted_opt, x, in_place, "compensated_gelu");
  const auto [tp, ep, to, eo, op] = sums.pointers();
  const float* xp = x.data_ptr<float>();
  const float* cp = count.data_ptr<float>();
  auto segment = [=](int64_t o, int64_t len, float c) {
    const VecF vc(c);
    for (int64_t j = 0; j < len; j += VecF::size()) {
      const int k = static_cast<int>(std::min<int64_t>(VecF::size(), len - j));
      const int64_t i = o + j;
      const VecF xv = VecF::loadu(xp + i, k);
      const VecF t = tp ? VecF::loadu(tp + i, k) + xv : xv;
      const VecF cum = gelu_vec(t / vc) * vc;
      const VecF y = ep ? cum - VecF::loadu(ep + i, k) : cum;
      t.store(to + i, k);
      cum.store(eo + i, k);
      y.store(op + i, k);
    }
  };
  if (rows == 1) {
    const float c = cp[0];
    for_vectors(n, [=](int64_t o, int k) { segment(o, k, c); });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
    at::parallel_for(0, rows, grain, [=](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) segment(r * inner, inner, cp[r]);
    });
  }
  return {sums.total_out, sums.emitted_out, sums.out};
}

// ---------------------------------------------------------------------------------------
// LayerNorm and softmax over the last dim, and their expectation compensation in one pass
// (convert/ops.py: KernelLayerNorm, softmax_fn, Compensated). As with the GELU, the
// converted model uses these row functions in every CPU execution (ops form, masked, rows),
// so the fused step gives the ops form's values bit for bit; they differ from torch's by
// float32 rounding (another summation order). A row's result depends on its values only.
enum RowOp : int64_t { kLayerNorm = 0, kSoftmax = 1 };

// The lanes of a vector summed in order.
inline float lane_sum(const VecF& acc) {
  float lanes[VecF::size()];
  acc.store(lanes);
  float s = 0.f;
  for (int l = 0; l < VecF::size(); ++l) s += lanes[l];
  return s;
}

// Sum of a row: lane-wise over whole vectors, the lanes in order, then the tail.
inline float row_sum(const float* p, int64_t d) {
  VecF acc(0.f);
  int64_t j = 0;
  for (; j + VecF::size() <= d; j += VecF::size()) acc = acc + VecF::loadu(p + j);
  float s = lane_sum(acc);
  for (; j < d; ++j) s += p[j];
  return s;
}

struct RowFn {
  int64_t op;
  const float* weight;  // LayerNorm's affine (null: none)
  const float* bias;
  float param;          // LayerNorm: eps; softmax: the scale of its input
};

// y = fn(u) for one row of d elements (y may be u).
inline void row_fn(const RowFn& f, const float* u, float* y, int64_t d) {
  const int64_t W = VecF::size();
  if (f.op == kLayerNorm) {
    const float mean = row_sum(u, d) / static_cast<float>(d);
    const VecF vm(mean);
    VecF acc(0.f);
    int64_t j = 0;
    for (; j + W <= d; j += W) {
      const VecF c = VecF::loadu(u + j) - vm;
      acc = acc + c * c;
    }
    float ss = lane_sum(acc);
    for (; j < d; ++j) ss += (u[j] - mean) * (u[j] - mean);
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(d) + f.param);
    const VecF vr(rstd);
    for (j = 0; j < d; j += W) {
      const int k = static_cast<int>(std::min<int64_t>(W, d - j));
      VecF out = (VecF::loadu(u + j, k) - vm) * vr;
      if (f.weight) out = out * VecF::loadu(f.weight + j, k) + VecF::loadu(f.bias + j, k);
      out.store(y + j, k);
    }
  } else {
    const VecF scale(f.param);
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < d; ++j) m = std::max(m, u[j] * f.param);
    const VecF vm(m);
    for (int64_t j = 0; j < d; j += W) {
      const int k = static_cast<int>(std::min<int64_t>(W, d - j));
      (VecF::loadu(u + j, k) * scale - vm).exp().store(y + j, k);
    }
    const VecF sum(row_sum(y, d));
    for (int64_t j = 0; j < d; j += W) {
      const int k = static_cast<int>(std::min<int64_t>(W, d - j));
      (VecF::loadu(y + j, k) / sum).store(y + j, k);
    }
  }
}

RowFn row_fn_args(int64_t op, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, double param, int64_t d,
                  at::Tensor& w_keep, at::Tensor& b_keep) {
  TORCH_CHECK(op == kLayerNorm || op == kSoftmax, "row op: 0 (LayerNorm) or 1 (softmax)");
  RowFn f{op, nullptr, nullptr, static_cast<float>(param)};
  if (op == kLayerNorm && weight.has_value() && weight->defined()) {
    TORCH_CHECK(bias.has_value() && bias->defined() && weight->numel() == d && bias->numel() == d,
                "layer norm: weight and bias (zeros for none) must both be given, one value per "
                "element of a row");
    TORCH_CHECK(weight->device().is_cpu() && bias->device().is_cpu(),
                "layer norm: weight and bias must be CPU tensors");
    w_keep = weight->contiguous().to(at::kFloat);
    b_keep = bias->contiguous().to(at::kFloat);
    f.weight = w_keep.data_ptr<float>();
    f.bias = b_keep.data_ptr<float>();
  }
  return f;
}

// fn over the last dim of x (LayerNorm with weight, bias, eps = param; softmax of
// param * x).
at::Tensor row_function(const at::Tensor& x_in, int64_t op, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double param) {
  check_float_cpu(x_in, "row_function");
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.dim() ? x.size(-1) : 1, rows = d ? x.numel() / d : 0;
  at::Tensor wk, bk;
  const RowFn f = row_fn_args(op, weight, bias, param, d, wk, bk);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)),
                   [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) row_fn(f, xp + r * d, yp + r * d, d);
  });
  return y;
}

// One step of the compensation of a row function, one pass: total += x;
// cumulative = fn(total / count) * count; out = cumulative - emitted; emitted = cumulative.
// count and in_place as in compensated_gelu (count: one value, or one per leading row).
std::vector<at::Tensor> compensated_rows(const c10::optional<at::Tensor>& total_opt,
                                         const at::Tensor& x_in,
                                         const c10::optional<at::Tensor>& emitted_opt,
                                         const at::Tensor& count_in, bool in_place, int64_t op,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias, double param) {
  check_float_cpu(x_in, "compensated_rows");
  check_float_cpu(count_in, "compensated_rows");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor count = count_in.contiguous();
  const int64_t n = x.numel(), d = x.dim() ? x.size(-1) : 1;
  const int64_t groups = count.numel();
  TORCH_CHECK(d > 0 && groups >= 1 && n % groups == 0 && (n / groups) % d == 0 &&
                  (groups == 1 || x.dim() >= 2 && x.size(0) == groups),
              "compensated_rows: count must hold one value or one per leading row of the input");
  at::Tensor wk, bk;
  const RowFn f = row_fn_args(op, weight, bias, param, d, wk, bk);
  const CompensationSums sums(total_opt, emitted_opt, x, in_place, "compensated_rows");
  const auto [tp, ep, to, eo, op_] = sums.pointers();
  const float* xp = x.data_ptr<float>();
  const float* cp = count.data_ptr<float>();
  const int64_t rows = n / d, per_group = rows / groups;  // d, groups >= 1: checked
  const int64_t W = VecF::size();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(d, 1)),
                   [&](int64_t rb, int64_t re) {
    std::vector<float> buf(static_cast<size_t>(d));
    float* u = buf.data();
    for (int64_t r = rb; r < re; ++r) {
      const float c = cp[groups == 1 ? 0 : r / per_group];
      const VecF vc(c);
      const int64_t o = r * d;
      for (int64_t j = 0; j < d; j += W) {
        const int k = static_cast<int>(std::min<int64_t>(W, d - j));
        const VecF xv = VecF::loadu(xp + o + j, k);
        const VecF t = tp ? VecF::loadu(tp + o + j, k) + xv : xv;
        t.store(to + o + j, k);
        (t / vc).store(u + j, k);
      }
      row_fn(f, u, u, d);
      for (int64_t j = 0; j < d; j += W) {
        const int k = static_cast<int>(std::min<int64_t>(W, d - j));
        const VecF cum = VecF::loadu(u + j, k) * vc;
        const VecF y = ep ? cum - VecF::loadu(ep + o + j, k) : cum;
        cum.store(eo + o + j, k);
        y.store(op_ + o + j, k);
      }
    }
  });
  return {sums.total_out, sums.emitted_out, sums.out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("multi_threshold_fire", &multi_threshold_fire, "one step of the multi-threshold neuron",
        py::arg("v"), py::arg("x"), py::arg("theta"), py::arg("smallest"),
        py::arg("in_place") = false);
  m.def("lif_forward", &lif_forward, "LIF/IF forward over T steps (optionally after a BatchNorm)");
  m.def("lif_backward", &lif_backward, "LIF/IF backward through time (optionally with BatchNorm sums)");
  m.def("lif_rows_step", &lif_rows_step, "one LIF step on gathered rows, in place");
  m.def("channel_moments", &channel_moments, "per-channel sum and sum of squares (float64)");
  m.def("bn_backward_input", &bn_backward_input, "BatchNorm input gradient, in place");
  m.def("max_pool_forward", &max_pool_forward, "max pooling, channels-last, with byte window offsets");
  m.def("max_pool_backward", &max_pool_backward, "max pooling's input gradient, gathered");
  m.def("row_function", &row_function, "LayerNorm (op 0) or softmax (op 1) over the last dim");
  m.def("compensated_rows", &compensated_rows, "one step of a row function's expectation compensation");
  m.def("gelu_erf", &gelu_erf, "GELU (erf form), vectorised on every element");
  m.def("compensated_gelu", &compensated_gelu, "one step of GELU's expectation compensation");
}
