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

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 makes it */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One element of a tensor of either dtype, and its store. */
static inline float load(const void *base, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void store(void *base, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)base)[i] = to_bf16(v);
    else
        ((float *)base)[i] = v;
}

/* What the tensor's dtype keeps of v: the rounding of one torch operation. */
static inline float rounded(float v, int bf16) { return bf16 ? from_bf16(to_bf16(v)) : v; }

/* out = rms_norm(x + residual) * weight and summed = x + residual (has_residual), or
 * out = rms_norm(x) * weight; rows of `hidden` elements at the given row strides (in
 * elements); out and summed are contiguous. */
void add_rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t res_stride,
                  const void *weight, void *out, void *summed, int64_t rows, int64_t hidden,
                  float eps, int bf16, int has_residual) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t xo = r * x_stride, ro = r * res_stride, oo = r * hidden;
        float squares = 0.0f;
        for (int64_t i = 0; i < hidden; i++) {
            float s = load(x, xo + i, bf16);
            if (has_residual) {
                s = rounded(load(residual, ro + i, bf16) + s, bf16);
                store(summed, oo + i, s, bf16);
            }
            squares += s * s;
        }
        const float inv = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) {
            const float s = has_residual ? load(summed, oo + i, bf16) : load(x, xo + i, bf16);
            const float normed = rounded(s * inv, bf16);
            store(out, oo + i, load(weight, i, bf16) * normed, bf16);
        }
    }
}

/* x[i] * cos[i] + rotate_half(x)[i] * sin[i] over one head in place, rounding after each
 * operation; sin holds -sin for the first half (the rotation's sign folded in). */
static void rope_head(void *x, int64_t at, const void *cos, const void *sin, int64_t table_at,
                      int dim, int bf16) {
    const int half = dim / 2;
    for (int i = 0; i < half; i++) {
        const float x1 = load(x, at + i, bf16), x2 = load(x, at + half + i, bf16);
        const float a1 = rounded(x1 * load(cos, table_at + i, bf16), bf16);
        const float b1 = rounded(x2 * load(sin, table_at + i, bf16), bf16);
        const float a2 = rounded(x2 * load(cos, table_at + half + i, bf16), bf16);
        const float b2 = rounded(x1 * load(sin, table_at + half + i, bf16), bf16);
        store(x, at + i, a1 + b1, bf16);
        store(x, at + half + i, a2 + b2, bf16);
    }
}

/* RoPE on q [tokens, q_heads, dim] and k [tokens, kv_heads, dim] in place (rows at the given
 * token strides, heads contiguous within a row: views of one fused projection), then k and
 * v into the cache's slots: k_cache and v_cache are [num_slots, kv_heads, dim] contiguous,
 * and token t goes to slot slots[t]. cos and sin are [tokens, dim] contiguous. Returns -1,
 * touching nothing, if a slot is outside the cache; else 0. */
int rope_and_write_kv(void *q, int64_t q_stride, int q_heads, void *k, int64_t k_stride,
                      const void *v, int64_t v_stride, int kv_heads, int dim,
                      const void *cos, const void *sin, int64_t tokens, void *k_cache,
                      void *v_cache, const int64_t *slots, int64_t num_slots, int bf16) {
    const size_t elem = bf16 ? 2 : 4;
    const size_t row_bytes = (size_t)kv_heads * dim * elem;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < tokens; t++) {
        for (int h = 0; h < q_heads; h++)
            rope_head(q, t * q_stride + (int64_t)h * dim, cos, sin, t * dim, dim, bf16);
        for (int h = 0; h < kv_heads; h++)
            rope_head(k, t * k_stride + (int64_t)h * dim, cos, sin, t * dim, dim, bf16);
        const int64_t slot = slots[t];
        memcpy((char *)k_cache + slot * row_bytes, (const char *)k + t * k_stride * elem,
               row_bytes);
        memcpy((char *)v_cache + slot * row_bytes, (const char *)v + t * v_stride * elem,
               row_bytes);
    }
    return 0;
}
