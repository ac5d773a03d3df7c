// MeteoRA's mixture on the CPU in one call: the routing and the chosen B's, from the gate logits and h = x A^T
// (routed_mix) or read from the layer's one stacked product y = x [W; A_flat; W_g; 0]^T (stacked_mix); see
// meteora/kernels/cpu.py, which builds and calls this file.
//
// On a CPU each small tensor operation costs microseconds of dispatch, and the routing takes about ten of them;
// here it is a loop over the N gate logits of each token. Then the token's k chosen adapters alone are added to
// its base output (k r rows of B, vectorised with AVX2 + FMA where the CPU has them): k r terms instead of the
// N r of a dense product, and every token computed on its own, so its output does not depend on the batch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

enum Mode : int64_t { kTopK = 0, kSoft = 1, kTopKUnnormalized = 2 };

// Tokens per thread at least (fewer run inline in the caller's thread: decode steps start no threads).
constexpr int64_t kGrainTokens = 32;

// descending order with NaN first, as torch.sort(descending=True) orders them; equal values keep index order
template <typename acc_t>
inline bool before(acc_t a, acc_t b) {
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

// One token's routing from its N logits: chosen[0..k) the chosen adapters best first (every adapter in index order
// for the soft mode), weight[0..k) their mixing weights, coef[e] = w_e s_e (0 off the chosen). Returns k.
template <typename scalar_t, typename acc_t>
int64_t route_token(const scalar_t* logits, int64_t n, int64_t k, acc_t temperature, Mode mode, const acc_t* scaling,
                    acc_t* scaled, acc_t* coef, int64_t* chosen, acc_t* weight) {
  for (int64_t e = 0; e < n; ++e) {
    scaled[e] = static_cast<acc_t>(logits[e]);
    coef[e] = 0;
  }
  if (mode == kSoft) {
    k = n;
    for (int64_t e = 0; e < n; ++e) chosen[e] = e;
  } else {  // selection of the k best, lower index first among equals
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < n; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || chosen[i] == e;
        if (!taken && (best < 0 || before(scaled[e], scaled[best]))) best = e;
      }
      chosen[j] = best;
    }
  }
  if (temperature != 1) {
    for (int64_t e = 0; e < n; ++e) scaled[e] /= temperature;
  }
  // softmax over the chosen (topk) or over every adapter (soft, topk_unnormalized), the peak subtracted
  const bool over_all = mode != kTopK;
  acc_t peak = scaled[chosen[0]];  // the largest logit in the top-k modes (a NaN among them makes every weight NaN)
  if (mode == kSoft) {
    for (int64_t e = 1; e < n; ++e) peak = scaled[e] > peak ? scaled[e] : peak;
  }
  acc_t total = 0;
  if (over_all) {
    for (int64_t e = 0; e < n; ++e) total += std::exp(scaled[e] - peak);
  } else {
    for (int64_t j = 0; j < k; ++j) total += std::exp(scaled[chosen[j]] - peak);
  }
  const acc_t inverse = acc_t(1) / total;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = chosen[j];
    weight[j] = std::exp(scaled[e] - peak) * inverse;
    coef[e] = weight[j] * scaling[e];
  }
  return k;
}

// One element as acc_t; bfloat16 from its raw bits (the upper half of a float32), which the compiler vectorises.
template <typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline acc_t load(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[0]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    return static_cast<acc_t>(*p);
  }
}

// acc[0..d) += sum_q c[q] B_e[q, :] for one adapter's B_e, stored as (r, d) rows (`rows`, a layer's B_flat) or as
// (d, r) (an nn.Linear's weight, as callers of the operator pass it). Inlined into the two versions below.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void add_adapter(const acc_t* c, const scalar_t* b, bool rows, int64_t rank,
                                                       int64_t d, acc_t* acc) {
  if (rows) {
    for (int64_t q = 0; q < rank; ++q) {
      for (int64_t i = 0; i < d; ++i) acc[i] += c[q] * load<acc_t>(b + q * d + i);
    }
  } else {
    for (int64_t i = 0; i < d; ++i) {
      acc_t sum = 0;
      for (int64_t q = 0; q < rank; ++q) sum += c[q] * load<acc_t>(b + i * rank + q);
      acc[i] += sum;
    }
  }
}

// the same loops compiled for AVX2 + FMA (on x86, where the CPU has them) and for the baseline instruction set
#if defined(__x86_64__) || defined(__i386__)
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void add_adapter_avx2(const acc_t* c, const scalar_t* b, bool rows, int64_t rank,
                                                          int64_t d, acc_t* acc) {
  add_adapter(c, b, rows, rank, d, acc);
}
#endif

template <typename scalar_t, typename acc_t>
void add_adapter_base(const acc_t* c, const scalar_t* b, bool rows, int64_t rank, int64_t d, acc_t* acc) {
  add_adapter(c, b, rows, rank, d, acc);
}

