// LayerNorm fused with the token shift and its mixes (rwkv-models.md §6, §7.1, §7.4 step 1).
//
// Rows are r = b * T + t of x [B*T, C]. For each row the kernel computes xx = LN(x_r) (eps 1e-5,
// biased variance, fp32 math, rounded to the storage type like torch's layer_norm), the previous
// token's LN output p (LN of row r-1 for t > 0, else the carried shift vector of sequence b), and
//     v7 order:  out_m = xx + (p - xx) * mu_m          (x + delta * mu)
//     v4 order:  out_m = p + (xx - p) * mu_m           (mu * x + (1 - mu) * p)
// for each of n_mix mixing vectors. Twin: rwkv_cli.cuda.twins.ln_mix.
#include "common.cuh"

template <class S>
__device__ __forceinline__ void row_stats(const typename S::T* row, int C, float* scratch, float& mean, float& rstd) {
    float s = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += S::load(row[c]);
    mean = block_sum(s, scratch) / C;
    float v = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = S::load(row[c]) - mean;
        v += d * d;
    }
    rstd = rsqrtf(block_sum(v, scratch) / C + 1e-5f);
}

// grid: (B*T) blocks; block: 256 threads.
template <class S>
__device__ void ln_mix_impl(const typename S::T* __restrict__ x,      // [B*T, C]
                            const typename S::T* __restrict__ shift,  // [B, C] carried LN output
                            const typename S::T* __restrict__ w,      // [C]
                            const typename S::T* __restrict__ bias,   // [C]
                            const typename S::T* __restrict__ mix,    // [n_mix, C]
                            typename S::T* __restrict__ out,          // [n_mix, B*T, C]
                            typename S::T* __restrict__ xx_out,       // [B*T, C] or null
                            typename S::T* __restrict__ shift_out,    // [B, C] or null: xx of t = T-1
                            int T, int C, int n_mix, int v4_order) {
    __shared__ float scratch[32];
    const int r = blockIdx.x, t = r % T, b = r / T;
    const int R = gridDim.x;
    const typename S::T* row = x + (size_t)r * C;
    float mean, rstd, pmean = 0.f, prstd = 0.f;
    row_stats<S>(row, C, scratch, mean, rstd);
    if (t > 0) row_stats<S>(row - C, C, scratch, pmean, prstd);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float wc = S::load(w[c]), bc = S::load(bias[c]);
        const float xx = S::load(S::store((S::load(row[c]) - mean) * rstd * wc + bc));
        const float p = t > 0 ? S::load(S::store((S::load(row[c - C]) - pmean) * prstd * wc + bc))
                              : S::load(shift[(size_t)b * C + c]);
        if (xx_out) xx_out[(size_t)r * C + c] = S::store(xx);
        if (shift_out && t == T - 1) shift_out[(size_t)b * C + c] = S::store(xx);
        const float base = v4_order ? p : xx, other = v4_order ? xx : p;
        for (int m = 0; m < n_mix; ++m)
            out[((size_t)m * R + r) * C + c] = S::store(base + (other - base) * S::load(mix[(size_t)m * C + c]));
    }
}

#define LN_MIX(S, SUF)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) ln_mix_##SUF(                                               \
        const S::T* x, const S::T* shift, const S::T* w, const S::T* bias, const S::T* mix, S::T* out,    \
        S::T* xx_out, S::T* shift_out, int T, int C, int n_mix, int v4_order) {                           \
        ln_mix_impl<S>(x, shift, w, bias, mix, out, xx_out, shift_out, T, C, n_mix, v4_order);            \
    }
LN_MIX(F16, f16)
LN_MIX(BF16, bf16)
LN_MIX(F32, f32)
