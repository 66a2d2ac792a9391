// GroupNorm (optionally followed by SiLU), LayerNorm, GEGLU, stride-1 convolution, dense-layer, attention and UNet
// transformer-block forward kernels
// for MindSpore's CPU target, loaded through ops.Custom(func_type="aot") by pangu_draw_ms/models/cpu_kernels.py
// (which compiles this file once per machine and caches the library).
//
// Why: MindSpore 2.9's CPU GroupNorm and LayerNorm kernels take 6-19x torch's time (about a third of a tiny
// UNet forward on this CPU; bench/cpu_kernels.py), and its SiLU 7x torch's. These are plain loops: statistics
// over each normalised group/row in two passes (the mean, then the centred variance), then one pass
// y = (x - mean) * (rstd * gamma) + beta, with SiLU applied in that same pass when asked (every UNet/VAE
// GroupNorm but the attention ones is followed by SiLU: one kernel and one memory pass fewer). GEGLU
// (h * GELU(gate) over the two halves of the feed-forward projection) is one kernel instead of MindSpore's seven
// (split, and an erf GELU decomposed into div/erf/add/mul; its Erf alone takes 0.3 ms on a tiny UNet's tokens).
// MindSpore's convolutions and matmuls run oneDNN capped at AVX2 (pangu_draw_ms/runtime.py says why); the
// convolution and attention here use AVX-512 (one register-tiled loop, `tile`, under both), the dense layer
// oneDNN's own GEMM from a second, uncapped instance of the library.
//
// MindSpore's aot calling convention: params holds the inputs, then the outputs; ndims/shapes/dtypes describe each.
// Each entry point returns 0, or non-zero for operands it does not take (5: not all float32), which MindSpore
// raises as an error. Inputs (all float32); the output last:
//   GroupNormForward: x (N, C, *), gamma/beta (C), config = [num_groups, eps, silu (0 or 1)]; y like x
//   LayerNormForward: x (*, D),    gamma/beta (D), config = [eps]; y like x
//   GegluForward:     x (*, 2F) only; y (*, F) = x[..., :F] * GELU(x[..., F:]) with the exact (erf) GELU
//   Conv2dForward:    x (N, C, H, W), weight (O, C, k, k), bias (O), config = [padding]; stride 1
//   DenseForward:     x (*, in), weight (out, in), bias (out); y (*, out) = x weight^T + bias
//   AttentionForward: q (B, Lq, heads * dim), k and v (B, Lk, heads * dim), config = [heads, scale]; o like q
//   TransformerBlockForward: x (B, N, C), context (B, M, D), the block's 20 parameters, config; y like x (below)
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX512 1
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

// Every operand float32 (the layers cast to it; anything else would be read as the wrong type).
bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (dtypes == nullptr || dtypes[i] == nullptr || std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
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

PER_CPU void layer_norm(const float *x, const float *gamma, const float *beta, float *y, int64_t rows, int64_t width,
                        float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * width;
    float *yr = y + r * width;
    const Moments m = moments(xr, width, eps);
    const float mean = static_cast<float>(m.mean);
    for (int64_t i = 0; i < width; ++i) yr[i] = (xr[i] - mean) * m.rstd * gamma[i] + beta[i];
  }
}

PER_CPU void geglu(const float *x, float *y, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *h = x + 2 * r * width, *gate = h + width;
    float *yr = y + r * width;
    for (int64_t i = 0; i < width; ++i) yr[i] = h[i] * gelu(gate[i]);
  }
}

// Threads for the convolution, dense and attention kernels (SetThreads: runtime.cpu_threads, MindSpore's count).
int threads = 1;

#if defined(HAVE_AVX512)
// The AVX-512 tile under the convolution and attention:
// out[r * out_stride + q] = sum_d rows[r][d] * vectors[offsets[d] + q] for kRows rows and kVectors * 16 consecutive
// q (whole vectors stored: the caller leaves room), the 24 sums in registers. Each step of the reduction loads
// kVectors vectors and broadcasts kRows scalars (one per row stream): 24 FMAs per 3 loads and 8 broadcasts, which
// keeps the FMA units busy from L1/L2. Rows past the end of a block repeat its last row (their sums not used).
constexpr int kRows = 8, kVectors = 3;
constexpr int64_t kTile = 16 * kVectors;

