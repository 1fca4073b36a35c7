// RWKV-7 time-mix kernels (rwkv-models.md §7.4; numbers below are its steps). Head size N = 64.
//
// Per head, with S [value i, key j] in fp32:
//   S_t = S_{t-1} diag(d_t) + (S_{t-1} alpha_t) beta_t^T + v_t k_t^T,   y_t = S_t r_t      (8, 9)
// with alpha = -kk (the normalised removal key) and beta = kk * a.
//
//   wkv7_prep   steps 3-7 for every token: decay, rate, keys, value residual      (prefill)
//   wkv7_seq    steps 8-9 token by token, state carried in and out: prompts' recurrence with
//               RWKV_WKV7_SEQ=serial (A/B runs); by default kernels/rwkv7_chunk.cu's       (prefill)
//   wkv7_post   steps 10-12: GroupNorm, bonus, gate                                (prefill)
//   wkv7_step   3-12 for one token of B sequences in one launch                    (decoding)
// Twins: rwkv_cli.cuda.twins.wkv7_prep / wkv7_post / wkv7_step, rwkv_cli.wkv.wkv7_sequence.
#include "common.cuh"

#define N 64
#define DECAY_SCALE 0.6065306597126334f  // e^-0.5

// ---- steps 3-7 for one channel; `kk` is not yet normalised -------------------------------------
struct Prep {
    float r, d, kk, kw, vw, beta;
};

// The channel's parameters (weights: the decoding step fetches them before its dependency wait).
struct ChanW {
    float w0, a0, v0, k_k, k_a;
};

template <class S>
__device__ __forceinline__ ChanW chan_weights(int c, const float* w0, const typename S::T* a0,
                                              const typename S::T* v0, const typename S::T* k_k,
                                              const typename S::T* k_a) {
    return {w0[c], S::load(a0[c]), v0 ? S::load(v0[c]) : 0.f, S::load(k_k[c]), S::load(k_a[c])};
}

template <class S>
__device__ __forceinline__ Prep prep_from(size_t at, const ChanW& cw, const typename S::T* r, const typename S::T* k,
                                          const typename S::T* v, const typename S::T* wz, const typename S::T* az,
                                          const typename S::T* vz, const typename S::T* vf) {
    Prep p;
    const float kc = S::load(k[at]), vc = S::load(v[at]);
    p.r = S::load(r[at]);
    p.d = __expf(-DECAY_SCALE * sigmoidf_(cw.w0 + S::load(wz[at])));   // 3. decay in (0.545, 1)
    const float a = sigmoidf_(cw.a0 + S::load(az[at]));                 // 4.
    p.kk = kc * cw.k_k;                                                  // 6. (normalised by caller)
    p.kw = kc * (1.f + (a - 1.f) * cw.k_a);
    p.vw = vz ? vc + (S::load(vf[at]) - vc) * sigmoidf_(cw.v0 + S::load(vz[at])) : vc;  // 7.
    p.beta = a;  // times kk once kk is normalised
    return p;
}

template <class S>
__device__ __forceinline__ Prep prep_channel(size_t at, int c, const typename S::T* r, const typename S::T* k,
                                             const typename S::T* v, const typename S::T* wz, const typename S::T* az,
                                             const typename S::T* vz, const typename S::T* vf, const float* w0,
                                             const typename S::T* a0, const typename S::T* v0,
                                             const typename S::T* k_k, const typename S::T* k_a) {
    return prep_from<S>(at, chan_weights<S>(c, w0, a0, vz ? v0 : nullptr, k_k, k_a), r, k, v, wz, az, vz, vf);
}

