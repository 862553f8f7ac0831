// Single-pass CPU kernels for the per-step neuron updates (built on first use by
// stas_core/kernels.py; the PyTorch-op path is the fallback and the reference).
//
// Each kernel reads its inputs once and writes its outputs once per element, where the
// PyTorch-op form makes 5-13 passes over memory. Results are bitwise those of the
// reference: every step is one IEEE operation in the same order, and the build disables
// floating-point contraction (no fused multiply-add).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrain = 16384;
constexpr int64_t kTile = 8192;  // membranes kept in cache across the T steps
constexpr int64_t kTileB = 2048;  // backward: T recomputed membranes a tile, kept in cache

// exp(x) for float in plain arithmetic (so loops vectorize): x = k ln2 + r, |r| <= ln2 / 2,
// a degree-6 polynomial for exp(r) and 2^k through the exponent bits; about 2 ulp. Used for
// the sigmoid surrogate's gradient only.
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return p * scale;
}

template <typename T, typename I>
inline T nearest_pow2_signed(T u, I half, I keep) {
  // nearest power of two of |u| with the mantissa rounded ([0.75, 1.5) 2^k -> 2^k), sign
  // dropped: add half an exponent unit to the bits, keep the exponent field
  return __builtin_bit_cast(T, static_cast<I>((__builtin_bit_cast(I, u) + half) & keep));
}

template <typename T, typename I, bool HasV, bool Grid>
void fire_loop(const T* __restrict v, const T* __restrict x, T* __restrict s,
               T* __restrict v_out, int64_t n, T theta, T smallest, I half, I keep) {
  const T tie = static_cast<T>(1099511627776.0);  // 2^40, see TIE_GRID in convert/ops.py
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    // locals, not captures: a store through T* could alias a captured T, which would stop
    // the loop from vectorising
    const T th = theta, lo = smallest, grid = tie;
    const I h = half, k = keep;
    const T* __restrict vv = v;
    const T* __restrict xv = x;
    T* __restrict sv = s;
    T* __restrict vo = v_out;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      T vi = (HasV ? vv[i] : T(0)) + xv[i];
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
  });
}

template <typename T, typename I, bool Grid>
void fire_dispatch(const T* v, const T* x, T* s, T* v_out, int64_t n, T theta, T smallest,
                   I half, I keep) {
  if (v) fire_loop<T, I, true, Grid>(v, x, s, v_out, n, theta, smallest, half, keep);
  else fire_loop<T, I, false, Grid>(v, x, s, v_out, n, theta, smallest, half, keep);
}

