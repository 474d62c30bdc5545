// trtwsi kernels: postprocess family (decode, NMS, tile -> level-0 mapping).
//
// Exactly trtwsi.ops.reference.postprocess + scale_to_slide for a whole batch of tiles:
//
//   head "nms" (YOLOv8/11, raw (B, 4 + nc, N)), two launches after a memset of cand_count:
//     decode_<f32|f16>  grid (ceil(N / 256), n_valid), block 256: one thread per anchor; max
//                       class score (first max on ties; a NaN score drops the anchor), strict
//                       score > conf in fp32, xywh -> xyxy in fp32. A kept anchor writes its box,
//                       score and class at its anchor index and appends one 64-bit sort key
//                       (descending score, then ascending anchor) to its tile's key list
//                       (warp-aggregated atomicAdd; slot order is arbitrary, the sort fixes it).
//     nms_scale         grid (B), block 512: one block per tile. Sorts the tile's keys (bitonic:
//                       in shared memory up to 4096 keys, beyond that in global memory with the
//                       inner stages in shared memory), then greedy class-aware NMS over the
//                       ranking in chunks of 512 candidates: each candidate is tested against
//                       the boxes kept so far (in parallel), the survivors of a chunk are then
//                       resolved in rank order (one candidate per step, in parallel against the
//                       rest of the chunk). Stops at max_det kept. Writes the kept boxes mapped
//                       to level-0 px (float64) in rank order and the per-tile count.
//   head "end2end" (YOLOv10/26, raw (B, K, 6)), one launch:
//     end2end_<f32|f16> grid (B), block 256: rows with score > conf, first max_det in order,
//                       mapped to level-0 px.
//
// Tiles b >= n_valid (batch padding) get count 0 and do no work.
//
// Scratch (allocated by the host wrapper, per call):
//   cand_count (B,) u32 zeroed; keys (B, n_pad) u64, n_pad = next power of two >= N;
//   boxes (B, N) float4; scores (B, N) f32; classes (B, N) i32; kept (B, max_det) i32.

#include "common.cuh"

#define DECODE_THREADS 256
#define NMS_THREADS 512
#define SORT_CAP 4096
#define E2E_THREADS 256

// ------------------------------------------------------------------------------------------
// shared pieces
// ------------------------------------------------------------------------------------------

// Sort key of a candidate: ascending key order == descending score, ties by ascending anchor
// (the reference's stable sort of the anchor-ordered candidates). Scores are never NaN here.
__device__ __forceinline__ u64 candidate_key(float score, unsigned int anchor) {
    unsigned int bits = __float_as_uint(score);
    if ((bits & 0x7fffffffu) == 0u) bits = 0u;  // -0 ties with +0, as in torch.sort
    // monotone map float -> uint (ascending with the score), then reversed for descending
    const unsigned int ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((u64)(~ordered) << 32) | (u64)anchor;
}

// IoU of two xyxy boxes > thr, operation for operation as reference.box_iou_pairs (fp32),
// compared in float64 against the float64 threshold. NaN IoU (zero union) never suppresses.
// Symmetric in (a, b) bit for bit.
__device__ __forceinline__ bool iou_gt(float4 a, float4 b, double thr) {
    const float area_a = f_mul(f_sub(a.z, a.x), f_sub(a.w, a.y));
    const float area_b = f_mul(f_sub(b.z, b.x), f_sub(b.w, b.y));
    const float w = f_clamp0(f_sub(f_min(a.z, b.z), f_max(a.x, b.x)));
    const float h = f_clamp0(f_sub(f_min(a.w, b.w), f_max(a.y, b.y)));
    const float inter = f_mul(w, h);
    const float iou = f_div(inter, f_sub(f_add(area_a, area_b), inter));
    return f2d(iou) > thr;
}

// Input px -> level-0 px, as reference.scale_to_slide (float64): clip to the letterboxed
// content [pad, hi], undo the letterbox gain, scale by level-0 px per tile px, add the origin.
struct Mapping {
    double pad_x, pad_y, hi_x, hi_y, gx, gy, sx, sy, x0, y0;
};

__device__ __forceinline__ double map_x(float v, const Mapping& m) {
    const double u = d_div(d_sub(d_clamp(f2d(v), m.pad_x, m.hi_x), m.pad_x), m.gx);
    return d_add(m.x0, d_mul(u, m.sx));
}
__device__ __forceinline__ double map_y(float v, const Mapping& m) {
    const double u = d_div(d_sub(d_clamp(f2d(v), m.pad_y, m.hi_y), m.pad_y), m.gy);
    return d_add(m.y0, d_mul(u, m.sy));
}

