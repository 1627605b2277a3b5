// Native CPU kernels of fastpref's preference-loss ops, registered as torch.ops.fastpref.*_native.
//
// The semantics are those of fastpref/ops/reference.py (the oracle); this file only makes them fast on
// CPU: one pass over the big prediction tensors, no temporaries, work split over threads with
// at::parallel_for, and results that do not depend on the number of threads.
//
// Built by CMakeLists.txt (through setup.py) into fastpref/_C<ext suffix>. The library is also a
// (function-less) Python extension module, so `import fastpref._C` loads it and its static
// initializers register the ops; see fastpref/ops/native.py.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/SymInt.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace fastpref {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Per-sample squared errors
// ---------------------------------------------------------------------------------------------

// A sample's elements are cut into chunks of this many, and every (sample, chunk) pair is one
// parallel task: a batch of few huge samples still keeps every thread busy. Partial sums are
// reduced in a fixed order, so the result is bitwise the same for any thread count.
constexpr int64_t kChunkElements = 1 << 15;
// Below this many elements in total, threading costs more than it saves.
constexpr int64_t kMinParallelElements = 1 << 15;
// float lanes are flushed into a double every kBlockElements elements: bounded rounding error at
// the price of one horizontal add per block.
constexpr int64_t kBlockElements = 1024;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The hot loops are compiled twice, for baseline x86-64 (SSE2) and for x86-64-v3 (AVX2, FMA, F16C),
// and the loader picks one for the machine it runs on (GCC function multiversioning): the speed of
// -march=native (float16 was 4x slower on SSE2 alone) without a library that faults on older CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(FASTPREF_NATIVE_ARCH)
#define FASTPREF_HOT_LOOP __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define FASTPREF_HOT_LOOP
#endif
// Helpers passing 32-byte vectors by value must be inlined into each clone: a call between code
// built for different targets would disagree on how such vectors are passed (GCC's -Wpsabi note).
#define FASTPREF_SIMD_HELPER inline __attribute__((always_inline))

// Explicit SIMD through the GCC/Clang vector extension: left to itself the auto-vectorizer turned
// a 16-accumulator loop into strided shuffles (float32 ran 3-5x slower than bfloat16). 32-byte
// vectors are split into SSE halves on plain x86-64 and are one register with AVX.
template <typename acc>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename acc>
using Vec32 = typename Simd<acc>::type;
template <typename acc>
constexpr int kVecLanes = 32 / sizeof(acc);

typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));
static_assert(kVecLanes<float> == 8);

// c10::Half's portable conversions (used unless the build enables F16C) do not vectorize and made
// float16 3x slower than the reference: these are the same algorithms on 8 lanes at once.
// Scalar tails use c10::Half, so the two must agree bit for bit (tests/ops/test_native.py checks).
FASTPREF_SIMD_HELPER Vec32<float> half8_to_float8(const c10::Half* x) {
  U16x8 bits16;
  std::memcpy(&bits16, x, sizeof(bits16));
  // c10's fp16_ieee_to_fp32_value: no arithmetic on float subnormals, so it stays exact when
  // torch.set_flush_denormal(True) sets FTZ/DAZ.
  const U32x8 w = __builtin_convertvector(bits16, U32x8) << 16;
  const U32x8 sign = w & 0x80000000u;
  const U32x8 two_w = w + w;
  // Normal halves, inf and nan: re-bias the exponent by 0xE0 then scale by 2^-112 (inf/nan survive).
  const Vec32<float> normalized = (Vec32<float>)((two_w >> 4) + (0xE0u << 23)) * 0x1p-112f;
  // Subnormal halves: mantissa placed under 2^-1, minus 0.5.
  const Vec32<float> denormalized = (Vec32<float>)((two_w >> 17) | (126u << 23)) - 0.5f;
  const U32x8 is_denormal = (U32x8)(two_w < (1u << 27));
  const U32x8 bits = ((U32x8)denormalized & is_denormal) | ((U32x8)normalized & ~is_denormal);
  return (Vec32<float>)(sign | bits);
}