// grid: ceil(R * H / 8) blocks of 256 threads: one warp per (row, head), 2 channels per lane.
template <class S>
__device__ void wkv7_prep_impl(const typename S::T* r, const typename S::T* k, const typename S::T* v,
                               const typename S::T* wz, const typename S::T* az, const typename S::T* vz,
                               const typename S::T* vf, const float* w0, const typename S::T* a0,
                               const typename S::T* v0, const typename S::T* k_k, const typename S::T* k_a,
                               float* r_o, float* d_o, float* kk_o, float* kw_o, float* vw_o, float* beta_o,
                               int R, int H) {
    const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (gw >= R * H) return;  // whole warps exit together
    const int row = gw / H, h = gw - row * H, C = H * N;
    Prep p[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int c = h * N + lane + 32 * e;
        p[e] = prep_channel<S>((size_t)row * C + c, c, r, k, v, wz, az, vz, vf, w0, a0, v0, k_k, k_a);
    }
    const float inv = 1.f / fmaxf(sqrtf(warp_sum(p[0].kk * p[0].kk + p[1].kk * p[1].kk)), 1e-12f);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const size_t at = (size_t)row * C + h * N + lane + 32 * e;
        const float kk = p[e].kk * inv;
        r_o[at] = p[e].r; d_o[at] = p[e].d; kk_o[at] = kk; kw_o[at] = p[e].kw; vw_o[at] = p[e].vw;
        beta_o[at] = kk * p[e].beta;
    }
}

// ---- steps 8-9 over T tokens -------------------------------------------------------------------
// grid: (B * H * 4) blocks of 64 threads; block = (b, h, 16 rows of S). Thread (p, g): rows
// row0 + p and row0 + p + 8, columns 4g..4g+3 and 32+4g..32+4g+3. The six per-token vectors are
// staged through shared memory TC tokens at a time with cp.async, STAGES chunks in flight, so the
// loads of the next chunks overlap the serial work on this one (with two stages the DRAM latency
// showed: 0.36 us a token on an H100). Only S alpha is reduced across
// the 8 threads of a row inside the serial loop (3 shuffles); the readout's partial sums go to
// shared memory and are summed once per chunk, off the critical path.
// Dynamic shared memory: WKV7_SEQ_SMEM bytes.
#define TC 16
#define STAGES 3
#define NV 6  // r, d, kk, kw, beta, vw  (vw indexed by row, the rest by column)
#define WKV7_SEQ_SMEM (STAGES * TC * NV * N * 4 + TC * 16 * 8 * 4)

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_stages() { asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1)); }

__device__ __forceinline__ float dot8(const float4& a0, const float4& a1, const float4& b0, const float4& b1) {
    return (a0.x * b0.x + a0.y * b0.y) + (a0.z * b0.z + a0.w * b0.w) + (a1.x * b1.x + a1.y * b1.y) +
           (a1.z * b1.z + a1.w * b1.w);
}
__device__ __forceinline__ float sum8(float x) {  // over the 8 threads of a row group
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    return x;
}
// S row part (8 values as two float4) <- S diag(d) + sa * beta + v * kw
__device__ __forceinline__ void update8(float4& s, const float4& d, float sa, const float4& be, float v, const float4& kw) {
    s.x = s.x * d.x + sa * be.x + v * kw.x;
    s.y = s.y * d.y + sa * be.y + v * kw.y;
    s.z = s.z * d.z + sa * be.z + v * kw.z;
    s.w = s.w * d.w + sa * be.w + v * kw.w;
}

