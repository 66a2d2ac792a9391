// GroupNorm (optionally followed by SiLU), LayerNorm and GEGLU forward kernels for MindSpore's CPU target,
// loaded through ops.Custom(func_type="aot") by pangu_draw_ms/models/cpu_kernels.py (which compiles this file
// once per machine and caches the library).
//
// Why: MindSpore 2.9's CPU GroupNorm and LayerNorm kernels take 6-19x torch's time (about a third of a tiny
// UNet forward on this CPU; bench/cpu_kernels.py), and its SiLU 7x torch's. These are plain loops: statistics
// over each normalised group/row in two passes (the mean, then the centred variance), then one pass
// y = (x - mean) * (rstd * gamma) + beta, with SiLU applied in that same pass when asked (every UNet/VAE
// GroupNorm but the attention ones is followed by SiLU: one kernel and one memory pass fewer). GEGLU
// (h * GELU(gate) over the two halves of the feed-forward projection) is one kernel instead of MindSpore's seven
// (split, and an erf GELU decomposed into div/erf/add/mul; its Erf alone takes 0.3 ms on a tiny UNet's tokens).
//
// MindSpore's aot calling convention: params holds the inputs, then the outputs; ndims/shapes describe each.
// Inputs (all float32): x, gamma, beta, config; output: y with x's shape.
//   GroupNormForward: x (N, C, *), gamma/beta (C), config = [num_groups, eps, silu (0 or 1)]
//   LayerNormForward: x (*, D),    gamma/beta (D), config = [eps]
//   GegluForward:     x (*, 2F) only; y (*, F) = x[..., :F] * GELU(x[..., F:]) with the exact (erf) GELU
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// The loops are compiled three times, for AVX-512, AVX2 and the baseline x86-64, and the loader picks the one the
// CPU runs (GCC/Clang function multiversioning): the library stays portable without -march.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PER_CPU __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PER_CPU
#endif

namespace {

// Subnormal floats cost the x86 CPU a microcode assist per operation: 10x the time of the fused SiLU, whose
// vectorised code also evaluates the clamped side of exp for every lane (z / (1 + e^88) is subnormal for
// |z| < 2). Each kernel runs with subnormal results and inputs flushed to zero (values below 1.2e-38), as
// torch's set_flush_denormal, and restores the caller's floating-point mode.
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

struct Moments {
  double mean;
  float rstd;
};

// Sums run in kLanes independent float accumulators, which the compiler vectorises (one double accumulator
// is a serial dependency chain, 4-8x slower), and are added up in double every kBlock elements, so the
// rounding stays at float level for any length.
constexpr int64_t kLanes = 16, kBlock = 2048;

template <typename Term>
inline double blocked_sum(int64_t len, Term term) {
  double total = 0.0;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t end = start + kBlock < len ? start + kBlock : len;
    float lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) lanes[k] += term(i + k);
    for (; i < end; ++i) lanes[0] += term(i);
    for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  }
  return total;
}

inline Moments moments(const float *x, int64_t len, float eps) {
  const double mean = blocked_sum(len, [x](int64_t i) { return x[i]; }) / static_cast<double>(len);
  const float centre = static_cast<float>(mean);
  const double variance = blocked_sum(len, [x, centre](int64_t i) {
    const float centred = x[i] - centre;
    return centred * centred;
  }) / static_cast<double>(len);
  return {mean, static_cast<float>(1.0 / std::sqrt(variance + static_cast<double>(eps)))};
}