// Round to nearest even, overflow to inf, subnormals kept, nan to the canonical quiet nan: the
// algorithm of c10's fp16_ieee_from_fp32_value.
FASTPREF_SIMD_HELPER void float8_to_half8(Vec32<float> f, c10::Half* out) {
  const U32x8 w = (U32x8)f;
  const Vec32<float> magnitude = (Vec32<float>)(w & 0x7fffffffu);
  Vec32<float> base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
  const U32x8 shl1_w = w + w;
  const U32x8 sign = w & 0x80000000u;
  U32x8 bias = shl1_w & 0xff000000u;
  const U32x8 small = (U32x8)(bias < 0x71000000u);
  bias = (bias & ~small) | (0x71000000u & small);
  base = (Vec32<float>)((bias >> 1) + 0x07800000u) + base;
  const U32x8 bits = (U32x8)base;
  const U32x8 nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  const U32x8 nan = (U32x8)(shl1_w > 0xff000000u);
  const U32x8 half = (sign >> 16) | (0x7e00u & nan) | (nonsign & ~nan);
  const U16x8 packed = __builtin_convertvector(half, U16x8);
  std::memcpy(out, &packed, sizeof(packed));
}

template <typename acc, typename scalar_t>
FASTPREF_SIMD_HELPER Vec32<acc> load_widened(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return half8_to_float8(x);
  } else {
    Vec32<acc> v;
    for (int l = 0; l < kVecLanes<acc>; ++l) v[l] = static_cast<acc>(x[l]);
    return v;
  }
}

template <typename acc>
FASTPREF_SIMD_HELPER acc horizontal_sum(Vec32<acc> v) {
  acc total = 0;
  for (int l = 0; l < kVecLanes<acc>; ++l) total += v[l];
  return total;
}

// Round to nearest even, nan to the canonical quiet nan: c10::BFloat16's float constructor on 8 lanes.
FASTPREF_SIMD_HELPER void float8_to_bfloat16x8(Vec32<float> f, c10::BFloat16* out) {
  const U32x8 w = (U32x8)f;
  const U32x8 rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
  const U32x8 nan = (U32x8)(f != f);
  const U32x8 bits = (0x7fc0u & nan) | (rounded & ~nan);
  const U16x8 packed = __builtin_convertvector(bits, U16x8);
  std::memcpy(out, &packed, sizeof(packed));
}

template <typename scalar_t, typename acc>
FASTPREF_SIMD_HELPER void store_narrowed(Vec32<acc> v, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    float8_to_half8(v, out);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    float8_to_bfloat16x8(v, out);
  } else {
    for (int l = 0; l < kVecLanes<acc>; ++l) out[l] = static_cast<scalar_t>(v[l]);
  }
}

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Sums of (pred - target)^2 and, when kWithRef, (ref - target)^2 over n elements, reading target
// once for both. kRefToPred (step_errors): the second sum is of (pred - ref)^2 instead.
template <typename scalar_t, bool kWithRef, bool kRefToPred = false>
FASTPREF_HOT_LOOP std::pair<double, double> squared_error_sums(
    const scalar_t* pred, const scalar_t* ref, const scalar_t* target, int64_t n) {
  using acc = acc_t<scalar_t>;
  using Vec = Vec32<acc>;
  constexpr int kStep = 2 * kVecLanes<acc>;  // two independent accumulators hide the add latency
  double total_pol = 0.0;
  double total_ref = 0.0;
  for (int64_t block = 0; block < n; block += kBlockElements) {
    const int64_t len = std::min(kBlockElements, n - block);
    const scalar_t* p = pred + block;
    const scalar_t* t = target + block;
    const scalar_t* r = kWithRef ? ref + block : nullptr;
    Vec pol0 = {}, pol1 = {}, ref0 = {}, ref1 = {};
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      const Vec t0 = load_widened<acc>(t + i);
      const Vec t1 = load_widened<acc>(t + i + kVecLanes<acc>);
      const Vec p0 = load_widened<acc>(p + i);
      const Vec p1 = load_widened<acc>(p + i + kVecLanes<acc>);
      const Vec dp0 = p0 - t0;
      const Vec dp1 = p1 - t1;
      pol0 += dp0 * dp0;
      pol1 += dp1 * dp1;
      if constexpr (kWithRef) {
        const Vec dr0 = kRefToPred ? p0 - load_widened<acc>(r + i) : load_widened<acc>(r + i) - t0;
        const Vec dr1 = kRefToPred ? p1 - load_widened<acc>(r + i + kVecLanes<acc>)
                                   : load_widened<acc>(r + i + kVecLanes<acc>) - t1;
        ref0 += dr0 * dr0;
        ref1 += dr1 * dr1;
      }
    }
    acc block_pol = horizontal_sum<acc>(pol0 + pol1);
    acc block_ref = horizontal_sum<acc>(ref0 + ref1);
    for (; i < len; ++i) {
      const acc tv = static_cast<acc>(t[i]);
      const acc pv = static_cast<acc>(p[i]);
      const acc dp = pv - tv;
      block_pol += dp * dp;
      if constexpr (kWithRef) {
        const acc dr = kRefToPred ? pv - static_cast<acc>(r[i]) : static_cast<acc>(r[i]) - tv;
        block_ref += dr * dr;
      }
    }
    total_pol += block_pol;
    total_ref += block_ref;
  }
  return {total_pol, total_ref};
}