// Whether add_adapter_avx2 can run here.
inline bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename scalar_t, typename acc_t>
void add_adapter_any(bool avx2, const acc_t* c, const scalar_t* b, bool rows, int64_t rank, int64_t d, acc_t* acc) {
#if defined(__x86_64__) || defined(__i386__)
  if (avx2) return add_adapter_avx2(c, b, rows, rank, d, acc);
#endif
  add_adapter_base(c, b, rows, rank, d, acc);
}

// The mixture of T tokens: gate_logits (T, N) and hidden (T, N r) in scalar_t with unit last stride (row strides
// any), base (T, d_out) the same or undefined (out = delta), b_rows (N, r, d_out) contiguous or a permuted
// contiguous (N, d_out, r), scale (N,) in acc_t.
// Where `routing` is given, fills it: logits (T, N) in acc_t, indices (T, k) int64, weights (T, k) in acc_t.
template <typename scalar_t, typename acc_t>
at::Tensor mix(const at::Tensor& gate_logits, const at::Tensor& hidden, const at::Tensor& base, const at::Tensor& b_rows,
               const at::Tensor& scale, int64_t top_k, double temperature, Mode mode, std::vector<at::Tensor>* routing) {
  const int64_t tokens = hidden.size(0), n = b_rows.size(0), rank = b_rows.size(1), d_out = b_rows.size(2);
  const int64_t k_out = mode == kSoft ? n : top_k;
  const scalar_t* logit_data = gate_logits.const_data_ptr<scalar_t>();
  const scalar_t* h_data = hidden.const_data_ptr<scalar_t>();
  const bool rows = b_rows.is_contiguous();  // else (N, d_out, r) contiguous, permuted: see dispatch
  const scalar_t* b_data = b_rows.const_data_ptr<scalar_t>();
  const acc_t* s_data = scale.const_data_ptr<acc_t>();
  const int64_t logit_stride = gate_logits.stride(0), h_stride = hidden.stride(0);
  acc_t* kept_logits = nullptr;
  int64_t* kept_indices = nullptr;
  acc_t* kept_weights = nullptr;
  if (routing != nullptr) {
    const auto acc_options = hidden.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    *routing = {at::empty({tokens, n}, acc_options), at::empty({tokens, k_out}, hidden.options().dtype(at::kLong)),
                at::empty({tokens, k_out}, acc_options)};
    kept_logits = (*routing)[0].mutable_data_ptr<acc_t>();
    kept_indices = (*routing)[1].mutable_data_ptr<int64_t>();
    kept_weights = (*routing)[2].mutable_data_ptr<acc_t>();
  }
  const bool avx2 = has_avx2();
  at::Tensor out = at::empty({tokens, d_out}, hidden.options());
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const scalar_t* base_data = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
  const int64_t base_stride = base.defined() ? base.stride(0) : 0;
  // tokens in chunks over torch's intra-op threads (one chunk, inline, up to kGrainTokens); every token on its own
  at::parallel_for(0, tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scaled(n), coef(n), weight(n), acc(d_out), c(rank);
    std::vector<int64_t> chosen(n);
    for (int64_t t = begin; t < end; ++t) {
      // the routing into coef / chosen / weight, kept where asked for
      const int64_t k = route_token(logit_data + t * logit_stride, n, top_k, static_cast<acc_t>(temperature), mode,
                                    s_data, scaled.data(), coef.data(), chosen.data(), weight.data());
      if (kept_logits != nullptr) {
        for (int64_t e = 0; e < n; ++e) kept_logits[t * n + e] = static_cast<acc_t>(logit_data[t * logit_stride + e]);
        for (int64_t j = 0; j < k; ++j) {
          kept_indices[t * k + j] = chosen[j];
          kept_weights[t * k + j] = weight[j];
        }
      }
      // out = base + sum_j (w_j s_j h_j) B_j over the k chosen B's, accumulated in acc_t
      for (int64_t i = 0; i < d_out; ++i) {
        acc[i] = base_data != nullptr ? static_cast<acc_t>(base_data[t * base_stride + i]) : acc_t(0);
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = chosen[j];
        for (int64_t q = 0; q < rank; ++q) c[q] = static_cast<acc_t>(h_data[t * h_stride + e * rank + q]) * coef[e];
        add_adapter_any(avx2, c.data(), b_data + e * rank * d_out, rows, rank, d_out, acc.data());
      }
      for (int64_t i = 0; i < d_out; ++i) out_data[t * d_out + i] = static_cast<scalar_t>(acc[i]);
    }
  });
  return out;
}

// "[a, b, c]" ("undefined" for no tensor), with std::to_string: errors are std::invalid_argument (ValueError in
// Python) with plain strings, not TORCH_CHECK's streamed messages, which crashed when thrown from this extension
// built with g++ 13 against torch 2.11 (seen on a GPU host; plain-string errors were caught there).
std::string shape_text(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string text = "[";
  for (int64_t i = 0; i < t.dim(); ++i) text += (i ? ", " : "") + std::to_string(t.size(i));
  return text + "]";
}

// A 2-D tensor with unit last stride: the tensor itself if it has one, else a contiguous copy.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(1) == 1 ? t : t.contiguous();
}

