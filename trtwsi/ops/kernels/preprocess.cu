// trtwsi kernels: preprocess family.
//
// Crop B tiles out of uint8 RGB HWC chunk(s) already on the device, bilinear-resize each to the
// letterboxed size, pad with grey, scale to [0, 1] and write float32 or float16: exactly
// trtwsi.ops.reference.preprocess, one launch for the whole batch. The output is NCHW
// (pix_stride 1, chan_stride dst*dst) or NHWC, i.e. a torch channels_last (B, 3, dst, dst)
// tensor (pix_stride 3, chan_stride 1), which a channels_last model reads without a copy.
//
// Launch: grid (ceil(dst * dst / 256), B), block 256; one thread per output pixel of one tile,
// writing its 3 channel values (coalesced per plane for NCHW, 3 adjacent values for NHWC).
// No shared memory.

#include "common.cuh"

#define PREPROCESS_THREADS 256

// Bilinear sampling along one axis, as reference._source_coords: output index j samples input
// position s = (j + 0.5) * ratio - 0.5 (ratio = n_in / n_out, computed by the host in double),
// clamped to s >= 0; i0 = min(floor(s), n_in - 1), i1 = min(i0 + 1, n_in - 1), and the weight
// of i1 is s - i0 (0 when i1 == i0). All in float64, operation for operation.
__device__ __forceinline__ void source_coord(int j, int n_in, double ratio, int* i0, int* i1,
                                             double* w1) {
    double s = d_sub(d_mul(d_add((double)j, 0.5), ratio), 0.5);
    s = s < 0.0 ? 0.0 : s;
    long long f = (long long)s;  // floor: s >= 0
    if (f > n_in - 1) f = n_in - 1;
    long long g = f + 1;
    if (g > n_in - 1) g = n_in - 1;
    *i0 = (int)f;
    *i1 = (int)g;
    *w1 = g > f ? d_sub(s, (double)f) : 0.0;
}

// T: float (float32 output) or unsigned short (float16 output bits).
template <typename T>
__device__ __forceinline__ void preprocess_impl(
    const unsigned char* __restrict__ src,      // chunk bytes, RGB HWC uint8
    const long long* __restrict__ tile_offsets, // (B,) byte offset of each tile's top-left px
    const long long* __restrict__ row_strides,  // (B,) bytes per chunk row of each tile
    int th, int tw,                             // tile size (chunk px)
    int dst,                                    // model input side (input px)
    int pad_x, int pad_y, int new_w, int new_h, // letterbox (input px)
    double ratio_y, double ratio_x,             // th / new_h, tw / new_w (host float64)
    float pad_value,                            // grey level, 0..255
    int pix_stride, int chan_stride,            // NCHW: 1, dst*dst; NHWC: 3, 1
    T* __restrict__ out)                        // (B, 3, dst, dst): 3*dst*dst per tile
{
    const int b = blockIdx.y;
    const int plane = dst * dst;  // < 2^31: the host checks dst <= 46340
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= plane) return;
    const int y = p / dst;  // 32-bit division (64-bit would dominate this kernel)
    const int x = p - y * dst;
    T* o = out + (long long)b * 3 * plane + (long long)p * pix_stride;
    const int oy = y - pad_y, ox = x - pad_x;
    if (oy < 0 || oy >= new_h || ox < 0 || ox >= new_w) {
        const float v = f_div(pad_value, 255.0f);  // reference: full(114.0, fp32) / 255
        store_f(o, 0, v);
        store_f(o, chan_stride, v);
        store_f(o, 2LL * chan_stride, v);
        return;
    }
    int y0, y1, x0, x1;
    double wy, wx;
    source_coord(oy, th, ratio_y, &y0, &y1, &wy);
    source_coord(ox, tw, ratio_x, &x0, &x1, &wx);
    const long long stride = row_strides[b];
    const unsigned char* tile = src + tile_offsets[b];
    const unsigned char* top = tile + (long long)y0 * stride;
    const unsigned char* bot = tile + (long long)y1 * stride;
    const int cx0 = 3 * x0, cx1 = 3 * x1;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        const double tl = (double)top[cx0 + c], tr = (double)top[cx1 + c];
        const double bl = (double)bot[cx0 + c], br = (double)bot[cx1 + c];
        // vertical blend, then horizontal: a + (b - a) * w, each op rounded (no FMA)
        const double left = d_add(tl, d_mul(d_sub(bl, tl), wy));
        const double right = d_add(tr, d_mul(d_sub(br, tr), wy));
        const double v = d_add(left, d_mul(d_sub(right, left), wx));
        // reference: (fp32 value) / 255 in fp32
        store_f(o, (long long)c * chan_stride, f_div(d2f(v), 255.0f));
    }
}

#define PREPROCESS_ARGS                                                                        \
    const unsigned char* __restrict__ src, const long long* __restrict__ tile_offsets,         \
        const long long* __restrict__ row_strides, int th, int tw, int dst, int pad_x,         \
        int pad_y, int new_w, int new_h, double ratio_y, double ratio_x, float pad_value,    \
        int pix_stride, int chan_stride

extern "C" __global__ void __launch_bounds__(PREPROCESS_THREADS)
    preprocess_f32(PREPROCESS_ARGS, float* __restrict__ out) {
    preprocess_impl<float>(src, tile_offsets, row_strides, th, tw, dst, pad_x, pad_y, new_w,
                           new_h, ratio_y, ratio_x, pad_value, pix_stride, chan_stride, out);
}

extern "C" __global__ void __launch_bounds__(PREPROCESS_THREADS)
    preprocess_f16(PREPROCESS_ARGS, unsigned short* __restrict__ out) {
    preprocess_impl<unsigned short>(src, tile_offsets, row_strides, th, tw, dst, pad_x, pad_y,
                                    new_w, new_h, ratio_y, ratio_x, pad_value, pix_stride, chan_stride, out);
}