// out = scale * (pred - target), rounded to scalar_t; with kWithDiv (step_errors) plus
// scale_div * (pred - ref).
template <typename scalar_t, bool kWithDiv = false>
FASTPREF_HOT_LOOP void scaled_differences(const scalar_t* pred, const scalar_t* target, acc_t<scalar_t> scale,
                                          int64_t n, scalar_t* out, const scalar_t* ref = nullptr,
                                          acc_t<scalar_t> scale_div = 0) {
  using acc = acc_t<scalar_t>;
  int64_t j = 0;
  for (; j + kVecLanes<acc> <= n; j += kVecLanes<acc>) {
    const Vec32<acc> p = load_widened<acc>(pred + j);
    Vec32<acc> g = scale * (p - load_widened<acc>(target + j));
    if constexpr (kWithDiv) g += scale_div * (p - load_widened<acc>(ref + j));
    store_narrowed<scalar_t, acc>(g, out + j);
  }
  for (; j < n; ++j) {
    const acc p = static_cast<acc>(pred[j]);
    acc g = scale * (p - static_cast<acc>(target[j]));
    if constexpr (kWithDiv) g += scale_div * (p - static_cast<acc>(ref[j]));
    out[j] = static_cast<scalar_t>(g);
  }
}

int64_t elements_per_sample(const Tensor& t) {
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

// Task grid shared by the forward and backward passes.
struct ChunkGrid {
  int64_t samples;
  int64_t per_sample;  // elements of one sample (D)
  int64_t chunks_per_sample;

  ChunkGrid(int64_t n, int64_t d)
      : samples(n), per_sample(d), chunks_per_sample(std::max<int64_t>(1, (d + kChunkElements - 1) / kChunkElements)) {}

  int64_t tasks() const { return samples * chunks_per_sample; }
  // Tasks per thread below which at::parallel_for stays serial.
  int64_t grain() const {
    const int64_t per_task = std::max<int64_t>(1, std::min(per_sample, kChunkElements));
    return std::max<int64_t>(1, kMinParallelElements / per_task);
  }
  int64_t sample(int64_t task) const { return task / chunks_per_sample; }
  int64_t begin(int64_t task) const { return (task % chunks_per_sample) * kChunkElements; }
  int64_t end(int64_t task) const { return std::min(per_sample, begin(task) + kChunkElements); }
};

void check_prediction_like(const Tensor& t, const char* name, const Tensor& pred) {
  TORCH_CHECK(t.device() == pred.device(), "fastpref: ", name, " is on ", t.device(), " but pred is on ", pred.device());
  TORCH_CHECK(t.scalar_type() == pred.scalar_type(), "fastpref: ", name, " has dtype ", t.scalar_type(),
              " but pred has dtype ", pred.scalar_type(), "; pass them in the same dtype");
  TORCH_CHECK(t.sym_sizes() == pred.sym_sizes(), "fastpref: ", name, " has shape ", t.sym_sizes(),
              " but pred has shape ", pred.sym_sizes());
}

void check_pred(const Tensor& pred) {
  TORCH_CHECK(is_supported_float(pred.scalar_type()),
              "fastpref: pred must be float32, float64, bfloat16 or float16, got ", pred.scalar_type());
  TORCH_CHECK(pred.dim() >= 2, "fastpref: pred must have shape (N, ...) with at least one non-batch dimension, got shape ",
              pred.sym_sizes());
}

// weight (N,) as a contiguous tensor of the accumulation dtype, or nullopt.
std::optional<Tensor> per_sample_vector(const std::optional<Tensor>& v, const char* name, const Tensor& pred) {
  if (!v.has_value()) return std::nullopt;
  const Tensor& t = *v;
  TORCH_CHECK(t.device() == pred.device(), "fastpref: ", name, " is on ", t.device(), " but pred is on ", pred.device());
  TORCH_CHECK(t.is_floating_point(), "fastpref: ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == pred.size(0), "fastpref: ", name, " must have shape (N,) = (", pred.size(0),
              ",), got ", t.sizes());
  return t.to(accumulation_dtype(pred.scalar_type())).contiguous();
}

// sample_errors (ref_to_pred = false) and step_errors (true: the second output is mean (pred - ref)^2).
std::tuple<Tensor, Tensor> errors_impl(const Tensor& pred_in, const Tensor& target_in,
                                       const std::optional<Tensor>& ref_pred_in,
                                       const std::optional<Tensor>& weight_in, bool ref_to_pred) {
  check_pred(pred_in);
  check_prediction_like(target_in, "target", pred_in);
  if (ref_pred_in.has_value()) check_prediction_like(*ref_pred_in, "ref_pred", pred_in);
  const auto weight = per_sample_vector(weight_in, "weight", pred_in);

  const Tensor pred = pred_in.contiguous();
  const Tensor target = target_in.contiguous();
  const std::optional<Tensor> ref_pred =
      ref_pred_in.has_value() ? std::optional<Tensor>(ref_pred_in->contiguous()) : std::nullopt;
  const bool with_ref = ref_pred.has_value();

  const auto acc_dtype = accumulation_dtype(pred.scalar_type());
  const int64_t n = pred.size(0);
  const ChunkGrid grid(n, elements_per_sample(pred));
  Tensor e_pol = at::empty({n}, pred.options().dtype(acc_dtype));
  Tensor e_ref = at::empty({with_ref ? n : 0}, pred.options().dtype(acc_dtype));
  if (n == 0) return {e_pol, e_ref};

  std::vector<double> partial_pol(grid.tasks());
  std::vector<double> partial_ref(with_ref ? grid.tasks() : 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "fastpref_sample_errors", [&] {
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    const scalar_t* r = with_ref ? ref_pred->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, grid.tasks(), grid.grain(), [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t offset = grid.sample(task) * grid.per_sample + grid.begin(task);
        const int64_t len = grid.end(task) - grid.begin(task);
        if (with_ref) {
          const auto [pol, ref] = ref_to_pred
                                      ? squared_error_sums<scalar_t, true, true>(p + offset, r + offset, t + offset, len)
                                      : squared_error_sums<scalar_t, true>(p + offset, r + offset, t + offset, len);
          partial_pol[task] = pol;
          partial_ref[task] = ref;
        } else {
          partial_pol[task] = squared_error_sums<scalar_t, false>(p + offset, nullptr, t + offset, len).first;
        }
      }
    });

    using acc = acc_t<scalar_t>;
    const acc* w = weight.has_value() ? weight->const_data_ptr<acc>() : nullptr;
    acc* out_pol = e_pol.mutable_data_ptr<acc>();
    acc* out_ref = with_ref ? e_ref.mutable_data_ptr<acc>() : nullptr;
    // An empty sample (D == 0) gives 0/0 = NaN, as torch's mean over nothing does.
    const double inv_d = 1.0 / static_cast<double>(grid.per_sample);
    for (int64_t i = 0; i < n; ++i) {
      double pol = 0.0;
      double ref = 0.0;
      for (int64_t c = 0; c < grid.chunks_per_sample; ++c) {
        pol += partial_pol[i * grid.chunks_per_sample + c];
        if (with_ref) ref += partial_ref[i * grid.chunks_per_sample + c];
      }
      const double wi = w ? static_cast<double>(w[i]) : 1.0;
      out_pol[i] = static_cast<acc>(pol * inv_d * wi);
      if (with_ref) out_ref[i] = static_cast<acc>(ref * inv_d * wi);
    }
  });
  return {e_pol, e_ref};
}

