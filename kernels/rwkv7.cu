// RWKV-7 time-mix kernels (rwkv-models.md §7.4; numbers below are its steps). Head size N = 64.
//
// Per head, with S [value i, key j] in fp32:
//   S_t = S_{t-1} diag(d_t) + (S_{t-1} alpha_t) beta_t^T + v_t k_t^T,   y_t = S_t r_t      (8, 9)
// with alpha = -kk (the normalised removal key) and beta = kk * a.
//
//   wkv7_prep   steps 3-7 for every token: decay, rate, keys, value residual      (prefill)
//   wkv7_chunk  steps 8-9 over T tokens, 16 at a time, state carried in and out    (prefill)
//   wkv7_seq    the same token by token (RWKV_WKV7_SEQ=serial, for A/B runs)        (prefill)
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

// ---- steps 8-9 over T tokens, CH tokens at a time (the chunked form) ----------------------------
// Same arguments and results as wkv7_seq. Per row i of S (s = S[i, :]), with D_t the product of
// the decays d_1..d_t inside the chunk and h_t = s_{t-1} . kk_t (the state's reading of the
// removal key), the recurrence s_t = s_{t-1} * d_t - h_t beta_t + v_t[i] kw_t unrolls to
//   h_t = s_0 . (kk_t D_{t-1}) + sum_{u<t}  v_u[i] G_ak[t,u] - h_u G_ab[t,u]
//   y_t = s_0 . (r_t D_t)      + sum_{u<=t} v_u[i] A_rk[t,u] - h_u A_rb[t,u]
//   s_CH = D_CH * (s_0 + sum_u v_u[i] kw_u / D_u - h_u beta_u / D_u)
// with G_ab[t,u] = (kk_t D_{t-1}) . (beta_u / D_u), G_ak alike with kw_u, A_rb and A_rk with r_t D_t
// (rwkv_cli.wkv.wkv7_sequence derives the same, for whole matrices). The [CH, CH] products are
// independent of the state; only h needs a forward substitution, CH short steps a chunk, instead
// of one dependent update a token. Decays lie in (0.545, 1), so 1 / D_u <= 0.545^-16 ~ 1.6e4 and
// every product of a D and a 1 / D is a ratio <= 1: nothing overflows, and each term keeps fp32's
// relative precision.
// The matrices come first, for every chunk at once (wkv7_chunk_mats, a block per (b, h, chunk));
// wkv7_chunk then carries the state through the chunks: a block per (b, h, 16 rows of S), 128
// threads, thread (p, g) holding row part * 16 + p, columns 4g..4g+3 and 32+4g..32+4g+3 (as in
// wkv7_seq), with the next chunk's inputs and matrices fetched into registers while this one is
// computed. Both stage a chunk the same way (`fetch_chunk`, `store_decayed`). Dynamic shared
// memory: sizeof(ChunkSmem), WKV7_CHUNK_SMEM = (5 * 16 * 68 + 16 * 16 + 4 * 16 * 20 + 2 * 64) * 4
// = 28416 bytes. The matrices travel through a buffer of B * H * chunks * 4 * 16 * 16 floats.
#define CH 16
#define NP (N + 4)  // padded rows: float4 reads of 8 different rows fall in different banks
#define GP 20       // the same for the [CH, CH] matrices' rows (float4-aligned)

struct ChunkSmem {
    float vec[5][CH][NP];  // r, d, kk, kw, beta, then in place r D, -, kk D_{t-1}, kw / D, beta / D
    float v[CH][16];       // this block's 16 value rows
    float G[4][CH][GP];    // G_ab (transposed: [u][t]), G_ak, A_rb, A_rk; zero where u > t (u >= t for G)
    float Dc[N];           // the chunk's whole decay
    float Dh[N];           // the decay of its first half
};
enum { VR, VD, VK, VW, VB };

