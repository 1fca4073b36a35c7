// Tiled matrix products on tensor cores for small models' prompts, where cuBLAS's workspace
// (32 MiB a stream on Hopper, allocated at its first call) would be most of the memory a prompt
// needs beyond the weights (v7 0.1B: 0.37 GiB of weights, a 10% budget of 38 MiB):
//     y[z] = x[z] W[z]^T (+ res[z])      x [M, K] (row stride ldx), W [N, K], y and res [M, N] (ldy)
// for z < batches (strides sx, sW, sy). 16-bit inputs, fp32 sums, y in the inputs' type or fp32.
// Bigger models keep cuBLAS, which is faster on their long products.
//
// Block tile 64 x 64, 128 threads (2 x 2 warps of 32 x 32), K in steps of 32 staged in shared
// memory by cp.async, two stages so the next step's loads overlap this one's products. Fragments
// come from ldmatrix: rows are 40 values (80 bytes) apart, so the eight rows an ldmatrix phase
// reads fall in distinct banks. Rows beyond M or N and columns beyond K are zero-filled
// (cp.async with a source size of 0), so any M and N work (an odd N is stored value by value);
// K, ldx and the input strides must be multiples of 8 (16-byte rows), which the launcher checks.
// Twin: x.float() @ W.float().T (+ res) (tests/test_cuda_kernels.py).
#include "common.cuh"

#define GT_M 64
#define GT_N 64
#define GT_K 32
#define GT_ROW 40  // staged row length in 16-bit values (32 + 8 of padding)
// dynamic shared memory of a launch: two stages of A and B tiles, 2 * (64 + 64) * 40 * 2 = 20480 bytes

template <class S> struct MmaTile;
template <> struct MmaTile<F16> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct MmaTile<BF16> {
    static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (the source is then not read)
__device__ __forceinline__ void copy16_or_zero(void* dst, const void* src, bool valid) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

template <class S>
__device__ void gemm_impl(const u16* __restrict__ x, const u16* __restrict__ W, const void* res, void* y,
                          int M, int N, int K, int ldx, long long sx, long long sW, int ldy, long long sy,
                          int out_f32) {
    extern __shared__ uint4 gemm_smem[];  // dynamic: GEMM_SMEM bytes (the loader keeps static use small)
    u16(*As)[GT_M][GT_ROW] = (u16(*)[GT_M][GT_ROW])gemm_smem;                       // [2][GT_M][GT_ROW]
    u16(*Bs)[GT_N][GT_ROW] = (u16(*)[GT_N][GT_ROW])((u16*)gemm_smem + 2 * GT_M * GT_ROW);  // [2][GT_N][GT_ROW]
    const int tiles_m = (M + GT_M - 1) / GT_M, tiles_n = (N + GT_N - 1) / GT_N;
    const int z = blockIdx.x / (tiles_m * tiles_n), tile = blockIdx.x - z * tiles_m * tiles_n;
    const int m0 = (tile / tiles_n) * GT_M, n0 = (tile % tiles_n) * GT_N;
    x += z * sx;
    W += z * sW;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;

    // each thread stages two 16-byte pieces of A and two of B per step: (row, 8-column part)
    auto stage = [&](int kt, int buf) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int idx = threadIdx.x + 128 * e, row = idx >> 2, col = (idx & 3) * 8, k = kt * GT_K + col;
            const bool ka = k < K;
            const int ra = m0 + row, rb = n0 + row;
            copy16_or_zero(&As[buf][row][col], x + (size_t)(ra < M ? ra : 0) * ldx + (ka ? k : 0), ka && ra < M);
            copy16_or_zero(&Bs[buf][row][col], W + (size_t)(rb < N ? rb : 0) * K + (ka ? k : 0), ka && rb < N);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    float acc[2][4][4] = {};
    const int steps = (K + GT_K - 1) / GT_K;
    stage(0, 0);
    for (int kt = 0; kt < steps; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < steps) {
            stage(kt + 1, buf ^ 1);
            asm volatile("cp.async.wait_group 1;" ::: "memory");  // step kt has landed
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GT_K; kk += 16) {
            u32 a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i)  // rows wm + 16i + (lane % 16), columns kk + 8 (lane / 16)
                ldmatrix_x4(a[i], &As[buf][wm + 16 * i + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
            for (int j = 0; j < 4; j += 2) {  // two 8-column tiles: rows of W n, columns kk and kk + 8
                u32 r[4];
                ldmatrix_x4(r, &Bs[buf][wn + 8 * j + (lane >> 4) * 8 + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
                b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) MmaTile<S>::run(acc[i][j], a[i], b[j][0], b[j][1]);
        }
        __syncthreads();  // this buffer is staged again two steps on
    }

    // acc[i][j]: rows wm + 16i + lane / 4 (+ 8), columns wn + 8j + 2 (lane % 4) (+ 1)
    const size_t zy = (size_t)z * sy;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm + 16 * i + (lane >> 2) + 8 * h;
            if (row >= M) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = n0 + wn + 8 * j + 2 * (lane & 3);
                if (col >= N) continue;
                float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
                const size_t at = zy + (size_t)row * ldy + col;
                if (!(ldy & 1) && col + 1 < N) {  // both values, one aligned pair
                    if (out_f32) {
                        if (res) { const float2 r = *(const float2*)((const float*)res + at); v0 += r.x; v1 += r.y; }
                        *(float2*)((float*)y + at) = make_float2(v0, v1);
                    } else {
                        if (res) { const u32 r = *(const u32*)((const u16*)res + at); v0 += S::lo(r); v1 += S::hi(r); }
                        *(u32*)((u16*)y + at) = (u32)S::store(v0) | ((u32)S::store(v1) << 16);
                    }
                } else {  // an odd row length (a vocabulary of 50277): one value at a time
                    for (int e = 0; e < 2 && col + e < N; ++e) {
                        float v = e ? v1 : v0;
                        if (out_f32) {
                            if (res) v += ((const float*)res)[at + e];
                            ((float*)y)[at + e] = v;
                        } else {
                            if (res) v += S::load(((const u16*)res)[at + e]);
                            ((u16*)y)[at + e] = S::store(v);
                        }
                    }
                }
            }
        }
}

#define GEMM(S, SUF)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) gemm_##SUF(                                         \
        const u16* x, const u16* W, const void* res, void* y, int M, int N, int K, int ldx, long long sx, \
        long long sW, int ldy, long long sy, int out_f32) {                                                \
        gemm_impl<S>(x, W, res, y, M, N, K, ldx, sx, sW, ldy, sy, out_f32);                               \
    }
GEMM(F16, f16)
GEMM(BF16, bf16)