std::tuple<Tensor, Tensor> sample_errors_native(const Tensor& pred, const Tensor& target,
                                                const std::optional<Tensor>& ref_pred,
                                                const std::optional<Tensor>& weight) {
  return errors_impl(pred, target, ref_pred, weight, /*ref_to_pred=*/false);
}

std::tuple<Tensor, Tensor> step_errors_native(const Tensor& pred, const Tensor& target, const Tensor& ref_pred) {
  return errors_impl(pred, target, ref_pred, std::nullopt, /*ref_to_pred=*/true);
}

Tensor sample_errors_backward_native(const Tensor& grad_e_in, const Tensor& pred_in, const Tensor& target_in,
                                     const std::optional<Tensor>& weight_in) {
  check_pred(pred_in);
  check_prediction_like(target_in, "target", pred_in);
  const auto weight = per_sample_vector(weight_in, "weight", pred_in);
  const Tensor grad_e = *per_sample_vector(grad_e_in, "grad_e", pred_in);

  const Tensor pred = pred_in.contiguous();
  const Tensor target = target_in.contiguous();
  Tensor grad_pred = at::empty(pred.sizes(), pred.options());
  const int64_t n = pred.size(0);
  const ChunkGrid grid(n, elements_per_sample(pred));
  if (pred.numel() == 0) return grad_pred;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "fastpref_sample_errors_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* g = grad_pred.mutable_data_ptr<scalar_t>();
    const acc* ge = grad_e.const_data_ptr<acc>();
    const acc* w = weight.has_value() ? weight->const_data_ptr<acc>() : nullptr;
    const double two_over_d = 2.0 / static_cast<double>(grid.per_sample);
    at::parallel_for(0, grid.tasks(), grid.grain(), [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t i = grid.sample(task);
        const acc scale = static_cast<acc>(static_cast<double>(ge[i]) * (w ? static_cast<double>(w[i]) : 1.0) * two_over_d);
        const int64_t offset = i * grid.per_sample + grid.begin(task);
        scaled_differences<scalar_t>(p + offset, t + offset, scale, grid.end(task) - grid.begin(task), g + offset);
      }
    });
  });
  return grad_pred;
}