__device__ __forceinline__ float4 lds4(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float dot4(float acc, const float4& a, const float4& b) {
    return acc + a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
// u += v * w + m * b over a row part (two float4)
__device__ __forceinline__ void axpy8(float4& u, float v, const float4& w, float m, const float4& b) {
    u.x += v * w.x + m * b.x; u.y += v * w.y + m * b.y; u.z += v * w.z + m * b.z; u.w += v * w.w + m * b.w;
}

// x[16]: this thread's partial sums for each t; the 8 threads of a row trade halves (14 shuffles in
// all) so that thread g ends with the row's full sums for t = g (in x[0]) and t = g + 8 (in x[8]).
__device__ __forceinline__ void reduce_to_owner(float (&x)[CH], int g) {
#pragma unroll
    for (int bit = 2; bit >= 0; --bit) {
        const bool upper = (g >> bit) & 1;
#pragma unroll
        for (int t = 0; t < CH; ++t) {
            if ((t >> bit) & 1 || (t & 7) >= (2 << bit)) continue;  // pairs (t, t + 2^bit) still in play
            const int t2 = t + (1 << bit);
            const float send = upper ? x[t] : x[t2], keep = upper ? x[t2] : x[t];
            x[t] = keep + __shfl_xor_sync(0xffffffffu, send, 1 << bit);
        }
    }
}

// Thread (j, hi) = (tid & 63, tid >> 6) stages key channel j of the five vectors for the chunk's
// first (hi = 0) or second 8 tokens; tokens past T are inert (no decay, nothing written or read).
__device__ __forceinline__ void fetch_chunk(float (&x)[5][8], const float* r, const float* d, const float* kk,
                                            const float* kw, const float* beta, int b, int h, int ch, int T,
                                            int C, int tid) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int t = ch * CH + (tid >> 6) * 8 + i;
        const size_t at = (size_t)(b * T + t) * C + h * N + (tid & 63);
#pragma unroll
        for (int vec = 0; vec < 5; ++vec) {
            const float* src = vec == VR ? r : vec == VD ? d : vec == VK ? kk : vec == VW ? kw : beta;
            x[vec][i] = t < T ? src[at] : (vec == VD ? 1.f : 0.f);
        }
    }
}

// The decays, then kk_t D_{t-1}, r_t D_t, kw_t / D_t, beta_t / D_t and D_CH into shared memory.
// Each half takes the product P within its own tokens; the second half also needs the first's
// total (Dh), read after the barrier inside. The caller syncs before reading the results.
__device__ __forceinline__ void store_decayed(ChunkSmem& sm, float (&x)[5][8], int tid) {
    const int j = tid & 63, hi = tid >> 6;
    float P = 1.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        x[VK][i] *= P;
        P *= x[VD][i];
        const float inv = 1.f / P;
        x[VR][i] *= P;
        x[VW][i] *= inv;
        x[VB][i] *= inv;
    }
    if (!hi) sm.Dh[j] = P;
    __syncthreads();
    const float D0 = hi ? sm.Dh[j] : 1.f, inv0 = 1.f / D0;
    if (hi) sm.Dc[j] = D0 * P;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int t = hi * 8 + i;
        sm.vec[VK][t][j] = x[VK][i] * D0;
        sm.vec[VR][t][j] = x[VR][i] * D0;
        sm.vec[VW][t][j] = x[VW][i] * inv0;
        sm.vec[VB][t][j] = x[VB][i] * inv0;
    }
}