// One output row (x1, y1, x2, y2, score, class_id), float64, level-0 px.
__device__ __forceinline__ void write_det(double* row, float4 box, double score, double cls,
                                          const Mapping& m) {
    row[0] = map_x(box.x, m);
    row[1] = map_y(box.y, m);
    row[2] = map_x(box.z, m);
    row[3] = map_y(box.w, m);
    row[4] = score;
    row[5] = cls;
}

#define MAPPING_ARGS                                                                           \
    const double *__restrict__ tile_origins, double pad_x, double pad_y, double hi_x,          \
        double hi_y, double gx, double gy, double sx, double sy

__device__ __forceinline__ Mapping make_mapping(const double* tile_origins, int b, double pad_x,
                                                double pad_y, double hi_x, double hi_y,
                                                double gx, double gy, double sx, double sy) {
    Mapping m;
    m.pad_x = pad_x;
    m.pad_y = pad_y;
    m.hi_x = hi_x;
    m.hi_y = hi_y;
    m.gx = gx;
    m.gy = gy;
    m.sx = sx;
    m.sy = sy;
    m.x0 = tile_origins[2 * b];
    m.y0 = tile_origins[2 * b + 1];
    return m;
}

// ------------------------------------------------------------------------------------------
// decode ("nms" head)
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void decode_impl(
    const T* __restrict__ raw,          // (B, 4 + nc, N) contiguous
    int nc, int N, float conf,          // conf already rounded to fp32 (torch compares in fp32)
    unsigned int* __restrict__ cand_count,  // (B,) zeroed before the launch
    u64* __restrict__ keys, int n_pad,  // (B, n_pad)
    float4* __restrict__ boxes,         // (B, N) xyxy input px, written at kept anchors
    float* __restrict__ scores,         // (B, N)
    int* __restrict__ classes)          // (B, N)
{
    const int b = blockIdx.y;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const T* r = raw + (long long)b * (4 + nc) * N;
    bool keep = false;
    float best = 0.0f;
    int cls = 0;
    if (n < N) {
        best = load_f(r, 4LL * N + n);
        bool nan = f_isnan(best);
        for (int c = 1; c < nc; ++c) {
            const float v = load_f(r, (long long)(4 + c) * N + n);
            if (f_isnan(v)) {
                nan = true;  // torch.max propagates NaN: score NaN, never > conf
            } else if (f_gt(v, best)) {  // strict: the first maximum wins ties
                best = v;
                cls = c;
            }
        }
        keep = !nan && f_gt(best, conf);
    }
    // every lane of the warp reaches the ballot (no early return above)
    const unsigned int ballot = __ballot_sync(0xffffffffu, keep);
    if (ballot == 0u) return;  // uniform across the warp
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(ballot) - 1;
    unsigned int base = 0u;
    if (lane == leader) base = atomicAdd(cand_count + b, (unsigned int)__popc(ballot));
    base = __shfl_sync(0xffffffffu, base, leader);
    if (!keep) return;
    const unsigned int slot = base + (unsigned int)__popc(ballot & lanemask_lt());
    keys[(long long)b * n_pad + slot] = candidate_key(best, (unsigned int)n);
    const float x = load_f(r, n), y = load_f(r, (long long)N + n);
    const float hw = f_div(load_f(r, 2LL * N + n), 2.0f);
    const float hh = f_div(load_f(r, 3LL * N + n), 2.0f);
    const long long o = (long long)b * N + n;
    boxes[o] = make_float4(f_sub(x, hw), f_sub(y, hh), f_add(x, hw), f_add(y, hh));
    scores[o] = best;
    classes[o] = cls;
}