// One step of the signed multi-threshold neuron (convert/ops.py: integrate_and_fire):
// returns (emitted value, new membrane) for membrane v (None: at rest) and input x.
std::vector<at::Tensor> multi_threshold_fire(const c10::optional<at::Tensor>& v_opt,
                                             const at::Tensor& x_in, double theta,
                                             double smallest) {
  TORCH_CHECK(x_in.device().is_cpu(), "multi_threshold_fire: CPU tensors only");
  at::Tensor x = x_in.contiguous();
  at::Tensor v;
  if (v_opt.has_value() && v_opt->defined()) {
    TORCH_CHECK(v_opt->sizes() == x.sizes() && v_opt->scalar_type() == x.scalar_type(),
                "multi_threshold_fire: membrane and input differ in shape or dtype");
    v = v_opt->contiguous();
  }
  at::Tensor s = at::empty_like(x);
  at::Tensor v_out = at::empty_like(x);
  const int64_t n = x.numel();
  if (x.scalar_type() == at::kFloat) {
    fire_dispatch<float, int32_t, false>(
        v.defined() ? v.data_ptr<float>() : nullptr, x.data_ptr<float>(), s.data_ptr<float>(),
        v_out.data_ptr<float>(), n, static_cast<float>(theta), static_cast<float>(smallest),
        0x00400000, 0x7F800000);
  } else if (x.scalar_type() == at::kDouble) {
    fire_dispatch<double, int64_t, true>(
        v.defined() ? v.data_ptr<double>() : nullptr, x.data_ptr<double>(),
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

template <bool Soft, bool StoreS, bool StoreH>
inline void lif_tile_step(const LifParams& p, const float* __restrict xt, float* __restrict v,
                          float* __restrict st, float* __restrict ht, int64_t len) {
  const float d = p.decay, sc = p.scale, b = p.bias, thr = p.thr, rst = p.reset;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    float hi = v[j] * d;
    hi = hi + sc * xt[j];
    hi = hi + b;
    const float si = hi >= thr ? 1.f : 0.f;
    if (StoreH) ht[j] = hi;
    if (StoreS) st[j] = si;
    v[j] = Soft ? hi - thr * si : (hi >= thr ? rst : hi);
  }
}

// Forward of a LIF/IF over x_seq[T, ...] (stas_core/neurons.py: _FusedNeuronFn.forward):
// per element the membrane stays in a register across the T steps. Returns
// (spikes[T, ...], last membrane). Nothing else is written: the backward recomputes the
// membranes from x_seq (one store per element and step fewer than saving them).
std::vector<at::Tensor> lif_forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& v0_opt,
                                    double decay, double scale, double bias, double v_th,
                                    c10::optional<double> v_reset) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "lif_forward: float32 CPU tensors only");
  at::Tensor x = x_in.contiguous();
  const int64_t steps = x.size(0);
  const int64_t n = steps ? x.numel() / steps : 0;
  at::Tensor v0;
  if (v0_opt.has_value() && v0_opt->defined()) v0 = v0_opt->contiguous();
  at::Tensor s = at::empty_like(x);
  at::Tensor v_last = at::empty(x.sizes().slice(1), x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = v0.defined() ? v0.data_ptr<float>() : nullptr;
  float* sp = s.data_ptr<float>();
  float* vl = v_last.data_ptr<float>();
  const LifParams prm{static_cast<float>(decay), static_cast<float>(scale),
                      static_cast<float>(bias), static_cast<float>(v_th),
                      v_reset.has_value() ? static_cast<float>(*v_reset) : 0.f};
  auto run = [&](auto soft_tag) {
    constexpr bool Soft = decltype(soft_tag)::value;
    at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
      // a tile of membranes stays in cache over the T steps
      float v[kTile];
      for (int64_t b0 = begin; b0 < end; b0 += kTile) {
        const int64_t len = std::min<int64_t>(kTile, end - b0);
        for (int64_t j = 0; j < len; ++j) v[j] = vp ? vp[b0 + j] : 0.f;
        for (int64_t t = 0; t < steps; ++t) {
          lif_tile_step<Soft, true, false>(prm, xp + t * n + b0, v, sp + t * n + b0, nullptr, len);
        }
        for (int64_t j = 0; j < len; ++j) vl[b0 + j] = v[j];
      }
    });
  };
  v_reset.has_value() ? run(std::false_type{}) : run(std::true_type{});
  return {s, v_last};
}

