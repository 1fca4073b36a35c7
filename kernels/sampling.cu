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
// Twin: rwkv_cli.sampling.checked_ids_torch.
#include "common.cuh"

#define IDS_THREADS 1024  // the launch bound below

__device__ __forceinline__ bool finite_f32(float x) {  // a bit test: immune to fast-math folding
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// (value, index) a is better than b: NaN first (as torch.argmax), then larger, then earlier
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
    const bool na = va != va, nb = vb != vb;
    return (na && !nb) || (na == nb && (va > vb || (va == vb && ia < ib)));
}
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}
// The best (value, index) over a block of 1024 threads, into every thread; best_v, best_i hold 32
// entries each. Contains __syncthreads.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* best_v, int* best_i) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(v, i);
    __syncthreads();  // best_v, best_i may still be read
    if (lane == 0) { best_v[warp] = v; best_i[warp] = i; }
    __syncthreads();
    v = best_v[lane]; i = best_i[lane];
    warp_argmax(v, i);
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
    ok = __all_sync(0xffffffffu, ok);
    if (lane == 0) all_finite[warp] = ok;
    block_argmax(bv, bi, best_v, best_i);  // syncs: all_finite is complete
    if (tid == 0) {
        ok = true;
        for (int w = 0; w < 32; ++w) ok &= all_finite[w] != 0;  // IDS_THREADS / 32 == 32 warps
        const long long token = sampled ? sampled[b] : (long long)bi;
        if (tokens_out) tokens_out[b] = token;
        ids_out[b] = ok ? token : -1;
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
#pragma unroll 8
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        float x = logits[row + i];
        if (counts && seen[row + i]) x -= pres + counts[row + i] * freq;
        if (ban && ban[row + i]) x = -__int_as_float(0x7f800000);
        probs[row + i] = x;  // the penalised logit, until the exponentials below
        if (x > bv || (x != x && bv == bv)) { bv = x; bi = i; }  // NaN wins, as in torch.argmax
    }
    block_argmax(bv, bi, best_v, best_i);
    if (tid == 0) argmax[b] = bi;
    float sum = 0.f;
#pragma unroll 8
    for (int i = tid; i < V; i += SAMPLE_THREADS) {
        const float e = expf(probs[row + i] - bv);
        probs[row + i] = e;
        sum += e;
    }
    const float inv = 1.f / block_sum(sum, scratch);
#pragma unroll 8
    for (int i = tid; i < V; i += SAMPLE_THREADS) probs[row + i] *= inv;
}

