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