// d(sum_i grad_pol_i e_pol_i + grad_div_i e_div_i)/d pred of step_errors, one pass.
Tensor step_errors_backward_native(const Tensor& grad_pol_in, const Tensor& grad_div_in, const Tensor& pred_in,
                                   const Tensor& target_in, const Tensor& ref_in) {
  check_pred(pred_in);
  check_prediction_like(target_in, "target", pred_in);
  check_prediction_like(ref_in, "ref_pred", pred_in);
  const Tensor grad_pol = *per_sample_vector(grad_pol_in, "grad_pol", pred_in);
  const Tensor grad_div = *per_sample_vector(grad_div_in, "grad_div", pred_in);

  const Tensor pred = pred_in.contiguous();
  const Tensor target = target_in.contiguous();
  const Tensor ref = ref_in.contiguous();
  Tensor grad_pred = at::empty(pred.sizes(), pred.options());
  const ChunkGrid grid(pred.size(0), elements_per_sample(pred));
  if (pred.numel() == 0) return grad_pred;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "fastpref_step_errors_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    const scalar_t* r = ref.const_data_ptr<scalar_t>();
    scalar_t* g = grad_pred.mutable_data_ptr<scalar_t>();
    const acc* gp = grad_pol.const_data_ptr<acc>();
    const acc* gd = grad_div.const_data_ptr<acc>();
    const double two_over_d = 2.0 / static_cast<double>(grid.per_sample);
    at::parallel_for(0, grid.tasks(), grid.grain(), [&](int64_t first, int64_t last) {
      for (int64_t task = first; task < last; ++task) {
        const int64_t i = grid.sample(task);
        const int64_t offset = i * grid.per_sample + grid.begin(task);
        scaled_differences<scalar_t, true>(p + offset, t + offset, static_cast<acc>(static_cast<double>(gp[i]) * two_over_d),
                                           grid.end(task) - grid.begin(task), g + offset, r + offset,
                                           static_cast<acc>(static_cast<double>(gd[i]) * two_over_d));
      }
    });
  });
  return grad_pred;
}

// ---------------------------------------------------------------------------------------------
// Ranked pair loss (Diffusion-DPO for K=2, RankDPO with DCG pair weights, hinge / IPO variants)
// ---------------------------------------------------------------------------------------------