// grid: B * H * chunks blocks of 128 threads. The four [CH, CH] matrices of one chunk, into
// G [(b * H + h) * chunks + chunk][4][CH][CH]: thread (t0, u) forms entries (t0, u) and (t0 + 8, u).
extern "C" __global__ void __launch_bounds__(128) wkv7_chunk_mats(
    const float* __restrict__ r, const float* __restrict__ d, const float* __restrict__ kk,
    const float* __restrict__ kw, const float* __restrict__ beta, float* __restrict__ G, int T, int H) {
    extern __shared__ float4 smem4[];
    ChunkSmem& sm = *reinterpret_cast<ChunkSmem*>(smem4);  // WKV7_CHUNK_SMEM bytes
    const int nch = (T + CH - 1) / CH, ch = blockIdx.x % nch, bh = blockIdx.x / nch, h = bh % H, b = bh / H;
    const int tid = threadIdx.x, t0 = tid >> 4, u = tid & 15;
    float x[5][8];
    fetch_chunk(x, r, d, kk, kw, beta, b, h, ch, T, H * N, tid);
    store_decayed(sm, x, tid);
    __syncthreads();
    float e[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // (G_ab, G_ak, A_rb, A_rk) x (t0, t0 + 8)
#pragma unroll
    for (int q = 0; q < 16; ++q) {
        const float4 cb = lds4(&sm.vec[VB][u][4 * q]), cw = lds4(&sm.vec[VW][u][4 * q]);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const float4 rk = lds4(&sm.vec[VK][t0 + 8 * k][4 * q]), rr = lds4(&sm.vec[VR][t0 + 8 * k][4 * q]);
            e[4 * k + 0] = dot4(e[4 * k + 0], rk, cb);
            e[4 * k + 1] = dot4(e[4 * k + 1], rk, cw);
            e[4 * k + 2] = dot4(e[4 * k + 2], rr, cb);
            e[4 * k + 3] = dot4(e[4 * k + 3], rr, cw);
        }
    }
    float* Gc = G + (size_t)blockIdx.x * 4 * CH * CH;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int t = t0 + 8 * k;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const float val = (u < t || (m >= 2 && u == t)) ? e[4 * k + m] : 0.f;
            Gc[(m * CH + (m == 0 ? u : t)) * CH + (m == 0 ? t : u)] = val;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128, 1) wkv7_chunk(
    const float* __restrict__ r, const float* __restrict__ d, const float* __restrict__ kk,
    const float* __restrict__ kw, const float* __restrict__ beta, const float* __restrict__ vw,  // [B*T, H*N]
    const float* __restrict__ G,                                // from wkv7_chunk_mats
    const float* __restrict__ S_in, float* __restrict__ S_out,  // [B, H, N, N]
    float* __restrict__ y,                                      // [B*T, H*N]
    int T, int H) {
    extern __shared__ float4 smem4[];
    ChunkSmem& sm = *reinterpret_cast<ChunkSmem*>(smem4);  // WKV7_CHUNK_SMEM bytes
    const int part = blockIdx.x & 3, bh = blockIdx.x >> 2, h = bh % H, b = bh / H;
    const int tid = threadIdx.x, g = tid & 7, p = tid >> 3, row = part * 16 + p;
    const int C = H * N, nch = (T + CH - 1) / CH;
    const float* Sb = S_in + ((size_t)bh * N + row) * N;
    float4 s0 = lds4(Sb + 4 * g), s1 = lds4(Sb + 32 + 4 * g);
    const float4* Gh = (const float4*)(G + (size_t)bh * nch * 4 * CH * CH);

    float x[5][8];
    float4 stv = make_float4(0.f, 0.f, 0.f, 0.f), stg[2];  // v: CH x 4 float4 (64 threads); G: 2 float4 a thread
    auto fetch = [&](int ch) {
        fetch_chunk(x, r, d, kk, kw, beta, b, h, ch, T, C, tid);
        if (tid < 64) {
            const int t = ch * CH + (tid >> 2);
            stv = t < T ? lds4(vw + (size_t)(b * T + t) * C + h * N + part * 16 + 4 * (tid & 3))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        stg[0] = Gh[ch * CH * CH + tid];
        stg[1] = Gh[ch * CH * CH + 128 + tid];
    };
    fetch(0);
    for (int ch = 0; ch < nch; ++ch) {
        if (tid < 64) *(float4*)&sm.v[tid >> 2][4 * (tid & 3)] = stv;
#pragma unroll
        for (int k = 0; k < 2; ++k) {  // float4 f of the chunk's matrices: (m, row, q) = (f >> 6, (f >> 2) & 15, f & 3)
            const int f = tid + 128 * k;
            *(float4*)&sm.G[f >> 6][(f >> 2) & 15][4 * (f & 3)] = stg[k];
        }
        store_decayed(sm, x, tid);
        __syncthreads();
        if (ch + 1 < nch) fetch(ch + 1);  // in flight while this chunk is computed

        // this row: s_0's readings (thread g keeps t = g and g + 8), the value terms of h, then h by
        // forward substitution (every thread, all t), y for the thread's two t, and the new state
        float a[CH], c[CH], hv[CH], vv[CH];
#pragma unroll
        for (int t = 0; t < CH; ++t) {
            a[t] = dot8(s0, s1, lds4(&sm.vec[VK][t][4 * g]), lds4(&sm.vec[VK][t][32 + 4 * g]));
            c[t] = dot8(s0, s1, lds4(&sm.vec[VR][t][4 * g]), lds4(&sm.vec[VR][t][32 + 4 * g]));
            vv[t] = sm.v[t][p];
        }
        reduce_to_owner(a, g);
        reduce_to_owner(c, g);
        float own_a[2] = {a[0], a[8]}, own_y[2] = {c[0], c[8]};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int t = g + 8 * half;
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // zero where u >= t
                const float4 gk = lds4(&sm.G[1][t][4 * q]);
                own_a[half] += gk.x * vv[4 * q] + gk.y * vv[4 * q + 1] + gk.z * vv[4 * q + 2] + gk.w * vv[4 * q + 3];
            }
        }
#pragma unroll
        for (int t = 0; t < CH; ++t) a[t] = __shfl_sync(0xffffffffu, own_a[t >> 3], t & 7, 8);
#pragma unroll
        for (int u = 0; u < CH; ++u) {  // h_u is final; take it out of the later rows (G_ab[t, u] = 0 for t <= u)
            hv[u] = a[u];
#pragma unroll
            for (int q = (u + 1) >> 2; q < 4; ++q) {
                const float4 gb = lds4(&sm.G[0][u][4 * q]);
                a[4 * q] -= gb.x * hv[u]; a[4 * q + 1] -= gb.y * hv[u]; a[4 * q + 2] -= gb.z * hv[u]; a[4 * q + 3] -= gb.w * hv[u];
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int t = g + 8 * half;
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // zero where u > t
                const float4 ak = lds4(&sm.G[3][t][4 * q]), ab = lds4(&sm.G[2][t][4 * q]);
                own_y[half] += ak.x * vv[4 * q] + ak.y * vv[4 * q + 1] + ak.z * vv[4 * q + 2] + ak.w * vv[4 * q + 3]
                             - (ab.x * hv[4 * q] + ab.y * hv[4 * q + 1] + ab.z * hv[4 * q + 2] + ab.w * hv[4 * q + 3]);
            }
            if (ch * CH + t < T) y[((size_t)(b * T + ch * CH + t)) * C + h * N + row] = own_y[half];
        }
        float4 u0 = s0, u1 = s1;
#pragma unroll
        for (int t = 0; t < CH; ++t) {
            axpy8(u0, vv[t], lds4(&sm.vec[VW][t][4 * g]), -hv[t], lds4(&sm.vec[VB][t][4 * g]));
            axpy8(u1, vv[t], lds4(&sm.vec[VW][t][32 + 4 * g]), -hv[t], lds4(&sm.vec[VB][t][32 + 4 * g]));
        }
        const float4 d0 = lds4(&sm.Dc[4 * g]), d1 = lds4(&sm.Dc[32 + 4 * g]);
        s0 = make_float4(d0.x * u0.x, d0.y * u0.y, d0.z * u0.z, d0.w * u0.w);
        s1 = make_float4(d1.x * u1.x, d1.y * u1.y, d1.z * u1.z, d1.w * u1.w);
        __syncthreads();  // everything read; the next chunk is stored over it
    }
    float* So = S_out + ((size_t)bh * N + row) * N;
    *(float4*)(So + 4 * g) = s0;
    *(float4*)(So + 32 + 4 * g) = s1;
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
