/* The per-layer elementwise work of a CPU decode step, one call each instead of five to
 * ten torch operators (kernels/cpu_elementwise.py says why): the residual add with RMSNorm,
 * and RoPE on q and k with K and V written into the paged cache.
 *
 * Every operation rounds where HF's torch code rounds (bf16: each multiply and add is done
 * in float32 and rounded to bf16 to nearest-even, as torch's BFloat16 does), and the file is
 * built with -ffp-contract=off so no multiply-add is fused behind our back: RoPE is then
 * bit for bit torch's; the norm sums its squares in another order than torch's mean, so it
 * is within a rounding step of it, as the torch path of cpu_elementwise.py already was.
 *
 * Built and loaded by kernels/cpu_native.py (ctypes); no dependency but libm.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even as c10::BFloat16 does (a NaN becomes 0x7fc0); branch-free, so the
 * loops below vectorize. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

static inline float round_bf16(float v) { return from_bf16(to_bf16(v)); }
static inline float same(float v) { return v; }
static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const uint16_t *p, int64_t i) { return from_bf16(p[i]); }
static inline void store_f32(float *p, int64_t i, float v) { p[i] = v; }
static inline void store_bf16(uint16_t *p, int64_t i, float v) { p[i] = to_bf16(v); }

#define LANES 16 /* partial sums of the squares: a fixed order that vectorizes */

/* One body per dtype: T the element type, LOAD/STORE/ROUND its conversions (ROUND: what
 * the dtype keeps of a float, i.e. the rounding of one torch operation). */
#define ADD_RMS_NORM(NAME, T, LOAD, STORE, ROUND)                                           \
    static void NAME(const T *x, int64_t x_stride, const T *res, int64_t res_stride,      \
                     const T *w, T *out, T *summed, int64_t rows, int64_t n, float eps,   \
                     int has_residual) {                                                   \
        for (int64_t r = 0; r < rows; r++) {                                               \
            const T *xr = x + r * x_stride;                                                \
            const T *src = xr;                                                             \
            T *o = out + r * n;                                                            \
            if (has_residual) {                                                            \
                const T *rr = res + r * res_stride;                                        \
                T *sr = summed + r * n;                                                    \
                for (int64_t i = 0; i < n; i++) STORE(sr, i, LOAD(rr, i) + LOAD(xr, i));  \
                src = sr;                                                                  \
            }                                                                              \
            float acc[LANES] = {0};                                                        \
            int64_t i = 0;                                                                 \
            for (; i + LANES <= n; i += LANES)                                             \
                for (int j = 0; j < LANES; j++) {                                          \
                    const float s = LOAD(src, i + j);                                      \
                    acc[j] += s * s;                                                       \
                }                                                                          \
            for (; i < n; i++) {                                                           \
                const float s = LOAD(src, i);                                              \
                acc[0] += s * s;                                                           \
            }                                                                              \
            float squares = 0.0f;                                                          \
            for (int j = 0; j < LANES; j++) squares += acc[j];                             \
            const float inv = 1.0f / sqrtf(squares / (float)n + eps);                      \
            for (int64_t k = 0; k < n; k++)                                                \
                STORE(o, k, LOAD(w, k) * ROUND(LOAD(src, k) * inv));                       \
        }                                                                                  \
    }

ADD_RMS_NORM(add_rms_norm_f32, float, load_f32, store_f32, same)
ADD_RMS_NORM(add_rms_norm_bf16, uint16_t, load_bf16, store_bf16, round_bf16)

/* out = rms_norm(x + residual) * weight and summed = x + residual (has_residual), or
 * out = rms_norm(x) * weight; rows of `hidden` elements at the given row strides (in
 * elements); out and summed are contiguous. */
void add_rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t res_stride,
                  const void *weight, void *out, void *summed, int64_t rows, int64_t hidden,
                  float eps, int bf16, int has_residual) {
    if (bf16)
        add_rms_norm_bf16(x, x_stride, residual, res_stride, weight, out, summed, rows,
                          hidden, eps, has_residual);
    else
        add_rms_norm_f32(x, x_stride, residual, res_stride, weight, out, summed, rows,
                         hidden, eps, has_residual);
}

/* x[i] * cos[i] + rotate_half(x)[i] * sin[i] over one head in place, rounding after each
 * operation; sin holds -sin for the first half (the rotation's sign folded in). The head
 * is read into a copy first, so the stores cannot alias the loads. */
#define ROPE_HEAD(NAME, T, LOAD, STORE, ROUND)                                              \
    static void NAME(T *x, const T *cos, const T *sin, int dim) {                          \
        float in[512];                                                                     \
        const int half = dim / 2;                                                          \
        for (int i = 0; i < dim; i++) in[i] = LOAD(x, i);                                  \
        for (int i = 0; i < half; i++) {                                                   \
            const float a = ROUND(in[i] * LOAD(cos, i));                                   \
            const float b = ROUND(in[half + i] * LOAD(sin, i));                            \
            STORE(x, i, a + b);                                                            \
        }                                                                                  \
        for (int i = 0; i < half; i++) {                                                   \
            const float a = ROUND(in[half + i] * LOAD(cos, half + i));                     \
            const float b = ROUND(in[i] * LOAD(sin, half + i));                            \
            STORE(x, half + i, a + b);                                                     \
        }                                                                                  \
    }

ROPE_HEAD(rope_head_f32, float, load_f32, store_f32, same)
ROPE_HEAD(rope_head_bf16, uint16_t, load_bf16, store_bf16, round_bf16)

/* RoPE on q [tokens, q_heads, dim] and k [tokens, kv_heads, dim] in place (rows at the given
 * token strides, heads contiguous within a row: views of one fused projection), then k and
 * v into the cache's slots: k_cache and v_cache are [num_slots, kv_heads, dim] contiguous,
 * and token t goes to slot slots[t]. cos and sin are [tokens, dim] contiguous; dim is even
 * and at most 512. Returns -1, touching nothing, if a slot is outside the cache; else 0. */
int rope_and_write_kv(void *q, int64_t q_stride, int q_heads, void *k, int64_t k_stride,
                      const void *v, int64_t v_stride, int kv_heads, int dim,
                      const void *cos, const void *sin, int64_t tokens, void *k_cache,
                      void *v_cache, const int64_t *slots, int64_t num_slots, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
    const size_t row_bytes = (size_t)kv_heads * dim * elem;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < tokens; t++) {
        for (int h = 0; h < q_heads + kv_heads; h++) {
            char *head = h < q_heads
                ? (char *)q + (t * q_stride + (int64_t)h * dim) * elem
                : (char *)k + (t * k_stride + (int64_t)(h - q_heads) * dim) * elem;
            if (bf16)
                rope_head_bf16((uint16_t *)head, (const uint16_t *)cos + t * dim,
                               (const uint16_t *)sin + t * dim, dim);
            else
                rope_head_f32((float *)head, (const float *)cos + t * dim,
                              (const float *)sin + t * dim, dim);
        }
        const int64_t slot = slots[t];
        memcpy((char *)k_cache + slot * row_bytes, (const char *)k + t * k_stride * elem,
               row_bytes);
        memcpy((char *)v_cache + slot * row_bytes, (const char *)v + t * v_stride * elem,
               row_bytes);
    }
    return 0;
}