enum LossType : int64_t { kSigmoid = 0, kHinge = 1, kIpo = 2 };
enum Weighting : int64_t { kUniform = 0, kDcg = 1 };
constexpr int kNumStats = 4;  // reference.STAT_COLUMNS: weight_sum, num_pairs, num_correct, margin_sum

// log(1 + exp(z)) without overflow for large z or loss of precision for very negative z.
inline double softplus(double z) { return z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z)); }

inline double sigmoid(double z) {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

struct PairTerm {
  double loss;
  double dloss_dmargin;
};

inline PairTerm pair_term(double margin, double beta, int64_t loss_type) {
  const double x = beta * margin;
  switch (loss_type) {
    case kSigmoid:  // -log sigmoid(x) = softplus(-x)
      return {softplus(-x), -beta * sigmoid(-x)};
    case kHinge:  // relu(1 - x); zero slope at the kink, as torch's relu backward
      return 1.0 - x > 0 ? PairTerm{1.0 - x, -beta} : PairTerm{0.0, 0.0};
    default: {  // ipo: (m - 1/(2 beta))^2
      const double d = margin - 1.0 / (2.0 * beta);
      return {d * d, 2.0 * d};
    }
  }
}

struct GroupScratch {
  std::vector<double> discount;
  std::vector<double> gain;
  std::vector<double> grad;
};

// One group: rows [begin, begin + k). Writes loss, the group's stats row, and its rows of grad_s.
void ranked_pair_group(const double* s, const double* scores, int64_t begin, int64_t k, double beta, int64_t loss_type,
                       int64_t weighting, double* loss, double* stats, double* grad_s, GroupScratch& scratch) {
  s += begin;
  scores += begin;
  grad_s += begin;
  const bool dcg = weighting == kDcg;
  if (dcg) {
    scratch.discount.resize(k);
    scratch.gain.resize(k);
    for (int64_t i = 0; i < k; ++i) {
      // tau_i = 1-based rank by ascending s, ties by row index: the policy's own ordering.
      int64_t tau = 1;
      for (int64_t j = 0; j < k; ++j) tau += (s[j] < s[i]) || (s[j] == s[i] && j < i);
      scratch.discount[i] = 1.0 / std::log2(1.0 + static_cast<double>(tau));
      scratch.gain[i] = std::exp2(scores[i]) - 1.0;
    }
  }
  scratch.grad.assign(k, 0.0);
  double weight_sum = 0.0, weighted_loss = 0.0, num_pairs = 0.0, num_correct = 0.0, margin_sum = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      if (!(scores[i] > scores[j])) continue;  // only ordered pairs: i is the better sample
      const double margin = s[j] - s[i];
      const double x = beta * margin;
      const double pair_weight =
          dcg ? std::abs(scratch.gain[i] - scratch.gain[j]) * std::abs(scratch.discount[i] - scratch.discount[j]) : 1.0;
      const PairTerm term = pair_term(margin, beta, loss_type);
      weight_sum += pair_weight;
      weighted_loss += pair_weight * term.loss;
      num_pairs += 1.0;
      num_correct += x > 0 ? 1.0 : (x == 0 ? 0.5 : 0.0);
      margin_sum += x;
      // d margin / d s_j = +1, d margin / d s_i = -1
      scratch.grad[j] += pair_weight * term.dloss_dmargin;
      scratch.grad[i] -= pair_weight * term.dloss_dmargin;
    }
  }
  const bool has_weight = weight_sum > 0;
  *loss = has_weight ? weighted_loss / weight_sum : 0.0;
  for (int64_t i = 0; i < k; ++i) grad_s[i] = has_weight ? scratch.grad[i] / weight_sum : 0.0;
  stats[0] = weight_sum;
  stats[1] = num_pairs;
  stats[2] = num_correct;
  stats[3] = margin_sum;
}

