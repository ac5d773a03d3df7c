// MeteoRA's mixture on the CPU in one call: the routing and the chosen B's, read from the layer's one stacked
// product y = x [W; A_flat; W_g; 0]^T (see meteora/kernels/cpu.py, which builds and calls this file).
//
// On a CPU each small tensor operation costs microseconds of dispatch, and the routing takes about ten of them;
// here it is a loop over the N gate logits of each token. Then either the chosen adapters alone are added
// (few tokens: k r rows of B per token, vectorised with AVX2 + FMA where the CPU has them) or the routing
// coefficients are written onto h and one GEMM against every B is added to the base block (many tokens).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <vector>

namespace {

enum Mode : int64_t { kTopK = 0, kSoft = 1, kTopKUnnormalized = 2 };

// descending order with NaN first, as torch.sort(descending=True) orders them; equal values keep index order
template <typename acc_t>
inline bool before(acc_t a, acc_t b) {
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

// coef[e] = w_e s_e for the chosen adapters (0 for the others) of one token from its N logits; chosen[0..k) gets
// the chosen adapters best first (every adapter in index order for the soft mode). Returns how many were chosen.
template <typename scalar_t, typename acc_t>
int64_t route_token(const scalar_t* logits, int64_t n, int64_t k, acc_t temperature, Mode mode, const acc_t* scaling,
                    acc_t* scaled, acc_t* coef, int64_t* chosen) {
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
    coef[e] = std::exp(scaled[e] - peak) * inverse * scaling[e];
  }
  return k;
}

// acc[0..d) += c * b[0..d); the same loop compiled twice, for AVX2 + FMA and for the baseline instruction set
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void axpy_avx2(acc_t c, const scalar_t* b, acc_t* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += c * static_cast<acc_t>(b[i]);
}

template <typename scalar_t, typename acc_t>
void axpy_base(acc_t c, const scalar_t* b, acc_t* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] += c * static_cast<acc_t>(b[i]);
}

template <typename scalar_t, typename acc_t>
at::Tensor mix(const at::Tensor& y, const at::Tensor& lora_b_rows, const at::Tensor& scaling, int64_t top_k,
               double temperature, Mode mode, int64_t sparse_tokens) {
  const int64_t tokens = y.size(0), stride = y.stride(0);
  const int64_t n = lora_b_rows.size(0), rank = lora_b_rows.size(1), d_out = lora_b_rows.size(2);
  const int64_t gate_start = d_out + n * rank;
  const scalar_t* y_data = y.const_data_ptr<scalar_t>();
  const scalar_t* b_data = lora_b_rows.const_data_ptr<scalar_t>();
  const at::Tensor scale = scaling.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // no copy if it is
  const acc_t* s_data = scale.const_data_ptr<acc_t>();
  std::vector<acc_t> scaled(n), coef(n);
  std::vector<int64_t> chosen(n);
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

  if (tokens <= sparse_tokens) {  // base + sum_j (w_j s_j h_j) B_j, the k chosen B's alone
    at::Tensor out = at::empty({tokens, d_out}, y.options());
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> acc(d_out);
    for (int64_t t = 0; t < tokens; ++t) {
      const scalar_t* row = y_data + t * stride;
      const int64_t k = route_token(row + gate_start, n, top_k, static_cast<acc_t>(temperature), mode, s_data,
                                    scaled.data(), coef.data(), chosen.data());
      for (int64_t i = 0; i < d_out; ++i) acc[i] = static_cast<acc_t>(row[i]);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = chosen[j];
        for (int64_t q = 0; q < rank; ++q) {
          const acc_t c = static_cast<acc_t>(row[d_out + e * rank + q]) * coef[e];
          const scalar_t* b = b_data + (e * rank + q) * d_out;
          if (avx2) {
            axpy_avx2(c, b, acc.data(), d_out);
          } else {
            axpy_base(c, b, acc.data(), d_out);
          }
        }
      }
      for (int64_t i = 0; i < d_out; ++i) out_data[t * d_out + i] = static_cast<scalar_t>(acc[i]);
    }
    return out;
  }
  // (coef * h) in y's dtype, zero off the chosen adapters, then base + it @ B_flat in one GEMM
  at::Tensor mixed = at::empty({tokens, n * rank}, y.options());
  scalar_t* mixed_data = mixed.mutable_data_ptr<scalar_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    const scalar_t* row = y_data + t * stride;
    route_token(row + gate_start, n, top_k, static_cast<acc_t>(temperature), mode, s_data, scaled.data(), coef.data(),
                chosen.data());
    for (int64_t e = 0; e < n; ++e) {
      for (int64_t q = 0; q < rank; ++q) {
        const int64_t col = e * rank + q;
        mixed_data[t * n * rank + col] = static_cast<scalar_t>(static_cast<acc_t>(row[d_out + col]) * coef[e]);
      }
    }
  }
  return at::addmm(y.narrow(1, 0, d_out), mixed, lora_b_rows.view({n * rank, d_out}));
}

// y (T, S) with unit last stride, S >= d_out + N r + N; lora_b_rows (N, r, d_out) contiguous in y's dtype; scaling
// (N,), used in float64 for float64 and float32 otherwise. Returns out (T, d_out) in y's dtype. Unchecked: the
// caller (meteora.kernels.cpu.stacked_mix) passes what MeteoRALinear has checked at attach time.
at::Tensor stacked_mix(const at::Tensor& y, const at::Tensor& lora_b_rows, const at::Tensor& scaling, int64_t top_k,
                       double temperature, int64_t mode, int64_t sparse_tokens) {
  const bool readable = y.is_cpu() && lora_b_rows.is_cpu() && scaling.is_cpu() && y.dim() == 2 && y.stride(1) == 1 &&
                        lora_b_rows.dim() == 3 && lora_b_rows.is_contiguous() && scaling.dim() == 1 &&
                        scaling.numel() == lora_b_rows.size(0) &&
                        y.size(1) >= lora_b_rows.size(2) + lora_b_rows.size(0) * (lora_b_rows.size(1) + 1);
  TORCH_CHECK(readable, "meteora_cpu_mix.stacked_mix: y ", y.sizes(), " (strides ", y.strides(), "), lora_b_rows ",
              lora_b_rows.sizes(), " and scaling ", scaling.sizes(), " do not have the layouts it reads (CPU tensors)");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "meteora_stacked_mix", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = mix<scalar_t, acc_t>(y, lora_b_rows, scaling, top_k, temperature, static_cast<Mode>(mode), sparse_tokens);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stacked_mix", &stacked_mix, "MeteoRA's routing and mixture read from the stacked product (CPU)");
}