template <int V>
__attribute__((target("avx512f"))) void tile(const float *vectors, const int64_t *offsets, int64_t depth,
                                             const float *const *rows, float *out, int64_t out_stride) {
  __m512 acc[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < depth; ++d) {
    const float *xd = vectors + offsets[d];
    __m512 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xd + 16 * v);
    for (int r = 0; r < kRows; ++r) {
      const __m512 wr = _mm512_set1_ps(rows[r][d]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wr, xv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + r * out_stride + 16 * v, acc[r][v]);
}

// A tile of `width` <= kTile columns (whole vectors are loaded: the caller leaves slack past the last column).
void tile_of_width(int64_t width, const float *vectors, const int64_t *offsets, int64_t depth,
                   const float *const *rows, float *out, int64_t out_stride) {
  if (width > 32)
    tile<3>(vectors, offsets, depth, rows, out, out_stride);
  else if (width > 16)
    tile<2>(vectors, offsets, depth, rows, out, out_stride);
  else
    tile<1>(vectors, offsets, depth, rows, out, out_stride);
}

// Row pointers of the block of kRows rows starting at `first` (of `count`, each `stride` floats apart).
void block_rows(const float *base, int64_t first, int64_t count, int64_t stride, const float **rows) {
  for (int r = 0; r < kRows; ++r) rows[r] = base + (first + std::min<int64_t>(r, count - first - 1)) * stride;
}

// The kernel threads: the calling thread is worker 0, the others persistent threads that wait for a job by yielding
// the core (so that MindSpore's own waiting thread and the host get it when they need it) and, after 2000 yields
// without one, sleep on a condition variable. Threads started per kernel call (before) gained nothing measurable
// for the demo's batch of 4 on this 2-core VM; these, with batches shared by images, took it from 1.08-1.34 s to
// 0.82-1.02 s (bench/README.md).
// A second caller while a job runs (another MindSpore thread) runs its shares itself, in turn; so does a kernel
// called from inside a job. A forked child starts a new pool: fork copies none of the parent's threads.
class Pool {
 public:
  template <typename Work>
  void run(int64_t workers, Work &work) {
    if (workers <= 1 || !busy_.try_lock()) {
      for (int64_t t = 0; t < workers; ++t) work(t, workers);
      return;
    }
    {
      // The job's description and its generation change together, under the lock the threads read them under.
      std::lock_guard<std::mutex> lock(mutex_);
      for (; started_ < workers - 1; ++started_) {
        const int64_t index = started_ + 1;
        const uint64_t before = generation_.load(std::memory_order_relaxed);
        std::thread([this, index, before] { serve(index, before); }).detach();
      }
      job_ = {[](void *context, int64_t worker, int64_t count) { (*static_cast<Work *>(context))(worker, count); },
              &work, workers, 0};
#if defined(__SSE__)
      job_.csr = _mm_getcsr();  // the caller's floating-point mode (flushing subnormals or not) for every share
#endif
      remaining_.store(workers - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(0, workers);
    while (remaining_.load(std::memory_order_acquire) > 0) std::this_thread::yield();
    busy_.unlock();
  }

 private:
  struct Job {
    void (*function)(void *, int64_t, int64_t);
    void *context;
    int64_t workers;
    unsigned csr;
  };

  // Each generation's job once, where this thread's index is among its workers (the caller waits for those, so none
  // misses one); a thread outside a job may skip it.
  void serve(int64_t index, uint64_t seen) {
    for (;;) {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen && spins < 2000; ++spins)
        std::this_thread::yield();
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (index >= job.workers) continue;
#if defined(__SSE__)
      _mm_setcsr(job.csr);
#endif
      job.function(job.context, index, job.workers);
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex busy_, mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> remaining_{0};
  Job job_{nullptr, nullptr, 0, 0};
  int64_t started_ = 0;
};

Pool *pool = new Pool;  // never destroyed: its threads outlive any static destructor
const int at_fork = pthread_atfork(nullptr, nullptr, [] { pool = new Pool; });

// Runs work(worker, workers) for worker = 0 .. workers - 1 on the kernel threads; returns when all are done.
template <typename Work>
void parallel(int64_t workers, Work work) {
  pool->run(workers, work);
}

// Threads for `flops` of work: one below `threshold` (by default 30 MFLOP, about a quarter of a millisecond on one
// core; with a prototype of this pool that waited by spinning, the demo UNet's batch of 8 ran no faster from 12 or
// 20 MFLOP and 10 % slower from 64), else up to SetThreads' count and the number of blocks to share.
int64_t workers_for(double flops, int64_t blocks, double threshold = 3e7) {
  return flops < threshold ? 1 : std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
}

// A UNet block (transformer block, ResBlock) is shared by images from 10 MFLOP: one hand-over for the whole block and
// no input packed twice. The demo's image (its two guidance branches: one per thread) took 179-224 ms instead of
// 277-323 ms, and its batch of 4 no longer (533-562 ms vs 577-614; at 4 MFLOP 189-243 and 541-589 ms; from 10 MFLOP
// for every kernel, 219-241 and 562-593 ms) - three runs of each, alternating (bench/README.md).
constexpr double kBlockShareFlops = 1e7;

// Threads sharing a UNet block by images. With fewer images than threads (a many-core CPU) a block large enough for
// its own kernels to share their work (from 100 MFLOP: its convolutions or GEMMs above their 30 MFLOP) runs whole, so
// that every thread takes part in each of them instead of one thread per image; a smaller one is still shared by
// images. (On this 2-core host every batch of 2 or more has an image per thread; the many-core rule is reasoned from
// the thresholds, not measured.)
int64_t block_workers(double flops, int64_t batch) {
  if (batch < threads && flops >= 1e8) return 1;
  return workers_for(flops, batch, kBlockShareFlops);
}

// Stride-1 convolution, direct (no im2col): rows are output channels (their weights broadcast straight from
// MindSpore's (O, C, k, k) layout), columns are output positions counted along the zero-padded input's rows
// (q = oy * padded_width + ox), so the input under a tile at (c, ki, kj) is one contiguous run at
// q + ki * padded_width + kj for any kernel size and whole vectors serve any image width; the
// padded_width - out_width columns per row that are not outputs are computed and dropped. Bands of output rows
// keep a band's padded input (all channels) near 1 MB, in L2 while every block of output channels passes over it.
constexpr int64_t kBandFloats = int64_t{1} << 18;

struct ConvShape {
  int64_t batch, channels, height, width, out_channels, kernel, pad;
  int64_t padded_width() const { return width + 2 * pad; }
  int64_t out_height() const { return height + 2 * pad - kernel + 1; }
  int64_t out_width() const { return width + 2 * pad - kernel + 1; }
  int64_t depth() const { return channels * kernel * kernel; }
  int64_t blocks() const { return (out_channels + kRows - 1) / kRows; }
};

// The output channel blocks first_block, first_block + step, ... of every image.
void conv_worker(const ConvShape &s, const float *x, const float *weight, const float *bias, float *y,
                 int64_t first_block, int64_t step) {
  const int64_t depth = s.depth(), k = s.kernel, wp = s.padded_width(), ho = s.out_height(), wo = s.out_width();
  if (first_block >= s.blocks()) return;
  const int64_t band = std::max<int64_t>(1, std::min(ho, kBandFloats / (s.channels * wp) - (k - 1)));
  const int64_t plane = (band + k - 1) * wp + kTile + k;  // slack past the band for the last tile's whole vectors
  std::vector<float> buffer(s.channels * plane);
  std::vector<int64_t> offsets(depth);
  for (int64_t c = 0; c < s.channels; ++c)
    for (int64_t ki = 0; ki < k; ++ki)
      for (int64_t kj = 0; kj < k; ++kj) offsets[(c * k + ki) * k + kj] = c * plane + ki * wp + kj;
  alignas(64) float out[kRows][kTile];
  for (int64_t n = 0; n < s.batch; ++n) {
    const float *xn = x + n * s.channels * s.height * s.width;
    float *yn = y + n * s.out_channels * ho * wo;
    for (int64_t row0 = 0; row0 < ho; row0 += band) {
      const int64_t rows = std::min(band, ho - row0), positions = rows * wp;
      std::fill(buffer.begin(), buffer.end(), 0.0f);
      for (int64_t c = 0; c < s.channels; ++c)
        for (int64_t pr = 0; pr < rows + k - 1; ++pr) {  // padded input row row0 + pr = input row row0 + pr - pad
          const int64_t iy = row0 + pr - s.pad;
          if (iy >= 0 && iy < s.height)
            std::memcpy(&buffer[c * plane + pr * wp + s.pad], xn + (c * s.height + iy) * s.width, s.width * 4);
        }
      for (int64_t block = first_block; block < s.blocks(); block += step) {
        const int64_t o0 = block * kRows, valid = std::min<int64_t>(kRows, s.out_channels - o0);
        const float *weights[kRows];
        block_rows(weight, o0, s.out_channels, depth, weights);
        for (int64_t q0 = 0; q0 < positions; q0 += kTile) {
          const int64_t q1 = std::min(positions, q0 + kTile);
          tile_of_width(q1 - q0, &buffer[q0], offsets.data(), depth, weights, out[0], kTile);
          // The tile's output positions (ox < out_width) plus the bias to y, a run per output row.
          for (int64_t q = q0; q < q1;) {
            const int64_t oy = q / wp, ox = q % wp;
            if (ox >= wo) {
              q += wp - ox;
              continue;
            }
            const int64_t run = std::min(q1 - q, wo - ox);
            for (int64_t r = 0; r < valid; ++r) {
              float *dst = yn + ((o0 + r) * ho + row0 + oy) * wo + ox;
              const float *src = &out[r][q - q0];
              for (int64_t i = 0; i < run; ++i) dst[i] = src[i] + bias[o0 + r];
            }
            q += run;
          }
        }
      }
    }
  }
}

// A batch of at least one image per thread is shared by images (each thread packs only its own images' input);
// otherwise the output-channel blocks are dealt round-robin to the threads. Every output is the same tile's either way.
void conv2d(const ConvShape &s, const float *x, const float *weight, const float *bias, float *y) {
  const double flops = 2.0 * s.batch * s.out_channels * s.depth() * s.out_height() * s.out_width();
  const int64_t by_images = workers_for(flops, s.batch);
  if (by_images > 1 && s.batch >= threads) {
    parallel(by_images, [&](int64_t worker, int64_t workers) {
      const int64_t first = s.batch * worker / workers, images = s.batch * (worker + 1) / workers - first;
      ConvShape share = s;
      share.batch = images;
      if (images > 0)
        conv_worker(share, x + first * s.channels * s.height * s.width, weight, bias,
                    y + first * s.out_channels * s.out_height() * s.out_width(), 0, 1);
    });
    return;
  }
  parallel(workers_for(flops, s.blocks()), [&](int64_t worker, int64_t workers) {
    conv_worker(s, x, weight, bias, y, worker, workers);
  });
}

// y (rows, out) = x (rows, in) W^T + b by oneDNN's sgemm from a private copy of MindSpore's libdnnl (SetGemm;
// cpu_kernels.py loads it uncapped: MindSpore's own instance keeps the AVX2 cap its 3x3 convolutions need, which
// costs its GEMM the AVX-512 kernels). The library is built for a thread pool it is not given here, so its sgemm runs
// sequentially: the rows are shared among the threads, then the bias added (none where `bias` is null).
using Sgemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *, int64_t,
                      float, float *, int64_t);
Sgemm sgemm = nullptr;

int dense(const float *x, const float *weight, const float *bias, float *y, int64_t rows, int64_t in, int64_t out) {
  const int64_t workers = workers_for(2.0 * rows * in * out, (rows + kRows - 1) / kRows);
  std::vector<int> status(workers, 0);
  parallel(workers, [&](int64_t worker, int64_t count) {
    const int64_t r0 = rows * worker / count, r1 = rows * (worker + 1) / count;
    if (r1 == r0) return;
    status[worker] = sgemm('N', 'T', r1 - r0, out, in, 1.0f, x + r0 * in, in, weight, in, 0.0f, y + r0 * out, out);
    if (bias == nullptr) return;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < out; ++j) y[r * out + j] += bias[j];
  });
  for (const int s : status)
    if (s != 0) return 4;
  return 0;
}

// softmax(q k^T * scale) v for each (batch, head), q/k/v in the (B, L, heads * dim) layout of the projections (no
// head split or merge kernels), in blocks of kRows queries: the scores of a block (kRows x Lk) are one row of tiles
// against k^T, packed per head as (dim, Lk); the softmax runs over them in place (exp(scale (s - max)), the sum's
// reciprocal applied to the output); the output is the tiles of the probabilities against v, packed per head as
// (Lk, dim rounded up to whole vectors). The memory a block needs is kRows x Lk scores, not Lq x Lk.
struct AttentionShape {
  int64_t batch, queries, keys, heads, dim;
  int64_t width() const { return heads * dim; }
};

// exp(scale (s - max s)) over each of kRows rows of raw scores, in place; the reciprocals of the row sums out. The
// maximum with AVX-512 max instructions (a running maximum is a serial chain the compiler keeps scalar), the exp
// loop vectorised by the compiler, the sum in blocked_sum's lanes.
__attribute__((target("avx512f"))) float row_max(const float *row, int64_t count) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + j));
  if (j < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - j)) - 1);
    top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, row + j));
  }
  return _mm512_reduce_max_ps(top);
}

