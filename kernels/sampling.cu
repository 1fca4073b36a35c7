// The read-back of a decoding step: what the host learns about each row of the logits.
//
//   checked_ids   per row b of fp32 logits [B, V]: the token (sampled[b], or the row's argmax when
//                 no sampled ids are given, first index among equal maxima, as torch.argmax) into
//                 tokens_out[b] (if given), and into ids_out[b] the same token, or -1 when any
//                 logit of the row is NaN or infinite.
//
// One launch replaces torch's argmax + isfinite(sum) + cast + concatenation (about 30 us of
// device time a step at V = 65536, mostly two single-row reductions). tokens_out always holds a
// valid index, so the next step can be fed from it before the host has looked at ids_out.
// Twin: rwkv_cli.cuda.twins.checked_ids.
#include "common.cuh"

#define IDS_THREADS 1024  // the launch bound below

__device__ __forceinline__ bool finite_f32(float x) {  // a bit test: immune to fast-math folding
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// (value, index) a is better than b: larger, or equal and earlier
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// grid: B blocks of IDS_THREADS threads; block = one row.
extern "C" __global__ void __launch_bounds__(1024) checked_ids(
    const float* __restrict__ logits, const long long* __restrict__ sampled, long long* __restrict__ tokens_out,
    long long* __restrict__ ids_out, int V) {
    __shared__ float best_v[32];
    __shared__ int best_i[32], all_finite[32];
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* row = logits + (size_t)b * V;
    float bv = -__int_as_float(0x7f800000);  // -inf
    int bi = 0;  // a valid index whatever the row holds
    bool ok = true;
#pragma unroll 8
    for (int i = tid; i < V; i += IDS_THREADS) {
        const float x = row[i];
        ok &= finite_f32(x);
        if (x > bv) { bv = x; bi = i; }  // i grows: the first of equal values stays
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    ok = __all_sync(0xffffffffu, ok);
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; all_finite[warp] = ok; }
    __syncthreads();
    if (warp == 0) {
        bv = best_v[lane]; bi = best_i[lane]; ok = all_finite[lane];  // IDS_THREADS / 32 == 32 warps
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        }
        ok = __all_sync(0xffffffffu, ok);
        if (lane == 0) {
            const long long token = sampled ? sampled[b] : (long long)bi;
            if (tokens_out) tokens_out[b] = token;
            ids_out[b] = ok ? token : -1;
        }
    }
}

// ---- sampling (rwkv_cli/sampling.py, `Sampler`; twins: its PyTorch code) ----------------------
// A step draws a token for each row b in two kernels around one sort (torch.sort, descending):
//   penalized_softmax  probs = softmax(logits - (seen ? presence + counts * frequency : 0), bans
//                      at -inf), and each row's argmax of those logits (its greedy token)
//   nucleus_draw       on the sorted probabilities: the top-p / top-k / min-p cut-off (ties at
//                      it survive), p^(1/T) on what is kept, inverse transform sampling with the
//                      host's uniform u; greedy rows (inv_temp 0) take their argmax; then the
//                      penalty counts decay and count the token
// In place of about 50 small launches (cumsums, searchsorted, gathers, wheres). Both kernels:
// grid B blocks of SAMPLE_THREADS threads; block = one row.
#define SAMPLE_THREADS 1024

// Exclusive prefix sum of one value per thread over the block (SAMPLE_THREADS threads); `total`
// gets the sum of all. `scratch` holds 32 floats. Contains __syncthreads.
__device__ __forceinline__ float block_exclusive_scan(float v, float* scratch, float& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        float t = scratch[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        scratch[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    total = scratch[31];
    return (warp ? scratch[warp - 1] : 0.f) + x - v;
}

extern "C" __global__ void __launch_bounds__(1024) penalized_softmax(
    const float* __restrict__ logits, const float* __restrict__ counts, const unsigned char* __restrict__ seen,
    const unsigned char* __restrict__ ban, const float* __restrict__ presence, const float* __restrict__ frequency,
    float* __restrict__ probs, long long* __restrict__ argmax, int V) {
    __shared__ float best_v[32], scratch[32];
    __shared__ int best_i[32];
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const size_t row = (size_t)b * V;
    const float pres = counts ? presence[b] : 0.f, freq = counts ? frequency[b] : 0.f;
    float bv = -__int_as_float(0x7f800000);
    int bi = 0;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        float x = logits[row + i];
        if (counts && seen[row + i]) x -= pres + counts[row + i] * freq;
        if (ban && ban[row + i]) x = -__int_as_float(0x7f800000);
        probs[row + i] = x;  // the penalised logit, until the exponentials below
        if (x > bv || (x != x && bv == bv)) { bv = x; bi = i; }  // NaN wins, as in torch.argmax
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        const bool o_nan = ov != ov, nan = bv != bv;
        if ((o_nan && !nan) || (o_nan == nan && (ov > bv || (ov == bv && oi < bi)))) { bv = ov; bi = oi; }
    }
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    bv = best_v[lane]; bi = best_i[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        const bool o_nan = ov != ov, nan = bv != bv;
        if ((o_nan && !nan) || (o_nan == nan && (ov > bv || (ov == bv && oi < bi)))) { bv = ov; bi = oi; }
    }
    if (tid == 0) argmax[b] = bi;
    float sum = 0.f;
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        const float e = expf(probs[row + i] - bv);
        probs[row + i] = e;
        sum += e;
    }
    const float inv = 1.f / block_sum(sum, scratch);
    for (int i = tid; i < V; i += SAMPLE_THREADS) probs[row + i] *= inv;
}

