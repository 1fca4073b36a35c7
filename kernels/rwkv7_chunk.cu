// RWKV-7's recurrence over a prompt, 16 tokens at a time (rwkv-models.md section 7.4, steps 8-9):
//   wkv7_chunk_mats  the state-independent [16, 16] matrices of every chunk, all chunks at once
//   wkv7_chunk       the state carried through the chunks: outputs y and the final state
// Same results as kernels/rwkv7.cu's wkv7_seq (token by token), from the same prepared fp32
// vectors (wkv7_prep). Twin: rwkv_cli.wkv.wkv7_sequence.
#include "common.cuh"

#define N 64

// ---- steps 8-9 over T tokens, CH tokens at a time (the chunked form) ----------------------------
// Per row i of S (s = S[i, :]), with D_t the product of the decays d_1..d_t inside the chunk
// (D_-1 = 1) and h_t = s_{t-1} . kk_t (the state's reading of the removal key), the recurrence
// s_t = s_{t-1} * d_t - h_t beta_t + v_t[i] kw_t unrolls to
//   h_t = s_0 . (kk_t D_{t-1}) + sum_{u<t}  v_u[i] G_ak[t,u] - h_u G_ab[t,u]
//   y_t = s_0 . (r_t D_t)      + sum_{u<=t} v_u[i] A_rk[t,u] - h_u A_rb[t,u]
//   s_CH = D_CH * (s_0 + sum_u v_u[i] kw_u / D_u - h_u beta_u / D_u)
// with G_ab[t,u] = (kk_t D_{t-1}) . (beta_u / D_u), G_ak alike with kw_u, A_rb and A_rk with r_t D_t.
// The first line is a unit lower triangular system, (I + G_ab) h = (kk D_-1) s_0 + G_ak v, so
//   h = W s_0 + Uh v,   y = Q s_0 + Uy v
// with W = (I + G_ab)^-1 (kk D_-1) [16 x 64], Uh = (I + G_ab)^-1 G_ak, Q = r D - A_rb W and
// Uy = A_rk - A_rb Uh [16 x 16]: all independent of the state, so they are formed for every chunk
// at once (wkv7_chunk_mats, a block per (b, h, chunk)), and carrying the state through a chunk
// (wkv7_chunk) is two products: the readings [h; y] = [W Uh; Q Uy] [s_0; v] and the update.
// Decays lie in (0.545, 1), so 1 / D_u <= 0.545^-16 ~ 1.6e4 and every product of a D and a 1 / D
// is a ratio <= 1: nothing overflows. Twins: rwkv_cli.cuda.twins.wkv7_chunk_mats / wkv7_chunk,
// and the whole recurrence rwkv_cli.wkv.wkv7_sequence.
// wkv7_chunk_mats writes Q, W and beta / D over d, kk and beta (dead after it; the same shape, so
// a prompt's memory does not grow), and kw / D, Uh, Uy and D_CH into `mats`, CHUNK_MATS floats a
// (b, h, chunk). wkv7_chunk: a block per (b, h, 16 rows of S), 128 threads, the rows in shared
// memory. Per chunk, both products run on tensor cores at fp32 accuracy (3xTF32): the readings
// ([16 x 80] x [80 x 32], a column tile per warp) and the update S <- D_CH (S + [v | -h]
// [kw / D; beta / D]) ([16 x 32] x [32 x 64], two column tiles per warp). The next chunk's
// factors are fetched into registers while this one is computed, and staged into the other of
// two shared buffers, so a chunk needs two barriers. Dynamic shared memory: WKV7_CHUNK_MATS_SMEM =
// sizeof(MatsSmem) = (5 * 16 * 68 + 4 * 16 * 20 + 2 * 64) * 4 = 27392 bytes and
// WKV7_CHUNK_SMEM = sizeof(ChunkSmem) = (2 * 32 * 84 + 2 * 32 * 72 + 16 * 116 + 2 * 64) * 4 = 47872.
#define CH 16
#define NP (N + 4)  // padded rows: float4 reads of 8 different rows fall in different banks
#define GP 20       // the same for the [CH, CH] matrices' rows (float4-aligned)
#define CHUNK_MATS (CH * N + 2 * CH * CH + N)  // floats a (b, h, chunk) in mats: kw / D, Uh, Uy, D_CH