__attribute__((target("avx512f"))) void softmax_rows(float *scores, int64_t stride, int64_t count, float scale,
                                                     float *reciprocal_sums) {
  for (int r = 0; r < kRows; ++r) {
    float *row = scores + r * stride;
    const float top = row_max(row, count);
    for (int64_t j = 0; j < count; ++j) row[j] = fast_exp((row[j] - top) * scale);
    reciprocal_sums[r] = static_cast<float>(1.0 / blocked_sum(count, [row](int64_t j) { return row[j]; }));
  }
}

void attention_worker(const AttentionShape &s, const float *q, const float *k, const float *v, float scale,
                      float *o, int64_t worker, int64_t workers) {
  const int64_t width = s.width(), keys_padded = (s.keys + 15) / 16 * 16 + kTile;
  const int64_t dim_padded = (s.dim + 15) / 16 * 16, blocks = (s.queries + kRows - 1) / kRows;
  std::vector<float> kt(s.dim * keys_padded), vp(s.keys * dim_padded + kTile), scores(kRows * keys_padded);
  std::vector<int64_t> kt_offsets(s.dim), v_offsets(s.keys);
  for (int64_t d = 0; d < s.dim; ++d) kt_offsets[d] = d * keys_padded;
  for (int64_t j = 0; j < s.keys; ++j) v_offsets[j] = j * dim_padded;
  alignas(64) float out[kRows][kTile];
  float reciprocal_sums[kRows];
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      if (worker >= blocks) return;
      const float *kb = k + b * s.keys * width + h * s.dim, *vb = v + b * s.keys * width + h * s.dim;
      for (int64_t j = 0; j < s.keys; ++j) {
        for (int64_t d = 0; d < s.dim; ++d) kt[d * keys_padded + j] = kb[j * width + d];
        std::memcpy(&vp[j * dim_padded], vb + j * width, s.dim * sizeof(float));
      }
      for (int64_t block = worker; block < blocks; block += workers) {
        const int64_t m0 = block * kRows, valid = std::min<int64_t>(kRows, s.queries - m0);
        const float *query_rows[kRows], *score_rows[kRows];
        block_rows(q + b * s.queries * width + h * s.dim, m0, s.queries, width, query_rows);
        for (int r = 0; r < kRows; ++r) score_rows[r] = &scores[r * keys_padded];
        for (int64_t j0 = 0; j0 < s.keys; j0 += kTile) {
          const int64_t columns = std::min(kTile, s.keys - j0);
          tile_of_width(columns, &kt[j0], kt_offsets.data(), s.dim, query_rows, &scores[j0], keys_padded);
        }
        softmax_rows(scores.data(), keys_padded, s.keys, scale, reciprocal_sums);
        for (int64_t d0 = 0; d0 < s.dim; d0 += kTile) {
          const int64_t columns = std::min(kTile, s.dim - d0);
          tile_of_width(columns, &vp[d0], v_offsets.data(), s.keys, score_rows, out[0], kTile);
          for (int64_t r = 0; r < valid; ++r) {
            float *dst = o + (b * s.queries + m0 + r) * width + h * s.dim + d0;
            for (int64_t d = 0; d < columns; ++d) dst[d] = out[r][d] * reciprocal_sums[r];
          }
        }
      }
    }
  }
}

