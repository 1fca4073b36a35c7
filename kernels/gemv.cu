// Matrix-vector products for decoding: y[b, o] = epilogue(sum_i in(x)[b, i] * W[o, i]) for a few
// sequences (B <= 4), with several independent products ("segments") in one launch.
//
// Decoding one token is a chain of small launches; the products that need only the same earlier
// result (RWKV-7: r, k, v and the four LoRA down-projections) run as one launch, so the GPU sees
// one wide grid instead of seven narrow ones. Weights are [O, I] row-major in fp16 or bf16 and are
// streamed once with 16-byte loads that bypass L1 (`load_stream`); the input is staged in shared
// memory (16-bit), fp32 accumulation.
//
// Input staging `in_act`: 0 x, 1 tanh(x), 2 sigmoid(x), or the LayerNorm of the residual x fused
// with the token shift (rwkv-models.md §6): 3 xx + (p - xx) * mix (v7), 4 p + (xx - p) * mix (v4),
// 5 xx alone; xx = LN(x) rounded to 16 bits, p = shift (the previous token's xx). Every block
// normalises the B rows itself (C values each, from L2), which costs less than a separate launch;
// the segment's first block also writes xx to `xx_out`.
// Epilogue, in this order: out_act (none | relu^2 | sigmoid), times gate[b, o], plus res[b, o],
// times scale; stored as fp32 or 16-bit. `res` may alias `y` (in-place residual add).
// Twin: rwkv_cli.cuda.twins.gemv_reference.
//
// Work split (chosen per segment by the host, rwkv_cli/cuda/kops.py gemv_plan): a block of
// WARPS warps covers a tile of rows; each warp takes RW rows, and `ks` warps share each row pair,
// each summing every ks-th 512-byte piece of the rows (a tile is WARPS / ks * RW rows; partial
// sums meet in shared memory), so narrow products still fill the GPU. A segment's `n_blocks`
// blocks stride over its tiles: one wave of blocks (MINB per multiprocessor), each staging its
// input once for all its tiles.
// Latency: a block requests its first weights before anything else (they depend on nothing),
// then every input byte at once (cp.async into shared memory), and keeps the next step's weights
// in flight while it finishes a tile. Launched as a programmatic dependent launch (sm_90+, see
// rwkv_cli/cuda/loader.py), the weight requests overlap the end of the previous kernel: the
// block waits for that kernel (griddepcontrol.wait) only before it reads its input or writes.
// Inputs are read through L2 only (cp.async.cg, ld.cg).
#include "common.cuh"

#define MAX_SEG 8
#define WARPS 8
#define RW 2       // rows per warp
#define UNR 4      // 16-byte chunks per lane and row in one step
#define MINB 2     // blocks per multiprocessor the registers must allow (kops.GEMV_BLOCKS_PER_SM)

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
    int O, I, x_stride, y_stride;
    int in_act;        // 0 none, 1 tanh, 2 sigmoid, 3 LN + mix (v7), 4 LN + mix (v4), 5 LN
    int out_act;       // 0 none, 1 relu^2, 2 sigmoid
    int out_f32;       // y is fp32
    float scale;
    int block_start;   // first block of this segment
    int n_blocks;      // its blocks (at most its tiles): block j takes tiles j, j + n_blocks, ...
    int ks;            // warps per row pair (1, 2, 4 or 8): a tile is WARPS / ks * RW rows
    int pad_;
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

template <class S>
__device__ __forceinline__ uint4 pack8(const float* f) {
    return make_uint4(pack2<S>(f[0], f[1]), pack2<S>(f[2], f[3]), pack2<S>(f[4], f[5]), pack2<S>(f[6], f[7]));
}

// load_stream (common.cuh) under a predicate, zeros where it is false (no branch around the load)
__device__ __forceinline__ uint4 load_stream_if(const void* p, bool pred) {
    uint4 v = make_uint4(0, 0, 0, 0);
    asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %5, 0;\n\t"
                 "@q ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n\t}"
                 : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w) : "l"(p), "r"((int)pred));
    return v;
}

