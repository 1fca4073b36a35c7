// RWKV-7's recurrence over a prompt, 16 tokens at a time (rwkv-models.md section 7.4, steps 8-9):
//   wkv7_chunk_mats  the state-independent [16, 16] matrices of every chunk, all chunks at once
//   wkv7_chunk       the state carried through the chunks: outputs y and the final state
// Same results as kernels/rwkv7.cu's wkv7_seq (token by token), from the same prepared fp32
// vectors (wkv7_prep). Twin: rwkv_cli.wkv.wkv7_sequence.
#include "common.cuh"

#define N 64

// ---- steps 8-9 over T tokens, CH tokens at a time (the chunked form) ----------------------------
// Per row i of S (s = S[i, :]), with D_t the product of the decays d_1..d_t inside the chunk
// and h_t = s_{t-1} . kk_t (the state's reading of the removal key), the recurrence
// s_t = s_{t-1} * d_t - h_t beta_t + v_t[i] kw_t unrolls to
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
// threads, the rows in shared memory. Per chunk, the two products with the state run on tensor
// cores at fp32 accuracy (3xTF32): the readings S_0 [kk D; r D]^T ([16 x 64] x [64 x 32], a
// column tile per warp) and the update S <- D_CH (S + [v | -h] [kw / D; beta / D]) ([16 x 32] x
// [32 x 64], two column tiles per warp); between them thread (p, g) works on row p: h by forward
// substitution and y for t = g and g + 8. The next chunk's inputs and matrices are fetched into
// registers while this one is computed. Both kernels stage a chunk the same way (`fetch_chunk`,
// `store_decayed`). Dynamic shared memory: sizeof(ChunkSmem), WKV7_CHUNK_SMEM = (5 * 16 * 68 +
// 16 * 16 + 4 * 16 * 20 + 2 * 64 + 16 * (68 + 33 + 36)) * 4 = 37184 bytes. The matrices travel
// through a buffer of B * H * chunks * 4 * 16 * 16 floats.
#define CH 16
#define NP (N + 4)  // padded rows: float4 reads of 8 different rows fall in different banks
#define GP 20       // the same for the [CH, CH] matrices' rows (float4-aligned)

struct ChunkSmem {
    float vec[5][CH][NP];  // r, d, kk, kw, beta, then in place r D, -, kk D_{t-1}, kw / D, beta / D
    float v[CH][16];       // this block's 16 value rows
    float G[4][CH][GP];    // G_ab (transposed: [u][t]), G_ak, A_rb, A_rk; zero where u > t (u >= t for G)
    float Dc[N];           // the chunk's whole decay
    float Dh[N];           // the decay of its first half
    float S[16][NP];       // wkv7_chunk: this block's 16 state rows
    float R[16][2 * CH + 1];  // their readings of kk_t D_{t-1} (t < 16) and r_t D_t (16 + t)
    float U[16][2 * CH + 4];  // the update's left factor: v_t (t < 16) and -h_t (16 + t)
};
enum { VR, VD, VK, VW, VB };

__device__ __forceinline__ float4 ld4(const float* p) { return *(const float4*)p; }  // 16 bytes, shared or global
__device__ __forceinline__ float dot4(float acc, const float4& a, const float4& b) {
    return acc + a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
// Products on tensor cores at fp32 accuracy ("3xTF32"): x = hi + lo with hi, lo TF32 (10-bit
// mantissas), x y ~ hi_x hi_y + hi_x lo_y + lo_x hi_y, the dropped lo lo term ~2^-22 relative.
__device__ __forceinline__ void split_tf32(float x, u32& hi, u32& lo) {
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(hi) : "f"(x));
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(lo) : "f"(x - __uint_as_float(hi)));
}
// a b for one m16n8k8 tile, added to two accumulators: big += hi hi, small += hi lo + lo hi (kept
// apart so that chains of dependent mma stay short). a: A fragment (a0 (g, t), a1 (g + 8, t), a2
// (g, t + 4), a3 (g + 8, t + 4) with g = lane / 4, t = lane % 4), b: B fragment (b0 (k = t, n = g),
// b1 (k = t + 4, n = g)), accumulators (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
__device__ __forceinline__ void mma_3xtf32(float (&big)[4], float (&small)[4], const float (&a)[4], const float (&b)[2]) {
    u32 ah[4], al[4], bh[2], bl[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], ah[i], al[i]);
    split_tf32(b[0], bh[0], bl[0]);
    split_tf32(b[1], bh[1], bl[1]);
#define MMA_TF32(c, A, B)                                                                                 \
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "   \
                 "{%8,%9}, {%0,%1,%2,%3};"                                                              \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                       \
                 : "r"(A[0]), "r"(A[1]), "r"(A[2]), "r"(A[3]), "r"(B[0]), "r"(B[1]))
    MMA_TF32(small, al, bh);
    MMA_TF32(small, ah, bl);
    MMA_TF32(big, ah, bh);