extern "C" __global__ void __launch_bounds__(64) wkv7_seq(
    const float* __restrict__ r, const float* __restrict__ d, const float* __restrict__ kk,
    const float* __restrict__ kw, const float* __restrict__ beta, const float* __restrict__ vw,  // [B*T, H*N]
    const float* __restrict__ S_in, float* __restrict__ S_out,  // [B, H, N, N]
    float* __restrict__ y,                                      // [B*T, H*N]
    int T, int H) {
    extern __shared__ float4 smem4[];
    float(*buf)[TC][NV][N] = (float(*)[TC][NV][N])smem4;        // [STAGES][TC][NV][N]
    float(*ypart)[16][8] = (float(*)[16][8])(smem4 + STAGES * TC * NV * N / 4);  // [TC][16 rows][8 threads]
    const int part = blockIdx.x & 3, bh = blockIdx.x >> 2, h = bh % H, b = bh / H;
    const int g = threadIdx.x & 7, p = threadIdx.x >> 3;
    const int i0 = part * 16 + p, i1 = i0 + 8;
    const int C = H * N;

    const float* Sb = S_in + ((size_t)bh * N) * N;
    float4 s0a = *(const float4*)(Sb + i0 * N + 4 * g), s0b = *(const float4*)(Sb + i0 * N + 32 + 4 * g);
    float4 s1a = *(const float4*)(Sb + i1 * N + 4 * g), s1b = *(const float4*)(Sb + i1 * N + 32 + 4 * g);

    // chunk loader: TC tokens x NV vectors x 16 float4 = 1536 copies over 64 threads
    auto load_chunk = [&](int chunk, int slot) {
#pragma unroll 4
        for (int idx = threadIdx.x; idx < TC * NV * 16; idx += 64) {
            const int q = idx & 15, vec = (idx >> 4) % NV, tt = idx / (16 * NV);
            const int t = chunk * TC + tt;
            const float* src = vec == 0 ? r : vec == 1 ? d : vec == 2 ? kk : vec == 3 ? kw : vec == 4 ? beta : vw;
            if (t < T) copy16(&buf[slot][tt][vec][4 * q], src + ((size_t)(b * T + t)) * C + h * N + 4 * q);
        }
        cp_async_commit();
    };
    const int nchunks = (T + TC - 1) / TC;
    for (int c = 0; c < STAGES - 1; ++c) load_chunk(c, c);  // chunks past T load nothing (empty groups)
    for (int ch = 0; ch < nchunks; ++ch) {
        load_chunk(ch + STAGES - 1, (ch + STAGES - 1) % STAGES);  // the slot computed last iteration
        cp_async_wait_stages();  // chunk ch has landed
        __syncthreads();
        const int slot = ch % STAGES, tend = min(TC, T - ch * TC);
        for (int tt = 0; tt < tend; ++tt) {
            const float(*vb)[N] = buf[slot][tt];
            // every load of this token first: only S alpha waits on the previous token's update
            const float4 ka = *(const float4*)&vb[2][4 * g], kb = *(const float4*)&vb[2][32 + 4 * g];
            const float4 da = *(const float4*)&vb[1][4 * g], db = *(const float4*)&vb[1][32 + 4 * g];
            const float4 ba = *(const float4*)&vb[4][4 * g], bb = *(const float4*)&vb[4][32 + 4 * g];
            const float4 wa = *(const float4*)&vb[3][4 * g], wb = *(const float4*)&vb[3][32 + 4 * g];
            const float4 ra = *(const float4*)&vb[0][4 * g], rb = *(const float4*)&vb[0][32 + 4 * g];
            const float v0 = vb[5][i0], v1 = vb[5][i1];
            // S alpha with alpha = -kk, for both rows (uses the old S)
            const float sa0 = -sum8(dot8(s0a, s0b, ka, kb)), sa1 = -sum8(dot8(s1a, s1b, ka, kb));
            update8(s0a, da, sa0, ba, v0, wa); update8(s0b, db, sa0, bb, v0, wb);
            update8(s1a, da, sa1, ba, v1, wa); update8(s1b, db, sa1, bb, v1, wb);
            ypart[tt][p][g] = dot8(s0a, s0b, ra, rb);
            ypart[tt][p + 8][g] = dot8(s1a, s1b, ra, rb);
        }
        __syncthreads();  // partial readouts complete; this slot is refilled by the next prefetch
        for (int o = threadIdx.x; o < tend * 16; o += 64) {  // y = sum of the 8 partials
            const int tt = o >> 4, row = o & 15;
            const float4 a = *(const float4*)&ypart[tt][row][0], c = *(const float4*)&ypart[tt][row][4];
            y[((size_t)(b * T + ch * TC + tt)) * C + h * N + part * 16 + row] = (a.x + a.y) + (a.z + a.w) + (c.x + c.y) + (c.z + c.w);
        }
    }
    float* So = S_out + ((size_t)bh * N) * N;
    *(float4*)(So + i0 * N + 4 * g) = s0a; *(float4*)(So + i0 * N + 32 + 4 * g) = s0b;
    *(float4*)(So + i1 * N + 4 * g) = s1a; *(float4*)(So + i1 * N + 32 + 4 * g) = s1b;
}