// Inputs (x, res, gate, shift, LayerNorm vectors) are read through L2 only: every block reads
// the same few kilobytes, just written by the previous kernel, so L1 would not help, and with a
// programmatic dependent launch no L1 line of them can predate the previous kernel's writes.
__device__ __forceinline__ u16 load_cg_u16(const void* p) {
    u16 v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ float activate(float v, int act) {
    if (act == 1) return tanhf(v);
    if (act == 2) return sigmoidf_(v);
    return v;
}

// Stage in(x) [B][I/8 chunks] in shared memory: x, its activation, or xx = LN(x) (eps 1e-5,
// biased variance, fp32, two passes, rounded to 16 bits like torch's layer_norm) followed by the
// token-shift mix with p = shift. stage_issue puts every global read (x, and for LN shift,
// weight, bias, mix, each into its own area after xs; kops.gemv_smem_bytes) in flight at once
// with cp.async; stage_finish waits for them and computes, each thread on the chunks
// c = tid (mod blockDim) it copied itself. Ends synced.
template <int B>
__device__ __forceinline__ void stage_issue(const Seg& sg, uint4* xs, int nchunk) {
    const int act = sg.in_act;
    const bool ln = act >= 3, mixed = act == 3 || act == 4;
    uint4* const sh = xs + B * nchunk;                    // shift [B][nchunk] (in_act 3, 4)
    uint4* const par = sh + (mixed ? B * nchunk : 0);     // ln_w, ln_b, mix [nchunk] each
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
#pragma unroll
        for (int b = 0; b < B; ++b) copy16(xs + b * nchunk + c, (const uint4*)((const u16*)sg.x + (size_t)b * sg.x_stride) + c);
        if (ln) {
            copy16(par + c, (const uint4*)sg.ln_w + c);
            copy16(par + nchunk + c, (const uint4*)sg.ln_b + c);
        }
        if (mixed) {
            copy16(par + 2 * nchunk + c, (const uint4*)sg.mix + c);
#pragma unroll
            for (int b = 0; b < B; ++b) copy16(sh + b * nchunk + c, (const uint4*)((const u16*)sg.shift + (size_t)b * sg.I) + c);
        }
    }
}

// fn(b, f) on this thread's 8-value pieces f of every staged row b (fn may change f in place:
// with WRITE, the pieces are stored back).
template <class S, int B, bool WRITE, class F>
__device__ __forceinline__ void each_staged(uint4* xs, int nchunk, F fn) {
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x)
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float f[8];
            unpack8<S>(xs[b * nchunk + c], f);
            fn(b, f);
            if (WRITE) xs[b * nchunk + c] = pack8<S>(f);
        }
}

// For each staged row b: the block's sum over the row's values of x (SQUARE false) or of
// (x - center[b])^2. `red` is shared scratch [WARPS][B]; ends synced.
template <class S, int B, bool SQUARE>
__device__ __forceinline__ void row_sums(uint4* xs, int nchunk, const float* center, float (*red)[B], float* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float sum[B];
#pragma unroll
    for (int b = 0; b < B; ++b) sum[b] = 0.f;
    each_staged<S, B, false>(xs, nchunk, [&](int b, float* f) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float d = SQUARE ? f[e] - center[b] : f[e];
            sum[b] += SQUARE ? d * d : d;
        }
    });
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const float t = warp_sum(sum[b]);
        if (lane == 0) red[warp][b] = t;
    }
    __syncthreads();
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) t += red[w][b];
        out[b] = t;
    }
}