void check_ranked_inputs(const Tensor& s, const Tensor& scores, const Tensor& offsets, double beta, int64_t loss_type,
                         int64_t weighting) {
  TORCH_CHECK(s.dim() == 1, "fastpref: s must have shape (N,), got ", s.sym_sizes());
  TORCH_CHECK(is_supported_float(s.scalar_type()), "fastpref: s must be float32, float64, bfloat16 or float16, got ",
              s.scalar_type());
  TORCH_CHECK(scores.dim() == 1 && scores.sym_size(0) == s.sym_size(0), "fastpref: scores must have shape (N,) = (",
              s.sym_size(0), ",) like s, got ", scores.sym_sizes());
  TORCH_CHECK(scores.is_floating_point() || at::isIntegralType(scores.scalar_type(), /*includeBool=*/false),
              "fastpref: scores must be a real-valued tensor, got ", scores.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.sym_size(0) >= 1, "fastpref: offsets must have shape (B+1,), got ",
              offsets.sym_sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "fastpref: offsets must be int64, got ", offsets.scalar_type());
  for (const auto& [t, name] : {std::pair{&scores, "scores"}, std::pair{&offsets, "offsets"}}) {
    TORCH_CHECK(t->device() == s.device(), "fastpref: ", name, " is on ", t->device(), " but s is on ", s.device());
  }
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "fastpref: beta must be a positive finite number, got ", beta);
  TORCH_CHECK(loss_type == kSigmoid || loss_type == kHinge || loss_type == kIpo,
              "fastpref: loss_type must be 0 (sigmoid), 1 (hinge) or 2 (ipo), got ", loss_type);
  TORCH_CHECK(weighting == kUniform || weighting == kDcg, "fastpref: weighting must be 0 (uniform) or 1 (dcg), got ",
              weighting);
}

std::tuple<Tensor, Tensor, Tensor> ranked_pair_loss_native(const Tensor& s_in, const Tensor& scores_in,
                                                           const Tensor& offsets_in, double beta, int64_t loss_type,
                                                           int64_t weighting) {
  check_ranked_inputs(s_in, scores_in, offsets_in, beta, loss_type, weighting);
  const int64_t n = s_in.size(0);
  const int64_t num_groups = offsets_in.size(0) - 1;
  const Tensor offsets = offsets_in.contiguous();
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0 && off[num_groups] <= n, "fastpref: offsets must lie in [0, N] = [0, ", n, "], got first ",
              off[0], " and last ", off[num_groups]);
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK(off[g] <= off[g + 1], "fastpref: offsets must be non-decreasing, but offsets[", g, "] = ", off[g],
                " > offsets[", g + 1, "] = ", off[g + 1]);
  }

  // K^2 pairs per group with K ~ 2-16: computing in float64 costs nothing next to the rest of a
  // training step and keeps the loss and gradient exact to float32 output precision. Widening is
  // order-preserving, so ranks, ties and the correct-pair counts are those of the input dtype.
  const Tensor s = s_in.to(at::kDouble).contiguous();
  const Tensor scores = scores_in.to(at::kDouble).contiguous();
  const auto out_options = s_in.options().dtype(accumulation_dtype(s_in.scalar_type()));
  Tensor loss = at::empty({num_groups}, s.options());
  Tensor stats = at::empty({num_groups, kNumStats}, s.options());
  // Rows outside every group get no gradient.
  Tensor grad_s = at::zeros({n}, s.options());

  const double* s_ptr = s.const_data_ptr<double>();
  const double* scores_ptr = scores.const_data_ptr<double>();
  double* loss_ptr = loss.mutable_data_ptr<double>();
  double* stats_ptr = stats.mutable_data_ptr<double>();
  double* grad_ptr = grad_s.mutable_data_ptr<double>();
  const int64_t rows = off[num_groups] - off[0];
  const int64_t mean_pairs = num_groups > 0 ? std::max<int64_t>(1, rows * rows / (num_groups * num_groups)) : 1;
  at::parallel_for(0, num_groups, std::max<int64_t>(1, 4096 / mean_pairs), [&](int64_t first, int64_t last) {
    GroupScratch scratch;
    for (int64_t g = first; g < last; ++g) {
      ranked_pair_group(s_ptr, scores_ptr, off[g], off[g + 1] - off[g], beta, loss_type, weighting, loss_ptr + g,
                        stats_ptr + g * kNumStats, grad_ptr, scratch);
    }
  });
  return {loss.to(out_options), grad_s.to(out_options), stats.to(out_options)};
}