// ---- steps 10-12 -------------------------------------------------------------------------------
// out = (GroupNorm_h(y) * ln_w + ln_b + (sum_j r_j kw_j r_k[h, j]) * vw) * g     (eps 64e-5)
template <class S>
__device__ __forceinline__ void post_head(int lane, const float* y2, const float* r2, const float* kw2,
                                          const float* vw2, const float* g2, const float* rk2, const float* lw2,
                                          const float* lb2, float* out2) {
    const float mean = warp_sum(y2[0] + y2[1]) * (1.f / N);
    const float d0 = y2[0] - mean, d1 = y2[1] - mean;
    const float rstd = rsqrtf(warp_sum(d0 * d0 + d1 * d1) * (1.f / N) + 64e-5f);
    const float bonus = warp_sum(r2[0] * kw2[0] * rk2[0] + r2[1] * kw2[1] * rk2[1]);
    out2[0] = (d0 * rstd * lw2[0] + lb2[0] + bonus * vw2[0]) * g2[0];
    out2[1] = (d1 * rstd * lw2[1] + lb2[1] + bonus * vw2[1]) * g2[1];
}

// grid: ceil(R * H / 8) blocks of 256 threads: one warp per (row, head).
template <class S>
__device__ void wkv7_post_impl(const float* y, const float* r, const float* kw, const float* vw,
                               const typename S::T* g, const typename S::T* r_k, const float* ln_w,
                               const float* ln_b, typename S::T* out, int R, int H) {
    const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (gw >= R * H) return;
    const int row = gw / H, h = gw - row * H, C = H * N;
    float y2[2], r2[2], kw2[2], vw2[2], g2[2], rk2[2], lw2[2], lb2[2], o2[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int c = h * N + lane + 32 * e;
        const size_t at = (size_t)row * C + c;
        y2[e] = y[at]; r2[e] = r[at]; kw2[e] = kw[at]; vw2[e] = vw[at]; g2[e] = S::load(g[at]);
        rk2[e] = S::load(r_k[c]); lw2[e] = ln_w[c]; lb2[e] = ln_b[c];
    }
    post_head<S>(lane, y2, r2, kw2, vw2, g2, rk2, lw2, lb2, o2);
#pragma unroll
    for (int e = 0; e < 2; ++e) out[(size_t)row * C + h * N + lane + 32 * e] = S::store(o2[e]);
}

// ---- one decoding step, steps 3-12 fused -------------------------------------------------------
// grid: B * H blocks of 256 threads; block = (b, h). Thread (p, g): rows p and p + 32, columns
// 4g..4g+3 and 32+4g..32+4g+3. S_in and S_out may be the same buffer (each thread writes exactly
// the state values it read).
// This kernel sits on the decoding chain's critical path between two products (removing it took
// ~4.8 us a layer off the v7 1.5B step), so everything that does not depend on the previous
// kernel is fetched before the wait, everything that does is requested in one round trip after
// it, and the two reductions over the head share one barrier.
__device__ __forceinline__ float4 scale4(const float* v, float s) {
    const float4 a = *(const float4*)v;
    return make_float4(a.x * s, a.y * s, a.z * s, a.w * s);
}
__device__ __forceinline__ float4 scale4(const float* v, float s, const float* m) {  // (v * s) * m
    const float4 a = *(const float4*)v, b = *(const float4*)m;
    return make_float4(a.x * s * b.x, a.y * s * b.y, a.z * s * b.z, a.w * s * b.w);
}