void attention(const AttentionShape &s, const float *q, const float *k, const float *v, float scale, float *o) {
  const double flops = 4.0 * s.batch * s.heads * s.queries * s.keys * s.dim;
  parallel(workers_for(flops, (s.queries + kRows - 1) / kRows), [&](int64_t worker, int64_t workers) {
    attention_worker(s, q, k, v, scale, o, worker, workers);
  });
}

// The UNet's pre-LN transformer block as one op (TransformerBlockForward): MindSpore's compile time grows with the
// cells of a graph, and the released UNet's 70 blocks of 25 cells each were most of its first call (bench/README.md).
// The same kernels as the separate ops, in the same order, so the result is theirs (bit for bit, except where the
// batch is shared by images: oneDNN's GEMM given one image's rows may round them otherwise, within 1e-6):
//   x += to_out1(attention(to_q1(n), to_k1(n), to_v1(n))),  n = norm1(x)   (self-attention)
//   x += to_out2(attention(to_q2(n), to_k2(c), to_v2(c))),  n = norm2(x)   (cross-attention on the context c)
//   x += ff_out(GEGLU(ff_proj(n))),                         n = norm3(x)
enum BlockOperand : int {
  kX, kContext, kNorm1Gamma, kNorm1Beta, kQ1, kK1, kV1, kOut1, kOut1Bias, kNorm2Gamma, kNorm2Beta, kQ2, kK2, kV2,
  kOut2, kOut2Bias, kNorm3Gamma, kNorm3Beta, kFfProj, kFfProjBias, kFfOut, kFfOutBias, kBlockConfig, kBlockY,
  kBlockOperands
};

