/* What the CPU attention kernels share (cpu_paged_attention.c, cpu_amx_attention.c): bf16
 * conversions, the cache's slot lookup, 16-lane float vectors (GCC/Clang vector extensions:
 * one AVX-512 register, two AVX2 ones) and a row softmax. kernels/cpu_native.py hashes this
 * file with each source, so a change here rebuilds both. */

#ifndef PDSERVE_CPU_VECTOR_H
#define PDSERVE_CPU_VECTOR_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if (isnan(f)) return (uint16_t)((v.u >> 16) | 0x40);  /* stays a NaN */
    v.u += 0x7FFFu + ((v.u >> 16) & 1u);                    /* round to nearest even */
    return (uint16_t)(v.u >> 16);
}

/* The cache slot of token t: its block's first slot plus its row in the block. Pass 1 calls
 * it per token (the divisions are cheap beside a K row); pass 3 walks blocks instead, as it
 * runs once per query head. */
static inline int64_t slot_of(const int32_t *table, int t, int block_size) {
    return (int64_t)table[t / block_size] * block_size + t % block_size;
}

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline v16 load16(const void *base, int64_t offset, int is_bf16) {
    v16 out;
    if (is_bf16) {
        u16x16 raw;
        memcpy(&raw, (const uint16_t *)base + offset, sizeof raw);
        u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;
        memcpy(&out, &wide, sizeof out);
    } else {
        memcpy(&out, (const float *)base + offset, sizeof out);
    }
    return out;
}

static inline float hsum16(v16 x) {
    v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline v16 vmax16(v16 a, v16 b) {  /* (C has no vector ?:, so a bitwise blend) */
    i32x16 m = a > b;
    return (v16)((m & (i32x16)a) | (~m & (i32x16)b));
}

/* exp(x) on 16 lanes for x <= 0 (scores minus their maximum): 2^(x log2 e) split into the
 * nearest integer power (exponent bits) and a fraction f in [-1/2, 1/2] (Taylor series of
 * 2^f to degree 7: relative error below 1e-8 before float rounding). Inputs below -87
 * count as -87 (the caller zeroes the keys a row must not see). Written in vector types:
 * a scalar version with floorf and a union kept GCC from vectorizing the loop around it. */
static const float EXP2_SERIES[8] = {
    1.5252733804059838e-05f, 1.5403530393381606e-04f, 1.3333558146428441e-03f,
    9.618129107628477e-03f, 5.5504108664821576e-02f, 2.402265069591007e-01f,
    6.931471805599453e-01f, 1.0f};

/* The series from term ``first`` of EXP2_SERIES on (0: degree 7; constant at every call,
 * so the loop unrolls into the same multiply-adds as written out). */
static inline v16 exp16_series(v16 x, int first) {
    x = vmax16(x, (v16){0} - 87.0f);
    v16 t = x * 1.44269504088896341f;
    v16 n = (t + 12582912.0f) - 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    v16 f = t - n;
    v16 p = (v16){0} + EXP2_SERIES[first];
    for (int i = first + 1; i < 8; i++) p = p * f + EXP2_SERIES[i];
    i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
    v16 scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

static inline v16 exp16(v16 x) { return exp16_series(x, 0); }

/* exp(x) for results that are then rounded to bf16 (8 bits of mantissa): the series cut at
 * degree 4 (relative error below 5e-5, a fortieth of bf16's rounding step), three
 * multiply-adds fewer per 16 lanes in the softmax that bounds AMX prefill. */
static inline v16 exp16_coarse(v16 x) { return exp16_series(x, 3); }

static inline float hmax16(v16 x) {
    float m = x[0];
    for (int j = 1; j < 16; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* Softmax of sr[0 .. len) in place, zeros in [len, padded): keys the row does not see. */
static void softmax_row(float *sr, int len, int padded) {
    const i32x16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int t = len; t < padded; t++) sr[t] = -INFINITY;
    v16 m16 = (v16){0} - INFINITY;
    for (int t0 = 0; t0 < padded; t0 += 16) {
        v16 x;
        memcpy(&x, sr + t0, sizeof x);
        m16 = vmax16(x, m16);
    }
    const float m = hmax16(m16);
    v16 sum16 = {0};
    for (int t0 = 0; t0 < padded; t0 += 16) {
        v16 x;
        memcpy(&x, sr + t0, sizeof x);
        x = exp16(x - m);
        /* exp16 clamps at -87: the unseen keys get exactly zero, not 1e-38 */
        const i32x16 seen = lanes + t0 < len;
        x = (v16)((i32x16)x & seen);
        sum16 += x;
        memcpy(sr + t0, &x, sizeof x);
    }
    const float inv = 1.0f / hsum16(sum16);
    for (int t0 = 0; t0 < padded; t0 += 16) {
        v16 x;
        memcpy(&x, sr + t0, sizeof x);
        x *= inv;
        memcpy(sr + t0, &x, sizeof x);
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

/* Lane j of the result: the sum of p[j]'s sixteen lanes (a transposing tree of adds: 45
 * operations for sixteen sums where one horizontal sum each takes about eight). */
static inline __m512 sum_each16(__m512 p[16]) {
    __m512 two[8], four[4], half[2];
    for (int i = 0; i < 8; i++)
        two[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]),
                               _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(two[2 * i]), b = _mm512_castps_pd(two[2 * i + 1]);
        four[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(four[2 * i], four[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(four[2 * i], four[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(half[0], half[1], 0x88),
                         _mm512_shuffle_f32x4(half[0], half[1], 0xDD));
}
#endif

#endif