template <class S>
__device__ void wkv7_step_impl(const typename S::T* r, const typename S::T* k, const typename S::T* v,
                               const typename S::T* wz, const typename S::T* az, const typename S::T* vz,
                               const typename S::T* gate, typename S::T* vf, int first_layer,
                               const float* w0, const typename S::T* a0, const typename S::T* v0,
                               const typename S::T* k_k, const typename S::T* k_a, const typename S::T* r_k,
                               const float* ln_w, const float* ln_b, const float* S_in, float* S_out,
                               typename S::T* out, int H) {
    __shared__ __align__(16) float vec[NV][N];  // r, d, kk (not normalised), kw, a, vw
    __shared__ float yv[N], gv[N];
    __shared__ float scratch[4];
    const int bh = blockIdx.x, h = bh % H, b = bh / H, C = H * N, tid = threadIdx.x, warp = tid >> 5;
    const int c = h * N + (tid & (N - 1));
    const size_t at = (size_t)b * C + c;

    // Launched as a programmatic dependent (rwkv_cli/cuda/loader.py): the next product may start
    // fetching its weights now, and this block fetches its state rows and parameters while the
    // previous kernel finishes. S_in was written by an earlier decoding step, complete before this
    // step's first (ordinary) launch; everything the previous kernel writes is read after the wait.
    launch_dependents();
    const int g = tid & 7, p = tid >> 3, i0 = p, i1 = p + 32;
    const float* Sb = S_in + (size_t)bh * N * N;
    float4 s0a = *(const float4*)(Sb + i0 * N + 4 * g), s0b = *(const float4*)(Sb + i0 * N + 32 + 4 * g);
    float4 s1a = *(const float4*)(Sb + i1 * N + 4 * g), s1b = *(const float4*)(Sb + i1 * N + 32 + 4 * g);
    ChanW cw = {0.f, 0.f, 0.f, 0.f, 0.f};
    float rk = 0.f, lw2[2] = {0.f, 0.f}, lb2[2] = {0.f, 0.f};
    if (tid < N) {
        cw = chan_weights<S>(c, w0, a0, first_layer ? nullptr : v0, k_k, k_a);
        rk = S::load(r_k[c]);
    }
    if (tid < 32) {
#pragma unroll
        for (int e = 0; e < 2; ++e) { lw2[e] = ln_w[h * N + tid + 32 * e]; lb2[e] = ln_b[h * N + tid + 32 * e]; }
    }
    grid_dependency_wait();

    // steps 3-7: threads 0..63 each prepare one channel
    Prep pc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (tid < N) {
        gv[tid] = S::load(gate[at]);
        if (first_layer) vf[at] = v[at];  // layer 0's values are every later layer's v_first
        pc = prep_from<S>(at, cw, r, k, v, wz, az, first_layer ? nullptr : vz, vf);
        vec[0][tid] = pc.r; vec[1][tid] = pc.d; vec[2][tid] = pc.kk; vec[3][tid] = pc.kw;
        vec[4][tid] = pc.beta; vec[5][tid] = pc.vw;
    }
    // |kk|^2 and the bonus sum_j r_j kw_j r_k[j] over the head (warps 0 and 1), one barrier
    const float sq = warp_sum(pc.kk * pc.kk), bo = warp_sum(pc.r * pc.kw * rk);
    if ((tid & 31) == 0 && warp < 2) { scratch[warp] = sq; scratch[2 + warp] = bo; }
    __syncthreads();
    const float inv = 1.f / fmaxf(sqrtf(scratch[0] + scratch[1]), 1e-12f);
    const float bonus = scratch[2] + scratch[3];

    // steps 8-9: kk normalised and beta = kk * a formed on the fly
    const float4 ka = scale4(&vec[2][4 * g], inv), kb = scale4(&vec[2][32 + 4 * g], inv);
    const float sa0 = -sum8(dot8(s0a, s0b, ka, kb)), sa1 = -sum8(dot8(s1a, s1b, ka, kb));
    const float4 da = *(const float4*)&vec[1][4 * g], db = *(const float4*)&vec[1][32 + 4 * g];
    const float4 ba = scale4(&vec[2][4 * g], inv, &vec[4][4 * g]), bb = scale4(&vec[2][32 + 4 * g], inv, &vec[4][32 + 4 * g]);
    const float4 wa = *(const float4*)&vec[3][4 * g], wb = *(const float4*)&vec[3][32 + 4 * g];
    update8(s0a, da, sa0, ba, vec[5][i0], wa); update8(s0b, db, sa0, bb, vec[5][i0], wb);
    update8(s1a, da, sa1, ba, vec[5][i1], wa); update8(s1b, db, sa1, bb, vec[5][i1], wb);
    const float4 ra = *(const float4*)&vec[0][4 * g], rb = *(const float4*)&vec[0][32 + 4 * g];
    const float y0 = sum8(dot8(s0a, s0b, ra, rb)), y1 = sum8(dot8(s1a, s1b, ra, rb));
    float* So = S_out + (size_t)bh * N * N;
    *(float4*)(So + i0 * N + 4 * g) = s0a; *(float4*)(So + i0 * N + 32 + 4 * g) = s0b;
    *(float4*)(So + i1 * N + 4 * g) = s1a; *(float4*)(So + i1 * N + 32 + 4 * g) = s1b;
    if (g == 0) { yv[i0] = y0; yv[i1] = y1; }
    __syncthreads();

    // steps 10-12 by warp 0
    if (tid < 32) {
        float y2[2], zero2[2] = {0.f, 0.f}, vw2[2], g2[2], o2[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) { y2[e] = yv[tid + 32 * e]; vw2[e] = vec[5][tid + 32 * e]; g2[e] = gv[tid + 32 * e]; }
        post_head<S>(tid, y2, zero2, zero2, vw2, g2, zero2, lw2, lb2, o2);  // bonus 0 here: reduced above
#pragma unroll
        for (int e = 0; e < 2; ++e) out[(size_t)b * C + h * N + tid + 32 * e] = S::store(o2[e] + bonus * vw2[e] * g2[e]);
    }
}