struct BlockShape {
  int64_t batch, tokens, context_tokens, width, context_width, inner, ff, heads;
  int64_t rows() const { return batch * tokens; }
  int64_t context_rows() const { return batch * context_tokens; }
  double flops() const {  // 2 per multiply-add: the projections, the two attentions' products, the feed-forward
    const double n = static_cast<double>(rows()), m = static_cast<double>(context_rows());
    return 2.0 * inner * (n * width * 6 + m * context_width * 2 + 2.0 * n * (tokens + context_tokens)) +
           2.0 * n * width * ff * 3;
  }
};

// Whether operand i has exactly the dimensions `dims`.
bool has_shape(const int *ndims, int64_t **shapes, int i, std::initializer_list<int64_t> dims) {
  if (ndims[i] != static_cast<int>(dims.size())) return false;
  int d = 0;
  for (const int64_t size : dims)
    if (shapes[i][d++] != size) return false;
  return true;
}

std::unique_ptr<float[]> scratch(int64_t count) { return std::unique_ptr<float[]>(new float[count]); }

void add_into(float *y, const float *t, int64_t count) {
  for (int64_t i = 0; i < count; ++i) y[i] = t[i] + y[i];
}

// y += attention of norm(y) over `context` (over norm(y) itself where context is null), through the projections at
// params[q], params[q + 1], params[q + 2] and the output projection and bias at params[q + 3], params[q + 4].
int attention_residual(const BlockShape &s, void **params, int q, const float *context, float eps, float scale,
                       float *y, float *normed, float *queries, float *keys, float *values, float *mixed) {
  const auto *p = reinterpret_cast<const float *const *>(params);
  const int64_t rows = s.rows(), width = s.width, inner = s.inner;
  const int64_t source_rows = context ? s.context_rows() : rows, source_width = context ? s.context_width : width;
  {
    const FlushSubnormals flush;
    layer_norm(y, p[q - 2], p[q - 1], normed, rows, width, eps);
  }
  const float *source = context ? context : normed;
  if (dense(normed, p[q], nullptr, queries, rows, width, inner) || dense(source, p[q + 1], nullptr, keys, source_rows,
      source_width, inner) || dense(source, p[q + 2], nullptr, values, source_rows, source_width, inner))
    return 4;
  {
    const FlushSubnormals flush;
    attention({s.batch, s.tokens, context ? s.context_tokens : s.tokens, s.heads, inner / s.heads}, queries, keys,
              values, scale, mixed);
  }
  if (dense(mixed, p[q + 3], p[q + 4], normed, rows, inner, width)) return 4;
  add_into(y, normed, rows * width);
  return 0;
}

// The block on x (s.batch images) into y.
int block_on(const BlockShape &s, void **params, const float *x, const float *context, float *y, float scale,
             float eps) {
  const auto *p = reinterpret_cast<const float *const *>(params);
  const int64_t rows = s.rows(), width = s.width, inner = s.inner, ff = s.ff;
  const int64_t source_rows = std::max(rows, s.context_rows());
  std::memcpy(y, x, rows * width * sizeof(float));
  auto normed = scratch(rows * width), queries = scratch(rows * inner), keys = scratch(source_rows * inner);
  auto values = scratch(source_rows * inner), mixed = scratch(rows * inner);
  if (attention_residual(s, params, kQ1, nullptr, eps, scale, y, normed.get(), queries.get(), keys.get(),
                         values.get(), mixed.get()) ||
      attention_residual(s, params, kQ2, context, eps, scale, y, normed.get(), queries.get(), keys.get(),
                         values.get(), mixed.get()))
    return 4;
  keys.reset();
  values.reset();
  {
    const FlushSubnormals flush;
    layer_norm(y, p[kNorm3Gamma], p[kNorm3Beta], normed.get(), rows, width, eps);
  }
  auto projected = scratch(rows * 2 * ff), gated = scratch(rows * ff);
  if (dense(normed.get(), p[kFfProj], p[kFfProjBias], projected.get(), rows, width, 2 * ff)) return 4;
  {
    const FlushSubnormals flush;
    geglu(projected.get(), gated.get(), rows, ff);
  }
  if (dense(gated.get(), p[kFfOut], p[kFfOutBias], normed.get(), rows, ff, width)) return 4;
  add_into(y, normed.get(), rows * width);
  return 0;
}

// A batch large enough to share (several images under classifier-free guidance) is split among the threads, each
// running the whole block on its images: one hand-over per block instead of one per op, and the attention and
// the small projections, each below the threshold of its own, shared too.
int transformer_block(const BlockShape &s, void **params, float scale, float eps) {
  const auto *x = static_cast<const float *>(params[kX]), *context = static_cast<const float *>(params[kContext]);
  float *y = static_cast<float *>(params[kBlockY]);
  const int64_t workers = block_workers(s.flops(), s.batch);
  if (workers == 1) return block_on(s, params, x, context, y, scale, eps);
  std::vector<int> status(workers, 0);
  parallel(workers, [&](int64_t worker, int64_t count) {
    const int64_t first = s.batch * worker / count, images = s.batch * (worker + 1) / count - first;
    if (images == 0) return;
    BlockShape share = s;
    share.batch = images;
    status[worker] = block_on(share, params, x + first * s.tokens * s.width, context + first * s.context_tokens *
                              s.context_width, y + first * s.tokens * s.width, scale, eps);
  });
  for (const int code : status)
    if (code != 0) return code;
  return 0;
}