struct MatsSmem {
    float vec[5][CH][NP];  // r, d, kk, kw, beta, then in place r D, -, kk D_{t-1} (then W), kw / D, beta / D
    float G[4][CH][GP];    // G_ab, G_ak (then Uh), A_rb, A_rk; zero where u > t (u >= t for G_ab, G_ak)
    float Dc[N];           // the chunk's whole decay
    float Dh[N];           // the decay of its first half
};
// wkv7_chunk's shared memory. Row strides are chosen for the mma fragments' access patterns:
// 84 and 116 = 20 (mod 32) and 72 = 8 (mod 32) make each warp's 32 reads fall in 32 banks.
#define MP 84   // M rows: 64 keys, then 16 value coefficients
#define KP 72
#define SP 116  // S rows: 64 keys, then v (two buffers) and -h
#define SV 64   // first column of S's v buffers (SV + 16 * buf)
#define SH 96   // first column of -h
struct ChunkSmem {
    float M[2][2 * CH][MP];   // the readings' factor: rows t = [W Uh] (t < 16), [Q Uy] (16 + t); two buffers
    float KB[2][2 * CH][KP];  // the update's factor: kw / D (t < 16), beta / D (16 + t); two buffers
    float S[16][SP];          // this block's 16 state rows, their chunk's v_t (two buffers) and -h_t
    float Dc[2][N];           // D_CH; two buffers
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
// a b for one m16n8k8 tile, added to three accumulators: big += hi hi, small += lo hi, small2 +=
// hi lo (kept apart so that chains of dependent mma stay short). a: A fragment (a0 (g, t),
// a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4) with g = lane / 4, t = lane % 4), b: B fragment
// (b0 (k = t, n = g), b1 (k = t + 4, n = g)), accumulators (g, 2t), (g, 2t + 1), (g + 8, 2t),
// (g + 8, 2t + 1).
__device__ __forceinline__ void mma_3xtf32(float (&big)[4], float (&small)[4], float (&small2)[4], const float (&a)[4],
                                           const float (&b)[2]) {
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
    MMA_TF32(small2, ah, bl);
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
__device__ __forceinline__ void store_decayed(MatsSmem& sm, float (&x)[5][8], int tid) {
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

// grid: B * H * chunks blocks of 128 threads, one chunk of one head each. Reads the chunk's r, d,
// kk, kw, beta; writes Q over d, W over kk, beta / D over beta (tokens < T), and kw / D, Uh, Uy,
// D_CH into mats [(b * H + h) * chunks + chunk][CHUNK_MATS].
extern "C" __global__ void __launch_bounds__(128) wkv7_chunk_mats(
    const float* __restrict__ r, float* __restrict__ d, float* __restrict__ kk, const float* __restrict__ kw,
    float* __restrict__ beta, float* __restrict__ mats, int T, int H) {
    extern __shared__ float4 smem4[];
    MatsSmem& sm = *reinterpret_cast<MatsSmem*>(smem4);  // WKV7_CHUNK_MATS_SMEM bytes
    const int nch = (T + CH - 1) / CH, ch = blockIdx.x % nch, bh = blockIdx.x / nch, h = bh % H, b = bh / H;
    const int tid = threadIdx.x, C = H * N;
    float x[5][8];
    fetch_chunk(x, r, d, kk, kw, beta, b, h, ch, T, C, tid);
    store_decayed(sm, x, tid);
    __syncthreads();
    {  // the four [CH, CH] matrices: thread (t0, u) forms entries (t0, u) and (t0 + 8, u)
        const int t0 = tid >> 4, u = tid & 15;
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
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int t = t0 + 8 * k;
#pragma unroll
            for (int m = 0; m < 4; ++m) sm.G[m][t][u] = (u < t || (m >= 2 && u == t)) ? e[4 * k + m] : 0.f;
        }
    }
    __syncthreads();
    if (tid < N + CH) {  // (I + G_ab) [W | Uh] = [kk D_-1 | G_ak] by forward substitution, a column a thread, in place
        float* col = tid < N ? &sm.vec[VK][0][tid] : &sm.G[1][0][tid - N];
        const int stride = tid < N ? NP : GP;
        float xs[CH];
#pragma unroll
        for (int t = 0; t < CH; ++t) {
            float acc = col[t * stride];
#pragma unroll
            for (int u = 0; u < t; ++u) acc -= sm.G[0][t][u] * xs[u];
            xs[t] = acc;
            col[t * stride] = acc;
        }
    }
    __syncthreads();
    const int j = tid & 63, hi = tid >> 6;
    float w[CH];
#pragma unroll
    for (int u = 0; u < CH; ++u) w[u] = sm.vec[VK][u][j];
    float* Mc = mats + (size_t)blockIdx.x * CHUNK_MATS;
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // Q = r D - A_rb W; this thread's key j, tokens 8 hi + i
        const int t = 8 * hi + i;
        float q = sm.vec[VR][t][j];
#pragma unroll
        for (int u = 0; u < CH; ++u) q -= sm.G[2][t][u] * w[u];  // A_rb[t, u] = 0 for u > t
        Mc[t * N + j] = sm.vec[VW][t][j];
        if (ch * CH + t < T) {
            const size_t at = (size_t)(b * T + ch * CH + t) * C + h * N + j;
            d[at] = q;
            kk[at] = sm.vec[VK][t][j];
            beta[at] = sm.vec[VB][t][j];
        }
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // Uh, and Uy = A_rk - A_rb Uh: entries (t, c) = (e >> 4, e & 15)
        const int e = tid + 128 * k, t = e >> 4, c = e & 15;
        float q = sm.G[3][t][c];
#pragma unroll
        for (int u = 0; u < CH; ++u) q -= sm.G[2][t][u] * sm.G[1][u][c];
        Mc[CH * N + e] = sm.G[1][t][c];
        Mc[CH * N + CH * CH + e] = q;
    }
    if (tid < N) Mc[CH * N + 2 * CH * CH + tid] = sm.Dc[tid];
}

__device__ __forceinline__ void st4(float* p, const float4& v) { *(float4*)p = v; }

extern "C" __global__ void __launch_bounds__(128, 1) wkv7_chunk(
    const float* __restrict__ Q, const float* __restrict__ W, const float* __restrict__ VB,  // from wkv7_chunk_mats
    const float* __restrict__ vw,                                                             // [B*T, H*N]
    const float* __restrict__ mats,                                                           // from wkv7_chunk_mats
    const float* __restrict__ S_in, float* __restrict__ S_out,  // [B, H, N, N]
    float* __restrict__ y,                                      // [B*T, H*N]
    int T, int H) {
    extern __shared__ float4 smem4[];
    ChunkSmem& sm = *reinterpret_cast<ChunkSmem*>(smem4);  // WKV7_CHUNK_SMEM bytes
    const int part = blockIdx.x & 3, bh = blockIdx.x >> 2, h = bh % H, b = bh / H;
    const int tid = threadIdx.x, warp = tid >> 5, lg = (tid & 31) >> 2, lt = tid & 3;  // mma fragment coordinates
    const int C = H * N, nch = (T + CH - 1) / CH;
    const float* Sb = S_in + ((size_t)bh * N + part * 16) * N;
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // the block's 16 rows: 256 float4
        const int f = tid + 128 * k;
        st4(&sm.S[f >> 4][4 * (f & 15)], ld4(Sb + 4 * f));
    }
    const float* Mh = mats + (size_t)bh * nch * CHUNK_MATS;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    // a chunk's factors in registers: W, Q, beta / D, kw / D (2 float4 each), Uh | Uy, D_CH, v
    float4 pw[2], pq[2], pb[2], pk[2], pu, pd = zero, pv = zero;
    auto fetch = [&](int ch) {
        const float* Mc = Mh + (size_t)ch * CHUNK_MATS;
#pragma unroll
        for (int k = 0; k < 2; ++k) {  // float4 f = (token f >> 4, keys 4 (f & 15) ..)
            const int f = tid + 128 * k, t = ch * CH + (f >> 4);
            const size_t at = (size_t)(b * T + t) * C + h * N + 4 * (f & 15);
            pw[k] = t < T ? ld4(W + at) : zero;
            pq[k] = t < T ? ld4(Q + at) : zero;
            pb[k] = t < T ? ld4(VB + at) : zero;
            pk[k] = ld4(Mc + 4 * f);
        }
        pu = ld4(Mc + CH * N + 4 * tid);
        if (tid < 16) pd = ld4(Mc + CH * N + 2 * CH * CH + 4 * tid);
        if (tid < 64) {  // v of token tid >> 2, this block's rows 4 (tid & 3) ..
            const int t = ch * CH + (tid >> 2);
            pv = t < T ? ld4(vw + (size_t)(b * T + t) * C + h * N + part * 16 + 4 * (tid & 3)) : zero;
        }
    };
    fetch(0);
    for (int ch = 0; ch < nch; ++ch) {
        const int buf = ch & 1, vc = SV + 16 * buf;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int f = tid + 128 * k, t = f >> 4, q = 4 * (f & 15);
            st4(&sm.M[buf][t][q], pw[k]);
            st4(&sm.M[buf][CH + t][q], pq[k]);
            st4(&sm.KB[buf][t][q], pk[k]);
            st4(&sm.KB[buf][CH + t][q], pb[k]);
        }
        st4(&sm.M[buf][CH * (tid >> 6) + ((tid >> 2) & 15)][N + 4 * (tid & 3)], pu);  // Uh (t < 16), Uy
        if (tid < 16) st4(&sm.Dc[buf][4 * tid], pd);
        if (tid < 64) {
            const int t = tid >> 2, i = 4 * (tid & 3);
            sm.S[i][vc + t] = pv.x;
            sm.S[i + 1][vc + t] = pv.y;
            sm.S[i + 2][vc + t] = pv.z;
            sm.S[i + 3][vc + t] = pv.w;
        }
        __syncthreads();  // staged, and the last update's rows are in place
        if (ch + 1 < nch) fetch(ch + 1);  // in flight while this chunk is computed