#define DECODE_ARGS                                                                            \
    int nc, int N, float conf, unsigned int *__restrict__ cand_count, u64 *__restrict__ keys,  \
        int n_pad, float4 *__restrict__ boxes, float *__restrict__ scores,                     \
        int *__restrict__ classes

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
    decode_f32(const float* __restrict__ raw, DECODE_ARGS) {
    decode_impl<float>(raw, nc, N, conf, cand_count, keys, n_pad, boxes, scores, classes);
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
    decode_f16(const unsigned short* __restrict__ raw, DECODE_ARGS) {
    decode_impl<unsigned short>(raw, nc, N, conf, cand_count, keys, n_pad, boxes, scores,
                                classes);
}

// ------------------------------------------------------------------------------------------
// sort (one block per tile)
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void compare_exchange(u64* a, int i, int j, bool ascending) {
    const u64 x = a[i], y = a[j];
    if ((x > y) == ascending) {
        a[i] = y;
        a[j] = x;
    }
}

// Bitonic stages k (sequence size) and j (distance) from j_hi down to 1 on one segment of seg
// keys held in shared memory s, whose first element is element `base` of the whole array (the
// direction of a pair depends on its global index).
__device__ __forceinline__ void bitonic_steps_shared(u64* s, int seg, int base, int k, int j_hi) {
    for (int j = j_hi; j > 0; j >>= 1) {
        for (int t = threadIdx.x; t < seg; t += blockDim.x) {
            const int q = t ^ j;
            if (q > t) compare_exchange(s, t, q, ((base + t) & k) == 0);
        }
        __syncthreads();
    }
}

// Sort g[0, P) ascending in place, P a power of two; entries at index >= M are taken as
// padding (~0, larger than every key) and written as such. Every thread of the block calls it.
// s: shared scratch of SORT_CAP keys. Ends with __syncthreads(); the result is in g.
__device__ void block_sort(u64* g, int M, int P, u64* s) {
    const int seg = P < SORT_CAP ? P : SORT_CAP;
    // Phase 1: the whole network for k <= seg runs inside each seg-aligned segment.
    for (int base = 0; base < P; base += seg) {
        for (int t = threadIdx.x; t < seg; t += blockDim.x) {
            const int i = base + t;
            s[t] = i < M ? g[i] : ~0ull;
        }
        __syncthreads();
        for (int k = 2; k <= seg; k <<= 1) bitonic_steps_shared(s, seg, base, k, k >> 1);
        for (int t = threadIdx.x; t < seg; t += blockDim.x) g[base + t] = s[t];
        __syncthreads();
    }
    // Phase 2 (P > SORT_CAP only): for each larger k, the distances >= seg in global memory,
    // then the distances < seg segment by segment in shared memory.
    for (int k = seg << 1; k <= P; k <<= 1) {
        for (int j = k >> 1; j >= seg; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += blockDim.x) {
                const int q = i ^ j;
                if (q > i) compare_exchange(g, i, q, (i & k) == 0);
            }
            __syncthreads();
        }
        for (int base = 0; base < P; base += seg) {
            for (int t = threadIdx.x; t < seg; t += blockDim.x) s[t] = g[base + t];
            __syncthreads();
            bitonic_steps_shared(s, seg, base, k, seg >> 1);
            for (int t = threadIdx.x; t < seg; t += blockDim.x) g[base + t] = s[t];
            __syncthreads();
        }
    }
}

// ------------------------------------------------------------------------------------------
// NMS + mapping ("nms" head)
// ------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NMS_THREADS) nms_scale(
    const unsigned int* __restrict__ cand_count,  // (B,) from decode
    u64* __restrict__ keys, int n_pad,            // (B, n_pad), sorted in place
    const float4* __restrict__ boxes,             // (B, N)
    const float* __restrict__ scores,             // (B, N)
    const int* __restrict__ classes,              // (B, N)
    int N, double iou_thr, int max_det,
    int* __restrict__ kept,                       // (B, max_det) scratch: kept anchors
    MAPPING_ARGS,
    double* __restrict__ dets,                    // (B, max_det, 6) level-0 px
    int* __restrict__ counts,                     // (B,)
    int n_valid)
{
    __shared__ __align__(16) u64 s_mem[SORT_CAP];
    const int b = blockIdx.x, tid = threadIdx.x;
    int M = b < n_valid && max_det > 0 ? (int)cand_count[b] : 0;
    if (M > N) M = N;
    if (M == 0) {  // uniform across the block
        if (tid == 0) counts[b] = 0;
        return;
    }
    u64* k = keys + (long long)b * n_pad;
    int P = 1;
    while (P < M) P <<= 1;
    block_sort(k, M, P, s_mem);

    // The sort is done (and ended with a barrier): reuse its shared memory for the NMS.
    float4* s_box = reinterpret_cast<float4*>(s_mem);     // NMS_THREADS
    int* s_cls = reinterpret_cast<int*>(s_box + NMS_THREADS);  // NMS_THREADS
    int* s_anchor = s_cls + NMS_THREADS;                  // NMS_THREADS
    int* s_alive = s_anchor + NMS_THREADS;                // NMS_THREADS
    int* s_warp = s_alive + NMS_THREADS;                  // NMS_THREADS / 32

    const float4* bx = boxes + (long long)b * N;
    const int* cl = classes + (long long)b * N;
    int* kp = kept + (long long)b * max_det;
    int nkept = 0;  // the same in every thread
    for (int c0 = 0; c0 < M && nkept < max_det; c0 += NMS_THREADS) {
        // 1. this thread's candidate (rank c0 + tid) against every box kept so far
        const int r = c0 + tid;
        bool alive = r < M;
        int anchor = 0, cls = 0;
        float4 box = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (alive) {
            anchor = (int)(unsigned int)(k[r] & 0xffffffffull);
            box = bx[anchor];
            cls = cl[anchor];
        }
        for (int j = 0; alive && j < nkept; ++j) {
            const int a = kp[j];
            if (cl[a] == cls && iou_gt(bx[a], box, iou_thr)) alive = false;
        }
        // 2. survivors, compacted in rank order
        int n_left;
        const int pos = block_rank(alive, s_warp, &n_left);
        if (alive) {
            s_box[pos] = box;
            s_cls[pos] = cls;
            s_anchor[pos] = anchor;
            s_alive[pos] = 1;
        }
        __syncthreads();
        // 3. greedy among the survivors: when step p comes, survivor p is still alive only if
        //    no kept box suppresses it, so it is kept; it then suppresses the later survivors.
        for (int p = 0; p < n_left; ++p) {
            if (s_alive[p]) {  // read after a barrier, written by no one in this step: uniform
                if (tid == 0) kp[nkept] = s_anchor[p];
                ++nkept;
                if (nkept == max_det) break;
                if (tid > p && tid < n_left && s_alive[tid] && s_cls[tid] == s_cls[p] &&
                    iou_gt(s_box[p], s_box[tid], iou_thr))
                    s_alive[tid] = 0;
                __syncthreads();
            }
        }
        __syncthreads();  // kp and the shared arrays, before the next chunk or the output
    }

    // 4. kept boxes, in rank order, to level-0 px
    const Mapping m = make_mapping(tile_origins, b, pad_x, pad_y, hi_x, hi_y, gx, gy, sx, sy);
    const float* sc = scores + (long long)b * N;
    for (int j = tid; j < nkept; j += NMS_THREADS) {
        const int a = kp[j];
        write_det(dets + ((long long)b * max_det + j) * 6, bx[a], f2d(sc[a]), (double)cl[a], m);
    }
    if (tid == 0) counts[b] = nkept;
}