// The UNet's ResBlock as one op (ResBlockForward), for the same reason as the transformer block and the same way (the
// kernels of its layers in their order; the convolution computes each image alike however a batch is shared, so
// the result is theirs bit for bit):
//   h = conv1(SiLU(norm1(x))) + e[:, :, None, None]   (e: the block's projected time embedding, an input; the VAE's
//                                                      ResnetBlock has none)
//   y = skip(x) + conv2(SiLU(norm2(h)))                (skip: a 1x1 convolution where the channels change, else x)
// A batch is shared among the threads by images (one hand-over per block instead of one per op, the group norms and
// the adds shared too); one image, or a block below the threshold, runs its convolutions shared as they would be.
enum ResOperand : int {
  kResX, kResEmb, kResNorm1Gamma, kResNorm1Beta, kResConv1, kResConv1Bias, kResNorm2Gamma, kResNorm2Beta, kResConv2,
  kResConv2Bias, kResConfig, kResY, kResOperands,
  // With a skip convolution its weight and bias come before the config.
  kResSkip = kResConfig, kResSkipBias, kResSkipConfig, kResSkipY, kResSkipOperands
};

struct ResShape {
  int64_t batch, channels, height, width, out_channels, groups;
  bool skip;
  int64_t spatial() const { return height * width; }
  double flops() const {
    return 2.0 * batch * spatial() * out_channels * (9.0 * channels + 9.0 * out_channels + (skip ? channels : 0));
  }
};

int res_block_on(const ResShape &s, void **params, const float *x, const float *emb, float *y, float eps) {
  const auto *p = reinterpret_cast<const float *const *>(params);
  const int64_t hw = s.spatial(), c = s.channels, o = s.out_channels;
  auto normed = scratch(s.batch * std::max(c, o) * hw), hidden = scratch(s.batch * o * hw);
  {
    const FlushSubnormals flush;
    group_norm({x, p[kResNorm1Gamma], p[kResNorm1Beta], nullptr, normed.get()}, s.batch, c, hw, s.groups, eps, true);
  }
  conv2d({s.batch, c, s.height, s.width, o, 3, 1}, normed.get(), p[kResConv1], p[kResConv1Bias], hidden.get());
  for (int64_t n = 0; emb != nullptr && n < s.batch; ++n)
    for (int64_t j = 0; j < o; ++j) {
      float *plane = hidden.get() + (n * o + j) * hw;
      const float e = emb[n * o + j];
      for (int64_t i = 0; i < hw; ++i) plane[i] = plane[i] + e;
    }
  {
    const FlushSubnormals flush;
    group_norm({hidden.get(), p[kResNorm2Gamma], p[kResNorm2Beta], nullptr, normed.get()}, s.batch, o, hw, s.groups,
               eps, true);
  }
  conv2d({s.batch, o, s.height, s.width, o, 3, 1}, normed.get(), p[kResConv2], p[kResConv2Bias], y);
  if (s.skip) {
    conv2d({s.batch, c, s.height, s.width, o, 1, 0}, x, p[kResSkip], p[kResSkipBias], hidden.get());
    add_into(y, hidden.get(), s.batch * o * hw);
  } else {
    add_into(y, x, s.batch * o * hw);
  }
  return 0;
}

int res_block(const ResShape &s, void **params, float eps) {
  const auto *x = static_cast<const float *>(params[kResX]), *emb = static_cast<const float *>(params[kResEmb]);
  float *y = static_cast<float *>(params[s.skip ? kResSkipY : kResY]);
  const int64_t workers = block_workers(s.flops(), s.batch);
  if (workers == 1) return res_block_on(s, params, x, emb, y, eps);
  parallel(workers, [&](int64_t worker, int64_t count) {
    const int64_t first = s.batch * worker / count, images = s.batch * (worker + 1) / count - first;
    if (images == 0) return;
    ResShape share = s;
    share.batch = images;
    res_block_on(share, params, x + first * s.channels * s.spatial(), emb ? emb + first * s.out_channels : nullptr,
                 y + first * s.out_channels * s.spatial(), eps);
  });
  return 0;
}

// The SpatialTransformer's projections with the layout changes around them (TokensInForward, TokensOutForward): the
// feature map (B, C, H, W) to tokens (B, H*W, I) through the group norm and proj_in, and back through proj_out with
// the residual, each one op instead of four (the same kernels, so the same floats as the layers; the transposes,
// MindSpore's own ops before, were its largest ops left in the demo UNet's graph).
// to (B, HW, C) from (B, C, HW); in blocks of 16 channels, so that each token's run of them is written at once.
void to_tokens(const float *x, float *tokens, int64_t batch, int64_t channels, int64_t spatial) {
  for (int64_t b = 0; b < batch; ++b) {
    const float *xb = x + b * channels * spatial;
    float *tb = tokens + b * spatial * channels;
    for (int64_t c0 = 0; c0 < channels; c0 += 16) {
      const int64_t c1 = std::min(channels, c0 + 16);
      for (int64_t p = 0; p < spatial; ++p)
        for (int64_t c = c0; c < c1; ++c) tb[p * channels + c] = xb[c * spatial + p];
    }
  }
}

int tokens_in(const float *x, const float *gamma, const float *beta, const float *weight, const float *bias,
              float *y, int64_t batch, int64_t channels, int64_t spatial, int64_t inner, int64_t groups, float eps) {
  auto normed = scratch(batch * channels * spatial), tokens = scratch(batch * channels * spatial);
  {
    const FlushSubnormals flush;
    group_norm({x, gamma, beta, nullptr, normed.get()}, batch, channels, spatial, groups, eps, false);
  }
  to_tokens(normed.get(), tokens.get(), batch, channels, spatial);
  return dense(tokens.get(), weight, bias, y, batch * spatial, channels, inner);
}

int tokens_out(const float *tokens, const float *x, const float *weight, const float *bias, float *y, int64_t batch,
               int64_t channels, int64_t spatial, int64_t inner) {
  auto projected = scratch(batch * spatial * channels);
  if (dense(tokens, weight, bias, projected.get(), batch * spatial, inner, channels)) return 4;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c0 = 0; c0 < channels; c0 += 16) {
      const int64_t c1 = std::min(channels, c0 + 16);
      for (int64_t p = 0; p < spatial; ++p)
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t at = (b * channels + c) * spatial + p;
          y[at] = projected[(b * spatial + p) * channels + c] + x[at];
        }
    }
  return 0;
}
#endif

}  // namespace