// Backward of lif_forward through time, with the sigmoid (kind 0) or atan (kind 1)
// surrogate of slope alpha (stas_core/neurons.py: Sigmoid, ATan; _FusedNeuronFn.backward).
// Per tile, the membranes are first recomputed from the forward's input x (and v0) into a
// buffer that stays in cache, then walked backwards.
std::vector<at::Tensor> lif_backward(const at::Tensor& x_in, const c10::optional<at::Tensor>& v0_opt,
                                     const c10::optional<at::Tensor>& gs_opt,
                                     const c10::optional<at::Tensor>& gv_opt, double decay,
                                     double scale, double bias, double v_th,
                                     c10::optional<double> v_reset, bool detach_reset,
                                     int64_t kind, double alpha) {
  at::Tensor x = x_in.contiguous();
  const int64_t steps = x.size(0);
  const int64_t n = steps ? x.numel() / steps : 0;
  at::Tensor v0, gs, gv;
  if (v0_opt.has_value() && v0_opt->defined()) v0 = v0_opt->contiguous();
  gs = (gs_opt.has_value() && gs_opt->defined()) ? gs_opt->contiguous() : at::zeros_like(x);
  if (gv_opt.has_value() && gv_opt->defined()) gv = gv_opt->contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gv0 = at::empty(x.sizes().slice(1), x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = v0.defined() ? v0.data_ptr<float>() : nullptr;
  const float* gsp = gs.data_ptr<float>();
  const float* gvp = gv.defined() ? gv.data_ptr<float>() : nullptr;
  float* gxp = gx.data_ptr<float>();
  float* g0 = gv0.data_ptr<float>();
  const float fd = decay, fs = scale, th = v_th, a = alpha;
  const bool soft = !v_reset.has_value();
  const float vr = soft ? 0.f : static_cast<float>(*v_reset);
  const LifParams prm{fd, fs, static_cast<float>(bias), th, vr};
  const float half_pi_a = static_cast<float>(M_PI / 2 * alpha), half_a = static_cast<float>(alpha / 2);
  auto run = [&](auto kind_tag, auto soft_tag, auto detach_tag) {
    constexpr int Kind = decltype(kind_tag)::value;
    constexpr bool Soft = decltype(soft_tag)::value;
    constexpr bool Detach = decltype(detach_tag)::value;
    at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
      const float d = fd, sc = fs, thr = th, rst = vr, al = a, hpa = half_pi_a, ha = half_a;
      float g_v[kTileB];
      std::vector<float> hbuf(static_cast<size_t>(steps) * kTileB);
      for (int64_t b0 = begin; b0 < end; b0 += kTileB) {
        const int64_t len = std::min<int64_t>(kTileB, end - b0);
        for (int64_t j = 0; j < len; ++j) g_v[j] = vp ? vp[b0 + j] : 0.f;  // membranes
        for (int64_t t = 0; t < steps; ++t) {
          lif_tile_step<Soft, false, true>(prm, xp + t * n + b0, g_v, nullptr,
                                            hbuf.data() + t * kTileB, len);
        }
        for (int64_t j = 0; j < len; ++j) g_v[j] = gvp ? gvp[b0 + j] : 0.f;  // now gradients
        for (int64_t t = steps - 1; t >= 0; --t) {
          const float* __restrict ht = hbuf.data() + t * kTileB;
          const float* __restrict gst = gsp + t * n + b0;
          float* __restrict gxt = gxp + t * n + b0;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            const float hi = ht[j];
            float sg;
            if (Kind == 0) {
              const float sig = 1.f / (1.f + fast_exp(-(al * (hi - thr))));
              sg = al * sig * (1.f - sig);
            } else {
              const float u = hpa * (hi - thr);
              sg = ha / (1.f + u * u);
            }
            float g_h = sg * gst[j];
            if (Soft) {
              g_h = g_h + g_v[j];
              if (!Detach) g_h = g_h - (thr * sg) * g_v[j];
            } else {
              const float not_spiked = hi < thr ? 1.f : 0.f;
              g_h = g_h + g_v[j] * not_spiked;
              if (!Detach) g_h = g_h + g_v[j] * (rst - hi) * sg;
            }
            gxt[j] = g_h * sc;
            g_v[j] = g_h * d;
          }
        }
        for (int64_t j = 0; j < len; ++j) g0[b0 + j] = g_v[j];
      }
    });
  };
  using T0 = std::integral_constant<int, 0>;
  using T1 = std::integral_constant<int, 1>;
  using Y = std::true_type;
  using N = std::false_type;
  if (kind == 0) {
    if (soft) detach_reset ? run(T0{}, Y{}, Y{}) : run(T0{}, Y{}, N{});
    else detach_reset ? run(T0{}, N{}, Y{}) : run(T0{}, N{}, N{});
  } else {
    if (soft) detach_reset ? run(T1{}, Y{}, Y{}) : run(T1{}, Y{}, N{});
    else detach_reset ? run(T1{}, N{}, Y{}) : run(T1{}, N{}, N{});
  }
  return {gx, gv0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("multi_threshold_fire", &multi_threshold_fire, "one step of the multi-threshold neuron");
  m.def("lif_forward", &lif_forward, "LIF/IF forward over T steps");
  m.def("lif_backward", &lif_backward, "LIF/IF backward through time");
}
