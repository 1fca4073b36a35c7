// LayerNorm fused with the token shift and its mixes (rwkv-models.md §6, §7.1, §7.4 step 1), and
// the in-place activations of batched decoding (`act_inplace`, at the end).
//
// Rows are r = b * T + t of x [B*T, C]. For each row the kernel computes xx = LN(x_r) (eps 1e-5,
// biased variance, fp32 math, rounded to the storage type like torch's layer_norm), the previous
// token's LN output p (LN of row r-1 for t > 0, else the carried shift vector of sequence b), and
//     v7 order:  out_m = xx + (p - xx) * mu_m          (x + delta * mu)
//     v4 order:  out_m = p + (xx - p) * mu_m           (mu * x + (1 - mu) * p)
// for each of n_mix mixing vectors. Twin: rwkv_cli.cuda.twins.ln_mix.
#include "common.cuh"

#define LN_MAX_MIX 6  // mixing vectors at most (RWKV-7 time mix)

// 16 bytes of a row as fp32 values: 8 for 16-bit storage, 4 for fp32.
template <class S> struct Vec {
    static constexpr int N = 16 / sizeof(typename S::T);
    static __device__ __forceinline__ void load(const typename S::T* p, float* f) {
        const uint4 v = *(const uint4*)p;
        const u32 w[4] = {v.x, v.y, v.z, v.w};
        if constexpr (N == 8) {
#pragma unroll
            for (int i = 0; i < 4; ++i) { f[2 * i] = S::lo(w[i]); f[2 * i + 1] = S::hi(w[i]); }
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
        }
    }
    static __device__ __forceinline__ void store(typename S::T* p, const float* f) {
        u32 w[4];
        if constexpr (N == 8) {
#pragma unroll
            for (int i = 0; i < 4; ++i) w[i] = (u32)S::store(f[2 * i]) | ((u32)S::store(f[2 * i + 1]) << 16);
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(f[i]);
        }
        *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);
    }
};

// Mean and 1/std of one row, by one warp (two passes: the second re-reads the row from L1).
template <class S>
__device__ __forceinline__ void row_stats(const typename S::T* row, int C, float& mean, float& rstd) {
    constexpr int N = Vec<S>::N;
    const int lane = threadIdx.x & 31;
    float s = 0.f, f[N];
    for (int c = lane * N; c < C; c += 32 * N) {
        Vec<S>::load(row + c, f);
#pragma unroll
        for (int e = 0; e < N; ++e) s += f[e];
    }
    mean = warp_sum(s) / C;
    float v = 0.f;
    for (int c = lane * N; c < C; c += 32 * N) {
        Vec<S>::load(row + c, f);
#pragma unroll
        for (int e = 0; e < N; ++e) v += (f[e] - mean) * (f[e] - mean);
    }
    rstd = rsqrtf(warp_sum(v) / C + 1e-5f);
}

// grid: (B*T) blocks, one row each; block: 256 threads. C a multiple of 16 bytes' worth of
// values, every pointer 16-byte aligned. Every warp computes the row's statistics itself (the
// second pass reads L1), so no block-wide barrier is needed, and the threads then share the
// columns: a decoding step's LayerNorm (few rows) is a short chain of latencies, not a loop.
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
    constexpr int N = Vec<S>::N;
    const int r = blockIdx.x, t = r % T, b = r / T;
    const size_t R = gridDim.x;
    const typename S::T* row = x + (size_t)r * C;
    float mean, rstd, pmean = 0.f, prstd = 0.f;
    row_stats<S>(row, C, mean, rstd);
    if (t > 0) row_stats<S>(row - C, C, pmean, prstd);
    for (int c = threadIdx.x * N; c < C; c += blockDim.x * N) {
        float xv[N], wv[N], bv[N], xx[N], p[N], o[N];
        Vec<S>::load(row + c, xv);
        Vec<S>::load(w + c, wv);
        Vec<S>::load(bias + c, bv);
#pragma unroll
        for (int e = 0; e < N; ++e) xx[e] = S::load(S::store((xv[e] - mean) * rstd * wv[e] + bv[e]));
        if (t > 0) {
            Vec<S>::load(row - C + c, p);
#pragma unroll
            for (int e = 0; e < N; ++e) p[e] = S::load(S::store((p[e] - pmean) * prstd * wv[e] + bv[e]));
        } else {
            Vec<S>::load(shift + (size_t)b * C + c, p);
        }
        if (xx_out) Vec<S>::store(xx_out + (size_t)r * C + c, xx);
        if (shift_out && t == T - 1) Vec<S>::store(shift_out + (size_t)b * C + c, xx);
        float mu[LN_MAX_MIX][N];  // every mix vector requested before the first store
#pragma unroll
        for (int m = 0; m < LN_MAX_MIX; ++m)
            if (m < n_mix) Vec<S>::load(mix + (size_t)m * C + c, mu[m]);
#pragma unroll
        for (int m = 0; m < LN_MAX_MIX; ++m) {
            if (m >= n_mix) break;
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float base = v4_order ? p[e] : xx[e], other = v4_order ? xx[e] : p[e];
                o[e] = base + (other - base) * mu[m][e];
            }
            Vec<S>::store(out + ((size_t)m * R + r) * C + c, o);
        }
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

// In-place activations between the cuBLAS products of batched decoding (B > 4), where PyTorch
// takes a launch per op (two for relu^2): `act` on x[0, n) and `act2` on x2[0, n2) in one launch.
// act: 1 relu^2 (FFN key), 2 tanh, 3 sigmoid (LoRA hidden lanes, RWKV-4 receptance). n and n2 are
// multiples of 16 bytes' worth of elements. Twin: rwkv_cli.cuda.twins.act_inplace.
__device__ __forceinline__ float act_value(float v, int act) {  // (gemv.cu's codes differ)
    if (act == 1) { v = fmaxf(v, 0.f); return v * v; }
    if (act == 2) return tanhf(v);
    return sigmoidf_(v);
}

template <class S>
__device__ void act_inplace_impl(typename S::T* x, int n, int act, typename S::T* x2, int n2, int act2) {
    constexpr int N = Vec<S>::N;
    const int vecs = n / N, total = vecs + n2 / N;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        typename S::T* p = i < vecs ? x + (size_t)i * N : x2 + (size_t)(i - vecs) * N;
        const int a = i < vecs ? act : act2;
        float f[N];
        Vec<S>::load(p, f);
#pragma unroll
        for (int e = 0; e < N; ++e) f[e] = S::load(S::store(act_value(f[e], a)));
        Vec<S>::store(p, f);
    }
}

#define ACT_INPLACE(S, SUF)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) act_inplace_##SUF(S::T* x, int n, int act, S::T* x2, \
                                                                      int n2, int act2) {                 \
        act_inplace_impl<S>(x, n, act, x2, n2, act2);                                                     \
    }
ACT_INPLACE(F16, f16)
ACT_INPLACE(BF16, bf16)
ACT_INPLACE(F32, f32)