#undef MMA_TF32
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
        const float4 cb = ld4(&sm.vec[VB][u][4 * q]), cw = ld4(&sm.vec[VW][u][4 * q]);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const float4 rk = ld4(&sm.vec[VK][t0 + 8 * k][4 * q]), rr = ld4(&sm.vec[VR][t0 + 8 * k][4 * q]);
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
    const int warp = tid >> 5, lg = (tid & 31) >> 2, lt = tid & 3;  // tensor-core fragment coordinates
    const int C = H * N, nch = (T + CH - 1) / CH;
    const float* Sb = S_in + ((size_t)bh * N + part * 16) * N;
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // the block's 16 rows: 256 float4
        const int f = tid + 128 * k;
        *(float4*)&sm.S[f >> 4][4 * (f & 15)] = ld4(Sb + 4 * f);
    }
    const float4* Gh = (const float4*)(G + (size_t)bh * nch * 4 * CH * CH);

    float x[5][8];
    float4 stv = make_float4(0.f, 0.f, 0.f, 0.f), stg[2];  // v: CH x 4 float4 (64 threads); G: 2 float4 a thread
    auto fetch = [&](int ch) {
        fetch_chunk(x, r, d, kk, kw, beta, b, h, ch, T, C, tid);
        if (tid < 64) {
            const int t = ch * CH + (tid >> 2);
            stv = t < T ? ld4(vw + (size_t)(b * T + t) * C + h * N + part * 16 + 4 * (tid & 3))
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

        {  // readings R = S_0 [kk D; r D]^T, [16 x 64] x [64 x 32]: warp w forms columns 8w..8w+7
            const float(*q)[NP] = sm.vec[warp < 2 ? VK : VR] + 8 * (warp & 1);
            float acc[4][4] = {};  // (big, small) x (even, odd k-steps): four short chains
#pragma unroll
            for (int k0 = 0; k0 < N; k0 += 8) {
                const float a[4] = {sm.S[lg][k0 + lt], sm.S[lg + 8][k0 + lt], sm.S[lg][k0 + lt + 4], sm.S[lg + 8][k0 + lt + 4]};
                const float bq[2] = {q[lg][k0 + lt], q[lg][k0 + lt + 4]};
                mma_3xtf32(acc[(k0 >> 3) & 1], acc[2 + ((k0 >> 3) & 1)], a, bq);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float sum = (acc[2][i] + acc[3][i]) + (acc[0][i] + acc[1][i]);
                sm.R[lg + 8 * (i >> 1)][8 * warp + 2 * lt + (i & 1)] = sum;
            }
        }
        __syncthreads();

        // this row (thread g keeps t = g and g + 8): the value terms of h, then h by forward
        // substitution (every thread, all t), y for the thread's two t, the update's left factor
        float a[CH], hv[CH], vv[CH];
#pragma unroll
        for (int t = 0; t < CH; ++t) vv[t] = sm.v[t][p];
        float own_a[2] = {sm.R[p][g], sm.R[p][g + 8]}, own_y[2] = {sm.R[p][CH + g], sm.R[p][CH + g + 8]};
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int t = g + 8 * half;
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // zero where u >= t
                const float4 gk = ld4(&sm.G[1][t][4 * q]);
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
                const float4 gb = ld4(&sm.G[0][u][4 * q]);
                a[4 * q] -= gb.x * hv[u]; a[4 * q + 1] -= gb.y * hv[u]; a[4 * q + 2] -= gb.z * hv[u]; a[4 * q + 3] -= gb.w * hv[u];
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int t = g + 8 * half;
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // zero where u > t
                const float4 ak = ld4(&sm.G[3][t][4 * q]), ab = ld4(&sm.G[2][t][4 * q]);
                own_y[half] += ak.x * vv[4 * q] + ak.y * vv[4 * q + 1] + ak.z * vv[4 * q + 2] + ak.w * vv[4 * q + 3]
                             - (ab.x * hv[4 * q] + ab.y * hv[4 * q + 1] + ab.z * hv[4 * q + 2] + ab.w * hv[4 * q + 3]);
            }
            if (ch * CH + t < T) y[((size_t)(b * T + ch * CH + t)) * C + h * N + row] = own_y[half];
        }
#pragma unroll
        for (int t = 0; t < CH; ++t) {
            if ((t & 7) == g) {
                sm.U[p][t] = vv[t];
                sm.U[p][CH + t] = -hv[t];
            }
        }
        __syncthreads();

        {  // S <- D_CH (S + U [kw / D; beta / D]), [16 x 32] x [32 x 64]: warp w forms columns 16w..16w+15
            float big[2][4], small[2][4] = {};  // per column tile; big starts from S
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int n0 = 16 * warp + 8 * nt;
#pragma unroll
                for (int i = 0; i < 4; ++i) big[nt][i] = sm.S[lg + 8 * (i >> 1)][n0 + 2 * lt + (i & 1)];
            }
#pragma unroll
            for (int k0 = 0; k0 < 2 * CH; k0 += 8) {
                const float a4[4] = {sm.U[lg][k0 + lt], sm.U[lg + 8][k0 + lt], sm.U[lg][k0 + lt + 4], sm.U[lg + 8][k0 + lt + 4]};
                const float(*w)[NP] = sm.vec[k0 < CH ? VW : VB] + (k0 & (CH - 1));
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const int n0 = 16 * warp + 8 * nt;
                    const float bw[2] = {w[lt][n0 + lg], w[lt + 4][n0 + lg]};
                    mma_3xtf32(big[nt], small[nt], a4, bw);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int n0 = 16 * warp + 8 * nt;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int col = n0 + 2 * lt + (i & 1);
                    sm.S[lg + 8 * (i >> 1)][col] = sm.Dc[col] * (big[nt][i] + small[nt][i]);
                }
            }
        }
        __syncthreads();  // everything read; the next chunk is stored over it
    }
    float* So = S_out + ((size_t)bh * N + part * 16) * N;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int f = tid + 128 * k;
        *(float4*)(So + 4 * f) = ld4(&sm.S[f >> 4][4 * (f & 15)]);
    }
}