        {  // readings [h | y] = [S_0 | v] [W Uh; Q Uy]^T, [16 x 80] x [80 x 32]: warp w forms columns 8w..8w+7
            const float(*Mq)[MP] = sm.M[buf] + 8 * warp;
            float acc[6][4] = {};  // (big, small, small2) x (even, odd k-steps): six short chains
#pragma unroll
            for (int k0 = 0; k0 < N + CH; k0 += 8) {
                const int c = k0 < N ? k0 : vc + (k0 - N);
                const float a[4] = {sm.S[lg][c + lt], sm.S[lg + 8][c + lt], sm.S[lg][c + lt + 4], sm.S[lg + 8][c + lt + 4]};
                const float bq[2] = {Mq[lg][k0 + lt], Mq[lg][k0 + lt + 4]};
                const int e = (k0 >> 3) & 1;
                mma_3xtf32(acc[e], acc[2 + e], acc[4 + e], a, bq);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float sum = ((acc[2][i] + acc[3][i]) + (acc[4][i] + acc[5][i])) + (acc[0][i] + acc[1][i]);
                const int row = lg + 8 * (i >> 1), n = 8 * warp + 2 * lt + (i & 1);
                if (warp < 2) {
                    sm.S[row][SH + n] = -sum;
                } else if (ch * CH + n - CH < T) {
                    y[(size_t)(b * T + ch * CH + n - CH) * C + h * N + part * 16 + row] = sum;
                }
            }
        }
        __syncthreads();