template <class S, int B>
__device__ __forceinline__ void stage_finish(const Seg& sg, uint4* xs, int nchunk, bool first_block) {
    __shared__ float red[2][WARPS][B];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int act = sg.in_act;
    const bool ln = act >= 3, mixed = act == 3 || act == 4;
    uint4* const sh = xs + B * nchunk;
    uint4* const par = sh + (mixed ? B * nchunk : 0);
    copy_wait();
    if (act == 1 || act == 2)
        each_staged<S, B, true>(xs, nchunk, [&](int, float* f) {
#pragma unroll
            for (int e = 0; e < 8; ++e) f[e] = activate(f[e], act);
        });
    if (!ln) {
        __syncthreads();
        return;
    }
    float mean[B], rstd[B];
    row_sums<S, B, false>(xs, nchunk, mean, red[0], mean);  // two passes over shared memory: mean, variance
#pragma unroll
    for (int b = 0; b < B; ++b) mean[b] /= sg.I;
    row_sums<S, B, true>(xs, nchunk, mean, red[1], rstd);
#pragma unroll
    for (int b = 0; b < B; ++b) rstd[b] = rsqrtf(rstd[b] / sg.I + 1e-5f);
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float w[8], bi[8];
        unpack8<S>(par[c], w);
        unpack8<S>(par[nchunk + c], bi);
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float f[8], xx[8];
            unpack8<S>(xs[b * nchunk + c], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) xx[e] = S::load(S::store((f[e] - mean[b]) * rstd[b] * w[e] + bi[e]));
            const uint4 xx4 = pack8<S>(xx);
            if (first_block && sg.xx_out) ((uint4*)((u16*)sg.xx_out + (size_t)b * sg.I))[c] = xx4;
            if (!mixed) {
                xs[b * nchunk + c] = xx4;
                continue;
            }
            float pv[8], mu[8], o[8];
            unpack8<S>(sh[b * nchunk + c], pv);
            unpack8<S>(par[2 * nchunk + c], mu);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                o[e] = act == 3 ? xx[e] + (pv[e] - xx[e]) * mu[e] : pv[e] + (xx[e] - pv[e]) * mu[e];
            xs[b * nchunk + c] = pack8<S>(o);
        }
    }
    __syncthreads();
}