extern "C" __global__ void __launch_bounds__(1024) nucleus_draw(
    const float* __restrict__ sorted_p, const long long* __restrict__ sorted_i, const float* __restrict__ top_p,
    const long long* __restrict__ top_k, const float* __restrict__ min_p, const float* __restrict__ inv_temp,
    const float* __restrict__ u, const long long* __restrict__ argmax, float* __restrict__ counts,
    unsigned char* __restrict__ seen, const float* __restrict__ weight, const float* __restrict__ decay,
    long long* __restrict__ tokens, int V) {
    __shared__ float wsum[32];
    __shared__ int first_at, kept_end, draw_at, positive_end;
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned all = 0xffffffffu;
    const float* p = sorted_p + (size_t)b * V;
    // Warp w owns the sorted positions [lo, hi) and walks them 32 at a time, lanes side by side.
    const int CH = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS * 32, lo = min(warp * CH, V), hi = min(lo + CH, V);
    if (tid == 0) first_at = kept_end = draw_at = positive_end = V;

    float cutoff = 0.f;  // set below, before any use
    int kend = V;
    const float it = inv_temp[b];
    // what is summed: the probability, or (weighted) p^(1/T) on the kept prefix
    auto val = [&](int i, bool weighted) { return !weighted ? p[i] : it == 1.f ? p[i] : powf(p[i], it); };
    // the sum over this warp's positions below `end`
    auto chunk_sum = [&](bool weighted, int end) {
        float s = 0.f;
        const int e = min(hi, end);
#pragma unroll 8
        for (int i = lo + lane; i < e; i += 32) s += val(i, weighted);
        return warp_sum(s);
    };
    // the sum over the earlier warps (added in warp order, so warp w + 1's is warp w's plus its
    // own exactly), and over all of them into `total`. Contains __syncthreads.
    auto earlier = [&](float mine, float& total) {
        __syncthreads();  // wsum may still be read
        if (lane == 0) wsum[warp] = mine;
        __syncthreads();
        float before = 0.f, sum = 0.f;
        for (int w = 0; w < 32; ++w) {
            if (w == warp) before = sum;
            sum += wsum[w];
        }
        total = sum;
        return before;
    };
    // the first position below `end` where start + the running sum reaches goal (passes it when
    // strict), into *out; the earliest warp wins. Call warp-uniformly.
    auto find = [&](bool weighted, int end, float start, float goal, bool strict, int* out) {
        const int e = min(hi, end);
        float run = start;
        for (int base = lo; base < e; base += 32) {
            const int i = base + lane;
            float c = i < e ? val(i, weighted) : 0.f;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float y = __shfl_up_sync(all, c, o);
                if (lane >= o) c += y;
            }
            c += run;
            const unsigned hit = __ballot_sync(all, i < e && (strict ? c > goal : c >= goal));
            if (hit) {
                if (lane == 0) atomicMin(out, base + __ffs(hit) - 1);
                return;
            }
            run = __shfl_sync(all, c, 31);
        }
    };
    // past the kept prefix (weighted: or a zero weight); monotone in i, the order being descending
    auto beyond = [&](int i, bool weighted) { return weighted ? i >= kend || !(val(i, true) > 0.f) : p[i] < cutoff; };
    // the first position where `beyond` holds, into *out
    auto first_beyond = [&](bool weighted, int* out) {
        if (hi <= lo || !beyond(hi - 1, weighted)) return;  // warp-uniform
        for (int base = lo; base < hi; base += 32) {
            const unsigned hit = __ballot_sync(all, base + lane < hi && beyond(base + lane, weighted));
            if (hit) {
                if (lane == 0) atomicMin(out, base + __ffs(hit) - 1);
                return;
            }
        }
    };

    // top-p: the first position whose cumulative probability reaches top_p; its probability is
    // the cut-off (ties with it survive)
    float total;
    const float tp = fminf(top_p[b], 1.f - 1e-6f);
    const float mine = chunk_sum(false, V);
    const float before = earlier(mine, total);  // syncs: the V's above are set
    if (before + mine >= tp) find(false, V, before, tp, false, &first_at);
    __syncthreads();
    cutoff = first_at < V ? p[first_at] : 0.f;
    const long long k = top_k[b];
    if (k > 0 && k <= V) cutoff = fmaxf(cutoff, p[k - 1]);
    cutoff = fmaxf(cutoff, min_p[b] * p[0]);
    // kept: the prefix of probabilities >= cutoff; the draw over p^(1/T) there
    first_beyond(false, &kept_end);
    __syncthreads();
    kend = kept_end;
    const float wmine = chunk_sum(true, kend);
    const float wbefore = earlier(wmine, total);
    const float target = u[b] * total;
    if (lo < kend && wbefore + wmine > target) find(true, kend, wbefore, target, true, &draw_at);
    first_beyond(true, &positive_end);
    __syncthreads();
    const long long token = it == 0.f ? argmax[b] : sorted_i[(size_t)b * V + max(0, min(draw_at, positive_end - 1))];
    if (counts) {  // decay every count, then count the token
        float* cb = counts + (size_t)b * V;
        const float d = decay[b];
#pragma unroll 8
        for (int i = tid; i < V; i += SAMPLE_THREADS) cb[i] *= d;
        __syncthreads();
        if (tid == 0) {
            cb[token] += weight[token];
            seen[(size_t)b * V + token] = 1;
        }
    }
    if (tid == 0) tokens[b] = token;
}