// exp(v) for float, branch-free so that loops over it vectorise (std::exp is a library call the compiler
// cannot vectorise without -ffast-math): v = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-7
// polynomial, 2^n from the exponent bits. Relative error about 2 float ulps over the clamped range.
inline float fast_exp(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (v * 1.44269504f + round) - round;
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// GELU(v) = v Phi(v), Phi the normal CDF. Phi(-|v|) = erfc(|v| / sqrt2) / 2 with Numerical Recipes' erfc
// (Chebyshev fit, fractional error below 1.2e-7 everywhere), so the negative tail keeps its relative accuracy
// (1 + erf(v / sqrt2) in float loses it to cancellation).
inline float gelu(float v) {
  const float z = std::fabs(v) * 0.70710678f;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  const float lower_tail = 0.5f * t * fast_exp(-z * z - 1.26551223f + t * p);
  return v * (v < 0.0f ? lower_tail : 1.0f - lower_tail);
}

inline void normalise(const float *x, float *y, int64_t len, float mean, float scale, float shift, bool silu) {
  if (silu) {
    for (int64_t i = 0; i < len; ++i) {
      const float z = (x[i] - mean) * scale + shift;
      y[i] = z / (1.0f + fast_exp(-z));
    }
  } else {
    for (int64_t i = 0; i < len; ++i) y[i] = (x[i] - mean) * scale + shift;
  }
}

int64_t elements(int ndim, const int64_t *shape, int first) {
  int64_t count = 1;
  for (int i = first; i < ndim; ++i) count *= shape[i];
  return count;
}

// The aot operands of both kernels: inputs x, gamma, beta, config, then the output y.
struct Operands {
  const float *x, *gamma, *beta, *config;
  float *y;
};

Operands operands(void **params) {
  return {static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
          static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
          static_cast<float *>(params[4])};
}

PER_CPU void group_norm(const Operands &o, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                        float eps, bool silu) {
  const int64_t per_group = channels / groups;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t offset = (n * channels + g * per_group) * spatial;
      const Moments m = moments(o.x + offset, per_group * spatial, eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const int64_t at = (n * channels + c) * spatial;
        normalise(o.x + at, o.y + at, spatial, static_cast<float>(m.mean), m.rstd * o.gamma[c], o.beta[c], silu);
      }
    }
  }
}

PER_CPU void layer_norm(const Operands &o, int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = o.x + r * width;
    float *yr = o.y + r * width;
    const Moments m = moments(xr, width, eps);
    const float mean = static_cast<float>(m.mean);
    for (int64_t i = 0; i < width; ++i) yr[i] = (xr[i] - mean) * m.rstd * o.gamma[i] + o.beta[i];
  }
}

PER_CPU void geglu(const float *x, float *y, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *h = x + 2 * r * width, *gate = h + width;
    float *yr = y + r * width;
    for (int64_t i = 0; i < width; ++i) yr[i] = h[i] * gelu(gate[i]);
  }
}

}  // namespace

extern "C" int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const FlushSubnormals flush;
  if (nparam != 5 || ndims[0] < 2 || ndims[3] != 1 || shapes[3][0] != 3) return 1;
  const Operands o = operands(params);
  const int64_t channels = shapes[0][1], groups = static_cast<int64_t>(o.config[0]);
  if (groups <= 0 || channels % groups != 0) return 2;
  group_norm(o, shapes[0][0], channels, elements(ndims[0], shapes[0], 2), groups, o.config[1], o.config[2] != 0.0f);
  return 0;
}

extern "C" int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  const FlushSubnormals flush;
  if (nparam != 5 || ndims[0] < 1) return 1;
  const Operands o = operands(params);
  const int64_t width = shapes[0][ndims[0] - 1];
  layer_norm(o, elements(ndims[0] - 1, shapes[0], 0), width, o.config[0]);
  return 0;
}

extern "C" int GegluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  const FlushSubnormals flush;
  if (nparam != 2 || ndims[0] < 1 || shapes[0][ndims[0] - 1] % 2 != 0) return 1;
  const int64_t width = shapes[0][ndims[0] - 1] / 2;
  geglu(static_cast<const float *>(params[0]), static_cast<float *>(params[1]), elements(ndims[0] - 1, shapes[0], 0),
        width);
  return 0;
}
