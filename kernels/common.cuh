// Shared helpers for the rwkv-cli kernels. Compiled by NVRTC at first use (no CUDA headers are
// needed: 16-bit floats are handled as raw bits with PTX conversions, so only NVRTC itself is
// required on the user's machine).
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

// ---- storage types: F16, BF16 (raw 16-bit) and F32, each with load/store through fp32 ----------
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
    static __device__ __forceinline__ u16 store(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
    // the two halves packed in one 32-bit word, low half first (memory order)
    static __device__ __forceinline__ float lo(u32 w) { return load((u16)(w & 0xffffu)); }
    static __device__ __forceinline__ float hi(u32 w) { return load((u16)(w >> 16)); }
};

struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 b) { return __uint_as_float(((u32)b) << 16); }
    static __device__ __forceinline__ u16 store(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
    static __device__ __forceinline__ float lo(u32 w) { return __uint_as_float(w << 16); }
    static __device__ __forceinline__ float hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
};

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};

// A 16-byte load that bypasses L1: weights are streamed once per step.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// 16 bytes global -> shared without registers (cp.async; the kernels need sm_80+ anyway for
// bf16); copy_wait() waits for all of this thread's copies (kernels/rwkv7.cu commits them in
// groups and waits for the older ones instead).
__device__ __forceinline__ void copy16(void* dst, const void* src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Programmatic dependent launch (sm_90+): let the next kernel in the stream start, and wait for
// the previous one (its completion and memory). Both are no-ops for an ordinary launch.
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); `scratch` holds 32 floats.
// Every thread gets the result. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(t);
}