extern "C" void SetThreads(int count) { threads = count < 1 ? 1 : count; }

// oneDNN's dnnl_sgemm for DenseForward (cpu_kernels.py passes it from its private copy of the library).
extern "C" void SetGemm(void *function) {
#if defined(HAVE_AVX512)
  sgemm = reinterpret_cast<Sgemm>(function);
#endif
}

// 1 when this CPU runs Conv2dForward, DenseForward and AttentionForward (AVX-512F).
extern "C" int Avx512Supported() {
#if defined(HAVE_AVX512)
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
  return 0;
#endif
}

// Conv2dForward: stride 1, square kernel, symmetric zero padding. x (N, C, H, W), weight (O, C, k, k), bias (O),
// config = [padding]; y (N, O, H + 2 padding - k + 1, W + 2 padding - k + 1).
extern "C" int Conv2dForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  if (nparam != 5 || ndims[0] != 4 || ndims[1] != 4 || shapes[1][1] != shapes[0][1] || shapes[1][2] != shapes[1][3])
    return 1;
  const int64_t pad = static_cast<int64_t>(static_cast<const float *>(params[3])[0]);
  const ConvShape s{shapes[0][0], shapes[0][1], shapes[0][2], shapes[0][3], shapes[1][0], shapes[1][2], pad};
  if (s.out_height() < 1 || s.out_width() < 1) return 2;
  conv2d(s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         static_cast<const float *>(params[2]), static_cast<float *>(params[4]));
  return 0;
#else
  return 3;
#endif
}

// AttentionForward: q (B, Lq, heads * dim), k and v (B, Lk, heads * dim), config = [heads, scale];
// o (B, Lq, heads * dim) = softmax(q k^T scale) v per head.
extern "C" int AttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  const FlushSubnormals flush;
  if (nparam != 5 || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3) return 1;
  const float *config = static_cast<const float *>(params[3]);
  const int64_t heads = static_cast<int64_t>(config[0]), width = shapes[0][2];
  if (heads < 1 || width % heads != 0 || shapes[1][2] != width || shapes[2][2] != width ||
      shapes[1][1] != shapes[2][1] || shapes[1][0] != shapes[0][0] || shapes[2][0] != shapes[0][0] || shapes[1][1] < 1)
    return 2;
  const AttentionShape s{shapes[0][0], shapes[0][1], shapes[1][1], heads, width / heads};
  attention(s, static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
            static_cast<const float *>(params[2]), config[1], static_cast<float *>(params[4]));
  return 0;
#else
  return 3;
#endif
}

// DenseForward: x (*, in), weight (out, in), bias (out); y (*, out) = x weight^T + bias.
extern "C" int DenseForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  if (nparam != 4 || ndims[0] < 1 || ndims[1] != 2 || shapes[1][1] != shapes[0][ndims[0] - 1]) return 1;
  if (sgemm == nullptr) return 3;
  return dense(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
               static_cast<const float *>(params[2]), static_cast<float *>(params[3]),
               elements(ndims[0] - 1, shapes[0], 0), shapes[1][1], shapes[1][0]);
#else
  return 3;
#endif
}

// TransformerBlockForward: x (B, N, C), context (B, M, D), then the block's parameters in BlockOperand's order
// (norm gamma/beta (C); attention projections (I, C), the cross-attention's key and value (I, D), outputs (C, I)
// with a bias (C); the feed-forward's projection (2F, C) + bias (2F), its output (C, F) + bias (C)),
// config = [heads, scale, eps]; y like x.
extern "C" int TransformerBlockForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                       void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  if (nparam != kBlockOperands || ndims[kX] != 3 || ndims[kContext] != 3 || ndims[kQ1] != 2 || ndims[kFfOut] != 2)
    return 1;
  if (sgemm == nullptr) return 3;
  const float *config = static_cast<const float *>(params[kBlockConfig]);
  const int64_t c = shapes[kX][2], d = shapes[kContext][2], inner = shapes[kQ1][0], ff = shapes[kFfOut][1];
  const BlockShape s{shapes[kX][0], shapes[kX][1], shapes[kContext][1], c, d, inner, ff,
                     static_cast<int64_t>(config[0])};
  bool valid = shapes[kContext][0] == s.batch && s.heads >= 1 && inner % s.heads == 0 && s.context_tokens >= 1;
  for (const int norm : {kNorm1Gamma, kNorm1Beta, kNorm2Gamma, kNorm2Beta, kNorm3Gamma, kNorm3Beta, kOut1Bias,
                         kOut2Bias, kFfOutBias})
    valid = valid && has_shape(ndims, shapes, norm, {c});
  for (const int projection : {kQ1, kK1, kV1, kQ2}) valid = valid && has_shape(ndims, shapes, projection, {inner, c});
  valid = valid && has_shape(ndims, shapes, kK2, {inner, d}) && has_shape(ndims, shapes, kV2, {inner, d}) &&
          has_shape(ndims, shapes, kOut1, {c, inner}) && has_shape(ndims, shapes, kOut2, {c, inner}) &&
          has_shape(ndims, shapes, kFfProj, {2 * ff, c}) && has_shape(ndims, shapes, kFfProjBias, {2 * ff}) &&
          has_shape(ndims, shapes, kFfOut, {c, ff});
  if (!valid) return 2;
  return transformer_block(s, params, config[1], config[2]);
#else
  return 3;
#endif
}