        {  // S <- D_CH (S + [v | -h] [kw / D; beta / D]), [16 x 32] x [32 x 64]: warp w forms columns 16w..16w+15
            float big[2][4], small[2][4] = {}, small2[2][4] = {};  // per column tile; big starts from S
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int n0 = 16 * warp + 8 * nt;
#pragma unroll
                for (int i = 0; i < 4; ++i) big[nt][i] = sm.S[lg + 8 * (i >> 1)][n0 + 2 * lt + (i & 1)];
            }
#pragma unroll
            for (int k0 = 0; k0 < 2 * CH; k0 += 8) {
                const int c = k0 < CH ? vc + k0 : SH + (k0 - CH);
                const float a4[4] = {sm.S[lg][c + lt], sm.S[lg + 8][c + lt], sm.S[lg][c + lt + 4], sm.S[lg + 8][c + lt + 4]};
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const int n0 = 16 * warp + 8 * nt;
                    const float bw[2] = {sm.KB[buf][k0 + lt][n0 + lg], sm.KB[buf][k0 + lt + 4][n0 + lg]};
                    mma_3xtf32(big[nt], small[nt], small2[nt], a4, bw);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int n0 = 16 * warp + 8 * nt;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int col = n0 + 2 * lt + (i & 1);
                    sm.S[lg + 8 * (i >> 1)][col] = sm.Dc[buf][col] * (big[nt][i] + (small[nt][i] + small2[nt][i]));
                }
            }
        }
        // no barrier here: the next chunk is staged into the other buffers, and the barrier after
        // staging orders this update before the next readings
    }
    __syncthreads();
    float* So = S_out + ((size_t)bh * N + part * 16) * N;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int f = tid + 128 * k;
        st4(So + 4 * f, ld4(&sm.S[f >> 4][4 * (f & 15)]));
    }
}
