// trtwsi kernels: shared device helpers.
//
// Inlined into every kernel family by trtwsi/ops/cuda.py (the `#include "common.cuh"` line of a
// .cu file is replaced with this text), so the compiled source is self-contained: no include
// path, no system header, and CuPy's kernel cache sees every change.
//
// Exactness. The kernels must reproduce trtwsi/ops/reference.py (torch on the CPU) bit for bit.
// CuPy compiles with `-ftz=true` (flush fp32 subnormals) and NVCC/NVRTC contract a*b+c into FMA
// unless told otherwise, and both would change results at the last bit. So every fp32 operation
// whose rounding matters goes through the inline-PTX helpers below: `add.rn.f32`, `mul.rn.f32`,
// `div.rn.f32`, `setp.*.f32` and `cvt` written without `.ftz` are IEEE-754 round-to-nearest with
// subnormals, whatever the compile flags, and an asm statement is never fused. fp64 uses the
// __d*_rn intrinsics (never contracted; -ftz does not apply to fp64). The loader also passes
// `--fmad=false` as a second line of defence.

#ifndef TRTWSI_COMMON_CUH
#define TRTWSI_COMMON_CUH

typedef unsigned long long u64;

// ------------------------------------------------------------------------------------------
// fp32 arithmetic and comparisons, IEEE round-to-nearest-even, subnormals kept, never fused
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ float f_add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float f_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float f_mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float f_div(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
// a > b (false when either is NaN), subnormals compared exactly
__device__ __forceinline__ bool f_gt(float a, float b) {
    unsigned int r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r) : "f"(a), "f"(b));
    return r != 0u;
}
__device__ __forceinline__ bool f_lt(float a, float b) { return f_gt(b, a); }
__device__ __forceinline__ bool f_isnan(float a) {
    unsigned int r;
    asm("{\n\t.reg .pred p;\n\tsetp.nan.f32 p, %1, %1;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r) : "f"(a));
    return r != 0u;
}
__device__ __forceinline__ float f_nan() { return __int_as_float(0x7fffffff); }
// torch.minimum / torch.maximum: NaN if either operand is NaN
__device__ __forceinline__ float f_min(float a, float b) {
    if (f_isnan(a) || f_isnan(b)) return f_nan();
    return f_lt(b, a) ? b : a;
}
__device__ __forceinline__ float f_max(float a, float b) {
    if (f_isnan(a) || f_isnan(b)) return f_nan();
    return f_gt(b, a) ? b : a;
}
// torch clamp(min=0): negative -> 0, NaN stays NaN
__device__ __forceinline__ float f_clamp0(float a) { return f_lt(a, 0.0f) ? 0.0f : a; }

// ------------------------------------------------------------------------------------------
// conversions (exact or round-to-nearest-even, no flush)
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ double f2d(float a) {
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float d2f(double a) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
    return r;
}
// IEEE binary16 bits <-> fp32 (torch.half semantics: round to nearest even, exact upcast)
__device__ __forceinline__ float h2f(unsigned short h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}
__device__ __forceinline__ unsigned short f2h(float a) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(a));
    return r;
}

// Load element i of a float32 or float16 (raw bits) array as fp32.
__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const unsigned short* p, long long i) { return h2f(p[i]); }

// Store fp32 v as float32 or float16 (round to nearest even).
__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(unsigned short* p, long long i, float v) { p[i] = f2h(v); }

// ------------------------------------------------------------------------------------------
// fp64, never contracted
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ double d_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double d_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double d_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double d_div(double a, double b) { return __ddiv_rn(a, b); }
// torch clamp(lo, hi) on float64 (lo <= hi): NaN stays NaN
__device__ __forceinline__ double d_clamp(double a, double lo, double hi) {
    return a < lo ? lo : (a > hi ? hi : a);
}

// ------------------------------------------------------------------------------------------
// block-wide helpers
// ------------------------------------------------------------------------------------------
// Lanes of this warp below the calling lane.
__device__ __forceinline__ unsigned int lanemask_lt() {
    return (1u << (threadIdx.x & 31u)) - 1u;
}

// Ordered stream compaction inside one block (blockDim.x a multiple of 32, <= 1024).
// Every thread of the block must call it. Returns the rank of this thread among the threads
// with flag set (in thread order) and writes the block total to *total. s_warp: shared
// scratch of blockDim.x / 32 ints. Ends with a __syncthreads(), so s_warp may be reused after.
__device__ __forceinline__ int block_rank(bool flag, int* s_warp, int* total) {
    const unsigned int ballot = __ballot_sync(0xffffffffu, flag);
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if ((threadIdx.x & 31u) == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < nwarps; ++w) {
        const int c = s_warp[w];
        before += w < warp ? c : 0;
        all += c;
    }
    __syncthreads();
    *total = all;
    return before + __popc(ballot & lanemask_lt());
}

#endif  // TRTWSI_COMMON_CUH