// ResBlockForward: x (N, C, H, W), the projected embedding e (N, O) (none for the VAE's blocks), norm1 gamma/beta (C),
// conv1 (O, C, 3, 3) + bias (O), norm2 gamma/beta (O), conv2 (O, O, 3, 3) + bias (O), [the skip convolution
// (O, C, 1, 1) + bias (O), where O != C], config = [groups, eps]; y (N, O, H, W).
extern "C" int ResBlockForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  // Without an embedding the operands are the same but for e: a null in its place, so that one layout serves both.
  const bool embedding = nparam == kResOperands || nparam == kResSkipOperands;
  const int count = embedding ? nparam : nparam + 1;
  if (count != kResOperands && count != kResSkipOperands) return 1;
  void *operands[kResSkipOperands];
  int dims[kResSkipOperands];
  int64_t *sizes[kResSkipOperands];
  for (int i = 0, j = 0; i < count; ++i) {
    const bool absent = !embedding && i == kResEmb;
    operands[i] = absent ? nullptr : params[j];
    dims[i] = absent ? 0 : ndims[j];
    sizes[i] = absent ? nullptr : shapes[j];
    j += absent ? 0 : 1;
  }
  if (dims[kResX] != 4 || dims[kResConv1] != 4) return 1;
  const bool skip = count == kResSkipOperands;
  const float *config = static_cast<const float *>(operands[skip ? kResSkipConfig : kResConfig]);
  const int64_t n = sizes[kResX][0], c = sizes[kResX][1], o = sizes[kResConv1][0];
  const ResShape s{n, c, sizes[kResX][2], sizes[kResX][3], o, static_cast<int64_t>(config[0]), skip};
  bool valid = s.groups >= 1 && c % s.groups == 0 && o % s.groups == 0 && (skip || c == o) &&
               (!embedding || has_shape(dims, sizes, kResEmb, {n, o})) && has_shape(dims, sizes, kResNorm1Gamma, {c}) &&
               has_shape(dims, sizes, kResNorm1Beta, {c}) && has_shape(dims, sizes, kResConv1, {o, c, 3, 3}) &&
               has_shape(dims, sizes, kResConv2, {o, o, 3, 3});
  for (const int vector : {kResConv1Bias, kResNorm2Gamma, kResNorm2Beta, kResConv2Bias})
    valid = valid && has_shape(dims, sizes, vector, {o});
  if (skip)
    valid = valid && has_shape(dims, sizes, kResSkip, {o, c, 1, 1}) && has_shape(dims, sizes, kResSkipBias, {o});
  if (!valid) return 2;
  return res_block(s, operands, config[1]);
#else
  return 3;
#endif
}

// TokensInForward: x (B, C, H, W), the norm's gamma and beta (C), proj_in's weight (I, C) and bias (I),
// config = [groups, eps]; y (B, H*W, I) = proj_in(GroupNorm(x) as tokens).
extern "C" int TokensInForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  if (nparam != 7 || ndims[0] != 4 || ndims[3] != 2) return 1;
  if (sgemm == nullptr) return 3;
  const int64_t b = shapes[0][0], c = shapes[0][1], spatial = shapes[0][2] * shapes[0][3], inner = shapes[3][0];
  const float *config = static_cast<const float *>(params[5]);
  const int64_t groups = static_cast<int64_t>(config[0]);
  if (groups < 1 || c % groups != 0 || !has_shape(ndims, shapes, 1, {c}) || !has_shape(ndims, shapes, 2, {c}) ||
      !has_shape(ndims, shapes, 3, {inner, c}) || !has_shape(ndims, shapes, 4, {inner}))
    return 2;
  const auto *p = reinterpret_cast<const float *const *>(params);
  return tokens_in(p[0], p[1], p[2], p[3], p[4], static_cast<float *>(params[6]), b, c, spatial, inner, groups,
                   config[1]);
#else
  return 3;
#endif
}

// TokensOutForward: tokens (B, H*W, I), x (B, C, H, W), proj_out's weight (C, I) and bias (C);
// y (B, C, H, W) = proj_out(tokens) as a feature map + x.
extern "C" int TokensOutForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
#if defined(HAVE_AVX512)
  if (nparam != 5 || ndims[0] != 3 || ndims[1] != 4) return 1;
  if (sgemm == nullptr) return 3;
  const int64_t b = shapes[1][0], c = shapes[1][1], spatial = shapes[1][2] * shapes[1][3], inner = shapes[0][2];
  if (!has_shape(ndims, shapes, 0, {b, spatial, inner}) || !has_shape(ndims, shapes, 2, {c, inner}) ||
      !has_shape(ndims, shapes, 3, {c}))
    return 2;
  const auto *p = reinterpret_cast<const float *const *>(params);
  return tokens_out(p[0], p[1], p[2], p[3], static_cast<float *>(params[4]), b, c, spatial, inner);
#else
  return 3;
#endif
}

extern "C" int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
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
  if (!all_float32(nparam, dtypes)) return 5;
  const FlushSubnormals flush;
  if (nparam != 5 || ndims[0] < 1) return 1;
  const Operands o = operands(params);
  const int64_t width = shapes[0][ndims[0] - 1];
  layer_norm(o.x, o.gamma, o.beta, o.y, elements(ndims[0] - 1, shapes[0], 0), width, o.config[0]);
  return 0;
}

extern "C" int GegluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (!all_float32(nparam, dtypes)) return 5;
  const FlushSubnormals flush;
  if (nparam != 2 || ndims[0] < 1 || shapes[0][ndims[0] - 1] % 2 != 0) return 1;
  const int64_t width = shapes[0][ndims[0] - 1] / 2;
  geglu(static_cast<const float *>(params[0]), static_cast<float *>(params[1]), elements(ndims[0] - 1, shapes[0], 0),
        width);
  return 0;
}