// ------------------------------------------------------------------------------------------
// end-to-end head: filter, cap, map
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void end2end_impl(
    const T* __restrict__ raw,  // (B, K, 6) contiguous: x1, y1, x2, y2, score, class (input px)
    int K, float conf, int max_det, MAPPING_ARGS, double* __restrict__ dets,
    int* __restrict__ counts, int n_valid)
{
    __shared__ int s_warp[E2E_THREADS / 32];
    const int b = blockIdx.x, tid = threadIdx.x;
    if (b >= n_valid || max_det <= 0) {
        if (tid == 0) counts[b] = 0;
        return;
    }
    const Mapping m = make_mapping(tile_origins, b, pad_x, pad_y, hi_x, hi_y, gx, gy, sx, sy);
    const T* r = raw + (long long)b * K * 6;
    int total = 0;  // the same in every thread
    for (int c0 = 0; c0 < K && total < max_det; c0 += E2E_THREADS) {
        const int i = c0 + tid;
        const bool keep = i < K && f_gt(load_f(r, 6LL * i + 4), conf);
        int n;
        const int pos = total + block_rank(keep, s_warp, &n);
        if (keep && pos < max_det) {
            const long long o = 6LL * i;
            const float4 box =
                make_float4(load_f(r, o), load_f(r, o + 1), load_f(r, o + 2), load_f(r, o + 3));
            write_det(dets + ((long long)b * max_det + pos) * 6, box, f2d(load_f(r, o + 4)),
                      f2d(load_f(r, o + 5)), m);
        }
        total += n;
    }
    if (tid == 0) counts[b] = total < max_det ? total : max_det;
}

#define E2E_ARGS                                                                               \
    int K, float conf, int max_det, MAPPING_ARGS, double *__restrict__ dets,                   \
        int *__restrict__ counts, int n_valid

extern "C" __global__ void __launch_bounds__(E2E_THREADS)
    end2end_f32(const float* __restrict__ raw, E2E_ARGS) {
    end2end_impl<float>(raw, K, conf, max_det, tile_origins, pad_x, pad_y, hi_x, hi_y, gx, gy,
                        sx, sy, dets, counts, n_valid);
}

extern "C" __global__ void __launch_bounds__(E2E_THREADS)
    end2end_f16(const unsigned short* __restrict__ raw, E2E_ARGS) {
    end2end_impl<unsigned short>(raw, K, conf, max_det, tile_origins, pad_x, pad_y, hi_x, hi_y,
                                 gx, gy, sx, sy, dets, counts, n_valid);
}