// B as (N, r, d_out): the tensor itself if contiguous, or a permuted contiguous (N, d_out, r) read in place while
// the tokens choose fewer adapters in all than there are (its per-output dot products of r terms vectorise worse
// than the rows' updates, so from there one contiguous copy is cheaper), else a contiguous copy.
at::Tensor readable_b(const at::Tensor& b, int64_t choices) {
  return b.is_contiguous() || (choices < b.size(0) && b.permute({0, 2, 1}).is_contiguous()) ? b : b.contiguous();
}

std::vector<at::Tensor> dispatch(const at::Tensor& gate_logits, const at::Tensor& hidden, const at::Tensor& base,
                                 const at::Tensor& lora_b_rows, const at::Tensor& scaling, int64_t top_k, double temperature,
                                 int64_t mode, bool keep_routing) {
  const int64_t tokens = hidden.dim() == 2 ? hidden.size(0) : -1;
  const bool readable =
      hidden.is_cpu() && hidden.is_floating_point() && gate_logits.is_cpu() && lora_b_rows.is_cpu() && scaling.is_cpu() &&
      hidden.dim() == 2 && gate_logits.dim() == 2 && lora_b_rows.dim() == 3 && scaling.dim() == 1 &&
      gate_logits.size(0) == tokens &&
      gate_logits.size(1) == lora_b_rows.size(0) && hidden.size(1) == lora_b_rows.size(0) * lora_b_rows.size(1) &&
      scaling.numel() == lora_b_rows.size(0) && gate_logits.scalar_type() == hidden.scalar_type() &&
      lora_b_rows.scalar_type() == hidden.scalar_type() && mode >= kTopK && mode <= kTopKUnnormalized &&
      (mode == kSoft || (top_k >= 1 && top_k <= lora_b_rows.size(0))) &&
      (!base.defined() || (base.is_cpu() && base.dim() == 2 && base.size(0) == tokens &&
                           base.size(1) == lora_b_rows.size(2) && base.scalar_type() == hidden.scalar_type()));
  if (!readable) {
    throw std::invalid_argument(
        "meteora_cpu_mix: gate_logits " + shape_text(gate_logits) + ", hidden " + shape_text(hidden) + ", lora_b_rows " +
        shape_text(lora_b_rows) + ", scaling " + shape_text(scaling) + ", base " + shape_text(base) + ", top_k " +
        std::to_string(top_k) + ", mode " + std::to_string(mode) +
        ": not the CPU tensors (T, N), (T, N r), (N, r, d_out), (N,), (T, d_out) of one dtype it reads");
  }
  std::vector<at::Tensor> result(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "meteora_cpu_mix", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor scale = scaling.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // no copy if it is
    std::vector<at::Tensor> routing;
    const int64_t choices = tokens * (mode == kSoft ? lora_b_rows.size(0) : top_k);
    result[0] = mix<scalar_t, acc_t>(unit_last_stride(gate_logits), unit_last_stride(hidden),
                                     base.defined() ? unit_last_stride(base) : base, readable_b(lora_b_rows, choices),
                                     scale, top_k, temperature, static_cast<Mode>(mode), keep_routing ? &routing : nullptr);
    result.insert(result.end(), routing.begin(), routing.end());
  });
  return result;
}

// The mixture read from MeteoRALinear's stacked product y = x [W; A_flat; W_g; 0]^T (T, S): columns [0, d_out) the
// base output, [d_out, d_out + N r) h, then the N gate logits. Returns out (T, d_out) in y's dtype.
at::Tensor stacked_mix(const at::Tensor& y, const at::Tensor& lora_b_rows, const at::Tensor& scaling, int64_t top_k,
                       double temperature, int64_t mode) {
  if (y.dim() != 2 || lora_b_rows.dim() != 3 ||
      y.size(1) < lora_b_rows.size(2) + lora_b_rows.size(0) * (lora_b_rows.size(1) + 1)) {
    throw std::invalid_argument("meteora_cpu_mix.stacked_mix: y " + shape_text(y) + " has too few columns for lora_b_rows " +
                                shape_text(lora_b_rows));
  }
  const int64_t n = lora_b_rows.size(0), d_out = lora_b_rows.size(2), start = d_out + n * lora_b_rows.size(1);
  return dispatch(y.narrow(1, start, n), y.narrow(1, d_out, start - d_out), y.narrow(1, 0, d_out), lora_b_rows, scaling,
                  top_k, temperature, mode, false)[0];
}

// The mixture from products already made, with the routing: (out, logits, indices, weights); base may be None.
std::vector<at::Tensor> routed_mix(const at::Tensor& gate_logits, const at::Tensor& hidden, const std::optional<at::Tensor>& base,
                                   const at::Tensor& lora_b_rows, const at::Tensor& scaling, int64_t top_k, double temperature,
                                   int64_t mode) {
  return dispatch(gate_logits, hidden, base.value_or(at::Tensor()), lora_b_rows, scaling, top_k, temperature, mode, true);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stacked_mix", &stacked_mix, "MeteoRA's mixture read from the layer's stacked product (CPU)");
  m.def("routed_mix", &routed_mix, "MeteoRA's mixture and its routing from the gate logits and h (CPU)");
}
