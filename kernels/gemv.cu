// Matrix-vector products for decoding: y[b, o] = epilogue(sum_i in(x)[b, i] * W[o, i]) for a few
// sequences (B <= 4), with several independent products ("segments") in one launch.
//
// Decoding one token is a chain of small launches; the products that need only the same earlier
// result (RWKV-7: r, k, v and the four LoRA down-projections) run as one launch, so the GPU sees
// one wide grid instead of seven narrow ones. Weights are [O, I] row-major in fp16 or bf16 and are
// streamed once with 16-byte loads that bypass L1; the input is staged in shared memory (16-bit),
// fp32 accumulation.
//
// Input staging `in_act`: 0 x, 1 tanh(x), 2 sigmoid(x), or the LayerNorm of the residual x fused
// with the token shift (rwkv-models.md §6): 3 xx + (p - xx) * mix (v7), 4 p + (xx - p) * mix (v4),
// 5 xx alone; xx = LN(x) rounded to 16 bits, p = shift (the previous token's xx). Every block
// normalises the B rows itself (C values each, from L2), which costs less than a separate launch.
// The segment's first block also writes xx to `xx_out` and copies `copy_n` 16-bit values from
// `copy_src` to `copy_dst` (how the decoding step updates its shift state a launch later).
// Epilogue, in this order: out_act (none | relu^2 | sigmoid), times gate[b, o], plus res[b, o],
// times scale; stored as fp32 or 16-bit. `res` may alias `y` (in-place residual add).
// Twin: rwkv_cli.cuda.twins.gemv_reference.
#include "common.cuh"

#define MAX_SEG 8
#define WARPS 8
#define RW 2    // rows per warp
#define UNR 4   // 16-byte chunks per lane in flight, per row

struct Seg {
    const void* x;     // [B, I] (row stride x_stride)
    const void* W;     // [O, I]
    void* y;           // [B, O] (row stride y_stride)
    const void* res;   // [B, O] or null
    const void* gate;  // [B, O] or null
    const void* shift; // [B, I] previous token's LN output (in_act 3, 4)
    const void* ln_w;  // [I] (in_act 3, 4, 5)
    const void* ln_b;  // [I]
    const void* mix;   // [I] (in_act 3, 4)
    void* xx_out;      // [B, I] or null: LN output, written by the segment's first block
    const void* copy_src;  // side copy by the segment's first block (or null)
    void* copy_dst;
    int O, I, x_stride, y_stride;
    int in_act;        // 0 none, 1 tanh, 2 sigmoid, 3 LN + mix (v7), 4 LN + mix (v4), 5 LN
    int out_act;       // 0 none, 1 relu^2, 2 sigmoid
    int out_f32;       // y is fp32
    float scale;
    int block_start;   // first block of this segment
    int copy_n;        // 16-bit values to copy
};
struct GemvParams {
    Seg seg[MAX_SEG];
    int n_seg;
};

template <class S>
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    f[0] = S::lo(v.x); f[1] = S::hi(v.x); f[2] = S::lo(v.y); f[3] = S::hi(v.y);
    f[4] = S::lo(v.z); f[5] = S::hi(v.z); f[6] = S::lo(v.w); f[7] = S::hi(v.w);
}

template <class S>
__device__ __forceinline__ u32 pack2(float a, float b) {
    return (u32)S::store(a) | ((u32)S::store(b) << 16);
}

__device__ __forceinline__ float activate(float v, int act) {
    if (act == 1) return tanhf(v);
    if (act == 2) return sigmoidf_(v);
    return v;
}

// In-place on the staged rows xs [B][I/8]: xx = LN(x) (eps 1e-5, biased variance, fp32, rounded
// to 16 bits like torch's layer_norm), then the token-shift mix with p = shift. Ends synced.
template <class S, int B>
__device__ void layernorm_mix(const Seg& sg, uint4* xs, int nchunk, bool first_block) {
    __shared__ float red[2][WARPS][B];
    __shared__ float mean[B], rstd[B];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[B];
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
            acc[b] = 0.f;
            for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
                float f[8];
                unpack8<S>(xs[b * nchunk + c], f);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float dv = pass ? f[e] - mean[b] : f[e];
                    acc[b] += pass ? dv * dv : dv;
                }
            }
            acc[b] = warp_sum(acc[b]);
            if (lane == 0) red[pass][warp][b] = acc[b];
        }
        __syncthreads();
        if (threadIdx.x < B) {
            float t = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) t += red[pass][w][threadIdx.x];
            if (pass == 0) mean[threadIdx.x] = t / sg.I;
            else rstd[threadIdx.x] = rsqrtf(t / sg.I + 1e-5f);
        }
        __syncthreads();
    }
    for (int idx = threadIdx.x; idx < B * nchunk; idx += blockDim.x) {
        const int b = idx / nchunk, c = idx - b * nchunk;
        float f[8], w[8], bi[8], xx[8];
        unpack8<S>(xs[idx], f);
        unpack8<S>(((const uint4*)sg.ln_w)[c], w);
        unpack8<S>(((const uint4*)sg.ln_b)[c], bi);
#pragma unroll
        for (int e = 0; e < 8; ++e) xx[e] = S::load(S::store((f[e] - mean[b]) * rstd[b] * w[e] + bi[e]));
        const uint4 xx4 = make_uint4(pack2<S>(xx[0], xx[1]), pack2<S>(xx[2], xx[3]), pack2<S>(xx[4], xx[5]), pack2<S>(xx[6], xx[7]));
        if (first_block && sg.xx_out) ((uint4*)((u16*)sg.xx_out + (size_t)b * sg.I))[c] = xx4;
        if (sg.in_act == 5) {
            xs[idx] = xx4;
            continue;
        }
        float pv[8], mu[8], o[8];
        unpack8<S>(((const uint4*)((const u16*)sg.shift + (size_t)b * sg.I))[c], pv);
        unpack8<S>(((const uint4*)sg.mix)[c], mu);
#pragma unroll
        for (int e = 0; e < 8; ++e)
            o[e] = sg.in_act == 3 ? xx[e] + (pv[e] - xx[e]) * mu[e] : pv[e] + (xx[e] - pv[e]) * mu[e];
        xs[idx] = make_uint4(pack2<S>(o[0], o[1]), pack2<S>(o[2], o[3]), pack2<S>(o[4], o[5]), pack2<S>(o[6], o[7]));
    }
    __syncthreads();
}