// grid: sum over segments of n_blocks; block: WARPS * 32 threads;
// dynamic shared memory: the largest staging area of the segments (kops.gemv_smem_bytes).
template <class S, int B>
__device__ __forceinline__ void gemv_impl(const GemvParams& p) {
    extern __shared__ uint4 xs[];  // [B][I / 8] chunks of 8 values, then stage_issue's areas
    __shared__ float part[2][WARPS][RW * B];  // partial sums of the K-split warps, by tile parity
    const int blk = blockIdx.x;
    // The next launch may place its blocks as ours retire: they only fetch weights until our
    // grid is complete (grid_dependency_wait below).
    launch_dependents();
    int si = 0;
#pragma unroll
    for (int i = 1; i < MAX_SEG; ++i)
        if (i < p.n_seg && blk >= p.seg[i].block_start) si = i;
    const Seg& sg = p.seg[si];  // read from the parameter bank as needed

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int ks = sg.ks, nb = sg.n_blocks, j = blk - sg.block_start;
    const int grp = warp / ks, ksl = warp - grp * ks;  // row pair within the tile, K slice
    const int rows = (WARPS / ks) * RW;
    const int nchunk = sg.I >> 3;
    const int nsteps = (nchunk + 32 * UNR * ks - 1) / (32 * UNR * ks);  // steps per tile
    const int ntiles = (sg.O + rows - 1) / rows;
    const int steps = j < ntiles ? (ntiles - j + nb - 1) / nb * nsteps : 0;  // same for every warp
    const u16* W = (const u16*)sg.W;

    // step `it` of tile t: the lane loads chunks ((it * UNR + u) * ks + ksl) * 32 + lane of rows
    // t * rows + grp * RW + rw
    auto load = [&](uint4 (&w)[UNR][RW], int t, int it) {
        const int o0 = t * rows + grp * RW;
#pragma unroll
        for (int u = 0; u < UNR; ++u)
#pragma unroll
            for (int rw = 0; rw < RW; ++rw) {
                const int c = ((it * UNR + u) * ks + ksl) * 32 + lane;
                w[u][rw] = load_stream_if((const uint4*)(W + (size_t)(o0 + rw) * sg.I) + c, c < nchunk && o0 + rw < sg.O);
            }
    };
    // the epilogue's operands: lane rw * B + b of the first K slice finishes (row rw, sequence b)
    const bool ep_lane = ksl == 0 && lane < RW * B;
    const int ep_rw = lane / B, ep_b = lane - (lane / B) * B;
    u16 ep_gate = 0, ep_res = 0;
    auto load_ep = [&](int t) {
        const int o = t * rows + grp * RW + ep_rw;
        if (ep_lane && o < sg.O) {
            const size_t at = (size_t)ep_b * sg.y_stride + o;
            if (sg.gate) ep_gate = load_cg_u16((const u16*)sg.gate + at);
            if (sg.res) ep_res = load_cg_u16((const u16*)sg.res + at);
        }
    };

    float acc[RW][B];
#pragma unroll
    for (int rw = 0; rw < RW; ++rw)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[rw][b] = 0.f;
    auto compute = [&](const uint4 (&w)[UNR][RW], int it) {
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const int c = ((it * UNR + u) * ks + ksl) * 32 + lane;
            if (c < nchunk) {
#pragma unroll
                for (int b = 0; b < B; ++b) {
                    float xf[8];
                    unpack8<S>(xs[b * nchunk + c], xf);
#pragma unroll
                    for (int rw = 0; rw < RW; ++rw) {
                        float wf[8];
                        unpack8<S>(w[u][rw], wf);
                        float s = acc[rw][b];
#pragma unroll
                        for (int e = 0; e < 8; ++e) s = fmaf(wf[e], xf[e], s);
                        acc[rw][b] = s;
                    }
                }
            }
        }
    };
    int parity = 0;
    auto finish = [&](int t) {
        float v = 0.f;
#pragma unroll
        for (int rw = 0; rw < RW; ++rw)
#pragma unroll
            for (int b = 0; b < B; ++b) {
                const float s = warp_sum(acc[rw][b]);
                if (lane == rw * B + b) v = s;
                acc[rw][b] = 0.f;
            }
        if (ks > 1) {  // uniform over the block
            if (lane < RW * B) part[parity][warp][lane] = v;
            __syncthreads();
            if (ep_lane)
                for (int k = 1; k < ks; ++k) v += part[parity][warp + k][lane];
            parity ^= 1;
        }
        const int o = t * rows + grp * RW + ep_rw;
        if (ep_lane && o < sg.O) {
            const size_t at = (size_t)ep_b * sg.y_stride + o;
            if (sg.out_act == 1) { v = fmaxf(v, 0.f); v = v * v; }
            else if (sg.out_act == 2) v = sigmoidf_(v);
            if (sg.gate) v *= S::load(ep_gate);
            if (sg.res) v += S::load(ep_res);
            v *= sg.scale;
            if (sg.out_f32) ((float*)sg.y)[at] = v;
            else ((u16*)sg.y)[at] = S::store(v);
        }
    };

    // The first step's weights go out before anything else: they depend on nothing.
    uint4 w[UNR][RW];
    int t = j, it = 0;  // the step in w
    if (steps > 0) load(w, t, it);
    // Launched as a programmatic dependent (rwkv_cli/cuda/loader.py), this block may have started
    // before the previous kernel finished: only weights are read above this wait, and nothing is
    // written. A no-op for an ordinary launch.
    grid_dependency_wait();
    stage_issue<B>(sg, xs, nchunk);
    if (steps > 0) load_ep(j);
    stage_finish<S, B>(sg, xs, nchunk, j == 0);

    // compute the step in w, put the next one into w (in flight while the tile is finished)
    for (int s = 0; s < steps; ++s) {
        const int tt = t, ti = it;
        compute(w, ti);
        if (++it == nsteps) { it = 0; t += nb; }
        if (s + 1 < steps) load(w, t, it);
        if (it == 0) {
            finish(tt);
            if (s + 1 < steps) load_ep(t);
        }
    }
}

#define GEMV(S, B, NAME) \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) NAME(const GemvParams p) { gemv_impl<S, B>(p); }
GEMV(F16, 1, gemv_f16_b1)
GEMV(F16, 2, gemv_f16_b2)
GEMV(F16, 3, gemv_f16_b3)
GEMV(F16, 4, gemv_f16_b4)
GEMV(BF16, 1, gemv_bf16_b1)
GEMV(BF16, 2, gemv_bf16_b2)
GEMV(BF16, 3, gemv_bf16_b3)
GEMV(BF16, 4, gemv_bf16_b4)
