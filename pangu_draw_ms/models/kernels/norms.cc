// GroupNorm and LayerNorm forward kernels for MindSpore's CPU target, loaded through ops.Custom(func_type="aot")
// by pangu_draw_ms/models/cpu_kernels.py (which compiles this file once per machine and caches the library).
//
// Why: MindSpore 2.9's CPU GroupNorm and LayerNorm kernels take 6-19x torch's time (about a third of a tiny
// UNet forward on this CPU; bench/norm_kernels.py). These are plain loops: statistics over each normalised group/row in two passes (the
// mean, then the centred variance), then one pass y = (x - mean) * (rstd * gamma) + beta.
//
// MindSpore's aot calling convention: params holds the inputs, then the outputs; ndims/shapes describe each.
// Inputs (all float32): x, gamma, beta, config; output: y with x's shape.
//   GroupNormForward: x (N, C, *), gamma/beta (C), config = [num_groups, eps]
//   LayerNormForward: x (*, D),    gamma/beta (D), config = [eps]
#include <cmath>
#include <cstdint>

namespace {

struct Moments {
  double mean;
  float rstd;
};

// Sums run in kLanes independent float accumulators, which the compiler vectorises (one double accumulator
// is a serial dependency chain, 4-8x slower), and are added up in double every kBlock elements, so the
// rounding stays at float level for any length.
constexpr int64_t kLanes = 16, kBlock = 2048;

template <typename Term>
double blocked_sum(int64_t len, Term term) {
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

Moments moments(const float *x, int64_t len, float eps) {
  const double mean = blocked_sum(len, [x](int64_t i) { return x[i]; }) / static_cast<double>(len);
  const float centre = static_cast<float>(mean);
  const double variance = blocked_sum(len, [x, centre](int64_t i) {
    const float centred = x[i] - centre;
    return centred * centred;
  }) / static_cast<double>(len);
  return {mean, static_cast<float>(1.0 / std::sqrt(variance + static_cast<double>(eps)))};
}

void normalise(const float *x, float *y, int64_t len, float mean, float scale, float shift) {
  for (int64_t i = 0; i < len; ++i) y[i] = (x[i] - mean) * scale + shift;
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

}  // namespace

extern "C" int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 5 || ndims[0] < 2) return 1;
  const Operands o = operands(params);
  const int64_t batch = shapes[0][0], channels = shapes[0][1];
  const int64_t groups = static_cast<int64_t>(o.config[0]);
  const float eps = o.config[1];
  if (groups <= 0 || channels % groups != 0) return 2;
  const int64_t spatial = elements(ndims[0], shapes[0], 2), per_group = channels / groups;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t offset = (n * channels + g * per_group) * spatial;
      const Moments m = moments(o.x + offset, per_group * spatial, eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const int64_t at = (n * channels + c) * spatial;
        normalise(o.x + at, o.y + at, spatial, static_cast<float>(m.mean), m.rstd * o.gamma[c], o.beta[c]);
      }
    }
  }
  return 0;
}

extern "C" int LayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 5 || ndims[0] < 1) return 1;
  const Operands o = operands(params);
  const float eps = o.config[0];
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = elements(ndims[0] - 1, shapes[0], 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = o.x + r * width;
    float *yr = o.y + r * width;
    const Moments m = moments(xr, width, eps);
    const float mean = static_cast<float>(m.mean);
    for (int64_t i = 0; i < width; ++i) yr[i] = (xr[i] - mean) * m.rstd * o.gamma[i] + o.beta[i];
  }
  return 0;
}