// grid: sum over segments of ceil(O / (WARPS * RW)) blocks; block: WARPS * 32 threads;
// dynamic shared memory: B * max(I) * 2 bytes.
template <class S, int B>
__device__ void gemv_impl(const GemvParams& p) {
    extern __shared__ uint4 xs[];  // [B][I / 8] chunks of 8 values
    const int blk = blockIdx.x;
    Seg sg = p.seg[0];
#pragma unroll
    for (int i = 1; i < MAX_SEG; ++i)
        if (i < p.n_seg && blk >= p.seg[i].block_start) sg = p.seg[i];
    const int nchunk = sg.I >> 3;

    // stage the input (x, its activation, or LN + token shift of the residual) in shared memory
    for (int idx = threadIdx.x; idx < B * nchunk; idx += blockDim.x) {
        const int b = idx / nchunk, c = idx - b * nchunk;
        uint4 v = *((const uint4*)((const u16*)sg.x + (size_t)b * sg.x_stride) + c);
        if (sg.in_act == 1 || sg.in_act == 2) {
            float f[8];
            unpack8<S>(v, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = activate(f[e], sg.in_act);
            v = make_uint4(pack2<S>(f[0], f[1]), pack2<S>(f[2], f[3]), pack2<S>(f[4], f[5]), pack2<S>(f[6], f[7]));
        }
        xs[idx] = v;
    }
    __syncthreads();
    if (sg.in_act >= 3) layernorm_mix<S, B>(sg, xs, nchunk, blk == sg.block_start);
    if (sg.copy_n && blk == sg.block_start)
        for (int i = threadIdx.x; i < sg.copy_n; i += blockDim.x) ((u16*)sg.copy_dst)[i] = ((const u16*)sg.copy_src)[i];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o0 = (blk - sg.block_start) * (WARPS * RW) + warp * RW;
    const uint4* Wrow[RW];
    bool ok[RW];
#pragma unroll
    for (int rw = 0; rw < RW; ++rw) {
        ok[rw] = o0 + rw < sg.O;
        Wrow[rw] = (const uint4*)((const u16*)sg.W + (size_t)(ok[rw] ? o0 + rw : 0) * sg.I);
    }
    float acc[RW][B];
#pragma unroll
    for (int rw = 0; rw < RW; ++rw)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[rw][b] = 0.f;

    for (int c0 = lane; c0 < nchunk; c0 += 32 * UNR) {
        uint4 wv[UNR][RW];
#pragma unroll
        for (int u = 0; u < UNR; ++u)
#pragma unroll
            for (int rw = 0; rw < RW; ++rw) {
                const int c = c0 + 32 * u;
                wv[u][rw] = (c < nchunk && ok[rw]) ? load_stream(Wrow[rw] + c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const int c = c0 + 32 * u;
            if (c < nchunk) {
#pragma unroll
                for (int b = 0; b < B; ++b) {
                    float xf[8];
                    unpack8<S>(xs[b * nchunk + c], xf);
#pragma unroll
                    for (int rw = 0; rw < RW; ++rw) {
                        float wf[8];
                        unpack8<S>(wv[u][rw], wf);
                        float s = acc[rw][b];
#pragma unroll
                        for (int e = 0; e < 8; ++e) s = fmaf(wf[e], xf[e], s);
                        acc[rw][b] = s;
                    }
                }
            }
        }
    }

#pragma unroll
    for (int rw = 0; rw < RW; ++rw)
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float v = warp_sum(acc[rw][b]);
            if (lane == rw * B + b && ok[rw]) {  // spread the epilogues over lanes
                const int o = o0 + rw;
                const size_t at = (size_t)b * sg.y_stride + o;
                if (sg.out_act == 1) { v = fmaxf(v, 0.f); v = v * v; }
                else if (sg.out_act == 2) v = sigmoidf_(v);
                if (sg.gate) v *= S::load(((const u16*)sg.gate)[at]);
                if (sg.res) v += S::load(((const u16*)sg.res)[at]);
                v *= sg.scale;
                if (sg.out_f32) ((float*)sg.y)[at] = v;
                else ((u16*)sg.y)[at] = S::store(v);
            }
        }
}

#define GEMV(S, B, NAME) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(const GemvParams p) { gemv_impl<S, B>(p); }
GEMV(F16, 1, gemv_f16_b1)
GEMV(F16, 2, gemv_f16_b2)
GEMV(F16, 3, gemv_f16_b3)
GEMV(F16, 4, gemv_f16_b4)
GEMV(BF16, 1, gemv_bf16_b1)
GEMV(BF16, 2, gemv_bf16_b2)
GEMV(BF16, 3, gemv_bf16_b3)
GEMV(BF16, 4, gemv_bf16_b4)