extern "C" __global__ void __launch_bounds__(1024) nucleus_draw(
    const float* __restrict__ sorted_p, const long long* __restrict__ sorted_i, const float* __restrict__ top_p,
    const long long* __restrict__ top_k, const float* __restrict__ min_p, const float* __restrict__ inv_temp,
    const float* __restrict__ u, const long long* __restrict__ argmax, float* __restrict__ counts,
    unsigned char* __restrict__ seen, const float* __restrict__ weight, const float* __restrict__ decay,
    long long* __restrict__ tokens, int V) {
    __shared__ float scratch[32];
    __shared__ int first_at, kept_end, draw_at, positive_end;
    const int b = blockIdx.x, tid = threadIdx.x;
    const float* p = sorted_p + (size_t)b * V;
    const int E = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS, lo = min(tid * E, V), hi = min(lo + E, V);
    if (tid == 0) first_at = kept_end = draw_at = positive_end = V;
    // top-p: the first position whose cumulative probability reaches top_p
    float seg = 0.f, total;
    for (int i = lo; i < hi; ++i) seg += p[i];
    const float before = block_exclusive_scan(seg, scratch, total);  // syncs: the V's above are set
    const float tp = fminf(top_p[b], 1.f - 1e-6f);
    if (before + seg >= tp) {  // cum is monotone: the crossing lies in or before this segment
        float c = before;
        for (int i = lo; i < hi; ++i) {
            c += p[i];
            if (c >= tp) { atomicMin(&first_at, i); break; }
        }
    }
    __syncthreads();
    float cutoff = first_at < V ? p[first_at] : 0.f;
    const long long k = top_k[b];
    if (k > 0 && k <= V) cutoff = fmaxf(cutoff, p[k - 1]);
    cutoff = fmaxf(cutoff, min_p[b] * p[0]);
    // kept: the prefix of probabilities >= cutoff; w = p^(1/T) there
    if (hi > lo && p[hi - 1] < cutoff) {
        for (int i = lo; i < hi; ++i)
            if (p[i] < cutoff) { atomicMin(&kept_end, i); break; }
    }
    const float it = inv_temp[b];
    __syncthreads();
    const int kend = kept_end;
    auto weight_at = [&](int i) { return i < kend ? (it == 1.f ? p[i] : powf(p[i], it)) : 0.f; };
    seg = 0.f;
    for (int i = lo; i < hi; ++i) seg += weight_at(i);
    const float wbefore = block_exclusive_scan(seg, scratch, total);
    const float target = u[b] * total;
    if (wbefore + seg > target) {
        float c = wbefore;
        for (int i = lo; i < hi; ++i) {
            c += weight_at(i);
            if (c > target) { atomicMin(&draw_at, i); break; }
        }
    }
    if (hi > lo && !(weight_at(hi - 1) > 0.f)) {
        for (int i = lo; i < hi; ++i)
            if (!(weight_at(i) > 0.f)) { atomicMin(&positive_end, i); break; }
    }
    __syncthreads();
    const long long token = it == 0.f ? argmax[b] : sorted_i[(size_t)b * V + max(0, min(draw_at, positive_end - 1))];
    if (counts) {  // decay every count, then count the token
        float* cb = counts + (size_t)b * V;
        const float d = decay[b];
        for (int i = tid; i < V; i += SAMPLE_THREADS) cb[i] *= d;
        __syncthreads();
        if (tid == 0) {
            cb[token] += weight[token];
            seen[(size_t)b * V + token] = 1;
        }
    }
    if (tid == 0) tokens[b] = token;
}