// ---------------------------------------------------------------------------------------------
// Meta kernels: shapes and dtypes only, so the ops trace under torch.compile / fake tensors.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> sample_errors_meta(const Tensor& pred, const Tensor& target,
                                              const std::optional<Tensor>& ref_pred,
                                              const std::optional<Tensor>& weight) {
  check_pred(pred);
  check_prediction_like(target, "target", pred);
  if (ref_pred.has_value()) check_prediction_like(*ref_pred, "ref_pred", pred);
  const auto options = pred.options().dtype(accumulation_dtype(pred.scalar_type()));
  const c10::SymInt n = pred.sym_size(0);
  return {at::empty_symint({n}, options), at::empty_symint({ref_pred.has_value() ? n : c10::SymInt(0)}, options)};
}

Tensor sample_errors_backward_meta(const Tensor& grad_e, const Tensor& pred, const Tensor& target,
                                   const std::optional<Tensor>& weight) {
  check_pred(pred);
  check_prediction_like(target, "target", pred);
  return at::empty_symint(pred.sym_sizes(), pred.options());
}

std::tuple<Tensor, Tensor> step_errors_meta(const Tensor& pred, const Tensor& target, const Tensor& ref_pred) {
  check_pred(pred);
  check_prediction_like(target, "target", pred);
  check_prediction_like(ref_pred, "ref_pred", pred);
  const auto options = pred.options().dtype(accumulation_dtype(pred.scalar_type()));
  return {at::empty_symint({pred.sym_size(0)}, options), at::empty_symint({pred.sym_size(0)}, options)};
}

Tensor step_errors_backward_meta(const Tensor& grad_pol, const Tensor& grad_div, const Tensor& pred,
                                 const Tensor& target, const Tensor& ref_pred) {
  check_pred(pred);
  check_prediction_like(target, "target", pred);
  check_prediction_like(ref_pred, "ref_pred", pred);
  return at::empty_symint(pred.sym_sizes(), pred.options());
}

std::tuple<Tensor, Tensor, Tensor> ranked_pair_loss_meta(const Tensor& s, const Tensor& scores, const Tensor& offsets,
                                                         double beta, int64_t loss_type, int64_t weighting) {
  check_ranked_inputs(s, scores, offsets, beta, loss_type, weighting);
  const auto options = s.options().dtype(accumulation_dtype(s.scalar_type()));
  const c10::SymInt num_groups = offsets.sym_size(0) - 1;
  return {at::empty_symint({num_groups}, options), at::empty_symint({s.sym_size(0)}, options),
          at::empty_symint({num_groups, c10::SymInt(kNumStats)}, options)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpref, m) {
  m.def(
      "sample_errors_native(Tensor pred, Tensor target, Tensor? ref_pred, Tensor? weight) -> (Tensor e_pol, Tensor e_ref)",
      {at::Tag::pt2_compliant_tag});
  m.def("sample_errors_backward_native(Tensor grad_e, Tensor pred, Tensor target, Tensor? weight) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "ranked_pair_loss_native(Tensor s, Tensor scores, Tensor offsets, float beta, int loss_type, int weighting) "
      "-> (Tensor loss_per_group, Tensor grad_s, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def("step_errors_native(Tensor pred, Tensor target, Tensor ref_pred) -> (Tensor e_pol, Tensor e_div)",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "step_errors_backward_native(Tensor grad_pol, Tensor grad_div, Tensor pred, Tensor target, Tensor ref_pred) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fastpref, CPU, m) {
  m.impl("sample_errors_native", &sample_errors_native);
  m.impl("sample_errors_backward_native", &sample_errors_backward_native);
  m.impl("ranked_pair_loss_native", &ranked_pair_loss_native);
  m.impl("step_errors_native", &step_errors_native);
  m.impl("step_errors_backward_native", &step_errors_backward_native);
}

TORCH_LIBRARY_IMPL(fastpref, Meta, m) {
  m.impl("sample_errors_native", &sample_errors_meta);
  m.impl("sample_errors_backward_native", &sample_errors_backward_meta);
  m.impl("ranked_pair_loss_native", &ranked_pair_loss_meta);
  m.impl("step_errors_native", &step_errors_meta);
  m.impl("step_errors_backward_native", &step_errors_backward_meta);
}

}  // namespace fastpref

// A module with no functions: importing fastpref._C only loads the library, whose static
// initializers above register the ops with the dispatcher.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastpref native CPU ops; importing registers torch.ops.fastpref.*_native",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