#define WKV7(S, SUF)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) wkv7_prep_##SUF(                                         \
        const S::T* r, const S::T* k, const S::T* v, const S::T* wz, const S::T* az, const S::T* vz,          \
        const S::T* vf, const float* w0, const S::T* a0, const S::T* v0, const S::T* k_k, const S::T* k_a,     \
        float* r_o, float* d_o, float* kk_o, float* kw_o, float* vw_o, float* beta_o, int R, int H) {          \
        wkv7_prep_impl<S>(r, k, v, wz, az, vz, vf, w0, a0, v0, k_k, k_a, r_o, d_o, kk_o, kw_o, vw_o, beta_o,  \
                          R, H);                                                                               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) wkv7_post_##SUF(                                         \
        const float* y, const float* r, const float* kw, const float* vw, const S::T* g, const S::T* r_k,     \
        const float* ln_w, const float* ln_b, S::T* out, int R, int H) {                                       \
        wkv7_post_impl<S>(y, r, kw, vw, g, r_k, ln_w, ln_b, out, R, H);                                        \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) wkv7_step_##SUF(                                         \
        const S::T* r, const S::T* k, const S::T* v, const S::T* wz, const S::T* az, const S::T* vz,          \
        const S::T* gate, S::T* vf, int first_layer, const float* w0, const S::T* a0, const S::T* v0,         \
        const S::T* k_k, const S::T* k_a, const S::T* r_k, const float* ln_w, const float* ln_b,               \
        const float* S_in, float* S_out, S::T* out, int H) {                                                   \
        wkv7_step_impl<S>(r, k, v, wz, az, vz, gate, vf, first_layer, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,  \
                          S_in, S_out, out, H);                                                                \
    }
WKV7(F16, f16)
WKV7(BF16, bf16)
WKV7(F32, f32)
