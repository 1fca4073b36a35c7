// RWKV-4 WKV (rwkv-models.md §7.1, §10): a per-channel decayed average of values weighted by e^k,
// with a bonus u for the current token, kept as (num, den, max) = a running log-sum-exp, fp32:
//   q  = max(pp, u + k);   wkv = (e^(pp-q) aa + e^(u+k-q) v) / (e^(pp-q) bb + e^(u+k-q))
//   q' = max(pp + w, k);   aa <- e^(pp+w-q') aa + e^(k-q') v;  bb <- e^(pp+w-q') bb + e^(k-q');  pp <- q'
// Every channel is independent: one thread per (sequence, channel).
//   wkv4_seq    T tokens, serial in time, the next tokens' k and v prefetched     (prefill)
//   wkv4_step   one token, times the receptance: out = r * wkv                    (decoding)
// Twins: rwkv_cli.wkv.wkv4_sequence, rwkv_cli.cuda.twins.wkv4_step.
#include "common.cuh"

struct WKV4 {
    float aa, bb, pp;
    __device__ __forceinline__ float read(float u, float k, float v) const {
        const float uk = u + k, q = fmaxf(pp, uk);
        const float e1 = __expf(pp - q), e2 = __expf(uk - q);
        return (e1 * aa + e2 * v) / (e1 * bb + e2);
    }
    __device__ __forceinline__ void absorb(float w, float k, float v) {
        const float ww = pp + w, q = fmaxf(ww, k);
        const float e1 = __expf(ww - q), e2 = __expf(k - q);
        aa = e1 * aa + e2 * v;
        bb = e1 * bb + e2;
        pp = q;
    }
};

#define PF 24  // tokens prefetched ahead (8 left the DRAM latency exposed)

// grid: ceil(B * A / 128) blocks of 128 threads.
extern "C" __global__ void __launch_bounds__(128) wkv4_seq(
    const float* __restrict__ w, const float* __restrict__ u,        // [A]
    const float* __restrict__ k, const float* __restrict__ v,        // [B, T, A]
    const float* __restrict__ num, const float* __restrict__ den, const float* __restrict__ mx,  // [B, A]
    float* __restrict__ y,                                           // [B, T, A]
    float* __restrict__ num_o, float* __restrict__ den_o, float* __restrict__ mx_o, int B, int T, int A) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * A) return;
    const int b = idx / A, c = idx - b * A;
    const float wc = w[c], uc = u[c];
    WKV4 s = {num[idx], den[idx], mx[idx]};
    const size_t base = (size_t)b * T * A + c;
    float kb[PF], vb[PF];
#pragma unroll
    for (int j = 0; j < PF; ++j) {
        kb[j] = j < T ? k[base + (size_t)j * A] : 0.f;
        vb[j] = j < T ? v[base + (size_t)j * A] : 0.f;
    }
    for (int t0 = 0; t0 < T; t0 += PF) {
        float kn[PF], vn[PF];
#pragma unroll
        for (int j = 0; j < PF; ++j) {  // the next PF tokens, in flight while these are computed
            const int t = t0 + PF + j;
            kn[j] = t < T ? k[base + (size_t)t * A] : 0.f;
            vn[j] = t < T ? v[base + (size_t)t * A] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < PF; ++j) {
            if (t0 + j < T) {
                y[base + (size_t)(t0 + j) * A] = s.read(uc, kb[j], vb[j]);
                s.absorb(wc, kb[j], vb[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < PF; ++j) { kb[j] = kn[j]; vb[j] = vn[j]; }
    }
    num_o[idx] = s.aa; den_o[idx] = s.bb; mx_o[idx] = s.pp;
}

// grid: ceil(B * A / 256) blocks of 256 threads. k, v fp32 [B, A]; r (after its sigmoid) and
// out in the activation type. The state may be updated in place (num_o == num etc.).
template <class S>
__device__ void wkv4_step_impl(const float* w, const float* u, const float* k, const float* v,
                               const typename S::T* r, const float* num, const float* den, const float* mx,
                               typename S::T* out, float* num_o, float* den_o, float* mx_o, int B, int A) {
    // A programmatic dependent launch, as wkv7_step: the state (from an earlier step) is read
    // before the wait, k, v and r (the previous kernel's) after it.
    launch_dependents();
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    WKV4 s = {0.f, 0.f, 0.f};
    if (idx < B * A) s = {num[idx], den[idx], mx[idx]};
    grid_dependency_wait();
    if (idx >= B * A) return;
    const int c = idx % A;
    const float kc = k[idx], vc = v[idx];
    const float wkv = s.read(u[c], kc, vc);
    s.absorb(w[c], kc, vc);
    out[idx] = S::store(S::load(r[idx]) * wkv);
    num_o[idx] = s.aa; den_o[idx] = s.bb; mx_o[idx] = s.pp;
}

#define WKV4_STEP(S, SUF)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) wkv4_step_##SUF(                                        \
        const float* w, const float* u, const float* k, const float* v, const S::T* r, const float* num,     \
        const float* den, const float* mx, S::T* out, float* num_o, float* den_o, float* mx_o, int B, int A) { \
        wkv4_step_impl<S>(w, u, k, v, r, num, den, mx, out, num_o, den_o, mx_o, B, A);                         \
    }
WKV4_STEP(F16, f16)
WKV4_STEP(BF16, bf16)
WKV4_STEP(F32, f32)
