/* Prefill attention on Intel AMX (bf16 tiles): the same contract as
 * cpu_paged_attention.c's paged_prefill_attention for a bf16 cache whose head size is a
 * multiple of 32, on CPUs with AMX-BF16 (Sapphire Rapids and later).
 *
 * Why: at serving's prompt lengths the float32 kernel spends most of its time on the two
 * matrix products (scores Q K^T, then P V), which AMX computes 16 x 16 x 32 at a time in
 * one instruction; the softmax between them stays in float32 on vectors. kernels/
 * cpu_native.py builds this file on its own (with -mamx-tile -mamx-bf16 -mavx512bf16), so
 * a compiler or CPU without AMX leaves the float32 kernel in charge, and calls
 * ``amx_enable`` once (Linux hands a process AMX's tile state only on request).
 *
 * Numerics: scores are exact products of the bf16 queries and keys summed in float32 (the
 * tile unit's accumulation), then scaled; the softmax is float32; the probabilities are
 * rounded to bf16 (round to nearest even) for the P V product, which accumulates in float32
 * -- what PyTorch's own CPU flash attention does in bf16.
 *
 * Per KV head, K is packed once into B tiles of 16 keys x 32 dims and V into B tiles of 32
 * keys x 16 dims (the "VNNI" pair layout the instruction reads); then per 16 rows (query,
 * query head of the group) the scores of every key block the rows can see, the softmax of
 * each row over its own causal length, and the output in tiles of 16 dims (four at once).
 *
 * Tiles: 0 = A (queries or probabilities), 1 = B (keys or values), 2 = scores,
 * 3..6 = outputs. */

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_vector.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 0 when this process may use AMX's tiles (asked once; Linux 5.16+). */
int amx_enable(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static void tiles_on(void) {  /* every tile 16 rows x 64 bytes */
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = 16;
        c.colsb[i] = 64;
    }
    _tile_loadconfig(&c);
}

/* K and V of KV head ``kh`` for keys [0, context) into their B tiles; padding keys are
 * zero (their scores are never read: each row's softmax stops at its length). */
static void pack_kv(const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                    int context, int block_size, int64_t row, int kh, int D, uint16_t *kp,
                    uint16_t *vp, int padded) {
    const int DC = D / 32, DT = D / 16;
    memset(kp, 0, (size_t)padded * D * sizeof *kp);
    memset(vp, 0, (size_t)padded * D * sizeof *vp);
    for (int t = 0; t < context; t++) {
        const int64_t at = slot_of(table, t, block_size) * row + (int64_t)kh * D;
        const uint16_t *kr = k_cache + at, *vr = v_cache + at;
        /* K tile (key block t / 16, dims c*32 ..): row = dim pair, column = key */
        uint16_t *kt = kp + (int64_t)(t / 16) * DC * 512 + (t % 16) * 2;
        for (int d = 0; d < D; d += 2) {
            uint16_t *dst = kt + (d / 32) * 512 + ((d % 32) / 2) * 32;
            dst[0] = kr[d];
            dst[1] = kr[d + 1];
        }
        /* V tile (key chunk t / 32, dims c*16 ..): row = key pair, column = dim */
        uint16_t *vt = vp + (int64_t)(t / 32) * DT * 512 + ((t % 32) / 2) * 32 + t % 2;
        for (int d = 0; d < D; d++) vt[(d / 16) * 512 + (d % 16) * 2] = vr[d];
    }
}

/* Row r of the scores (raw q.k): softmax of scale * score over its first len keys, rounded
 * to bf16 into p (zeros up to span, a multiple of 32). Three passes over the row (maximum;
 * exponentials and their sum; normalise and round); whatever lies past len in sr (other
 * rows' keys, or scratch never written) is masked off, never read into the result. */
static void probabilities(float *sr, int len, int span, float scale, uint16_t *p) {
    if (len == 0) {
        memset(p, 0, (size_t)span * sizeof *p);
        return;
    }
    const i32x16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int full = len / 16 * 16;
    v16 m16 = (v16){0} - INFINITY;
    for (int t0 = 0; t0 < full; t0 += 16) {
        v16 x;
        memcpy(&x, sr + t0, sizeof x);
        m16 = vmax16(x, m16);
    }
    float m = hmax16(m16);
    for (int t = full; t < len; t++) m = sr[t] > m ? sr[t] : m;
    v16 sum16 = {0};
    for (int t0 = 0; t0 < span; t0 += 16) {
        v16 x;
        memcpy(&x, sr + t0, sizeof x);
        x = exp16_coarse((x - m) * scale);
        x = (v16)((i32x16)x & (lanes + t0 < len));
        sum16 += x;
        memcpy(sr + t0, &x, sizeof x);
    }
    const float inv = 1.0f / hsum16(sum16);
    for (int t0 = 0; t0 < span; t0 += 32) {
        v16 lo, hi;
        memcpy(&lo, sr + t0, sizeof lo);
        memcpy(&hi, sr + t0 + 16, sizeof hi);
        lo *= inv;
        hi *= inv;
        __m512bh both = _mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);  /* lo's 16 first */
        memcpy(p + t0, &both, sizeof both);
    }
}

/* Scores of the 16 query rows in qb against key blocks b .. b + n - 1 (n <= 3), three
 * accumulators at once (tiles 2-4, keys through tiles 1, 6, 7) so that each product does
 * not wait for the last one to finish (a tile product's latency is several times its
 * issue interval). */
static void scores(const uint16_t *qb, const uint16_t *kp, int b, int n, int DC, int D,
                   float *dst, int padded) {
    _tile_zero(2); _tile_zero(3); _tile_zero(4);
    for (int c = 0; c < DC; c++) {
        _tile_loadd(0, qb + c * 32, D * 2);
        _tile_loadd(1, kp + (int64_t)(b * DC + c) * 512, 64);
        _tile_dpbf16ps(2, 0, 1);
        if (n > 1) {
            _tile_loadd(6, kp + (int64_t)((b + 1) * DC + c) * 512, 64);
            _tile_dpbf16ps(3, 0, 6);
        }
        if (n > 2) {
            _tile_loadd(7, kp + (int64_t)((b + 2) * DC + c) * 512, 64);
            _tile_dpbf16ps(4, 0, 7);
        }
    }
    _tile_stored(2, dst, padded * 4);
    if (n > 1) _tile_stored(3, dst + 16, padded * 4);
    if (n > 2) _tile_stored(4, dst + 32, padded * 4);
}

/* P V for 32-wide heads (two output tiles): even and odd key chunks accumulate apart
 * (tiles 3, 4 and 5, 6), for the same reason as above, and are summed at the end. */
static void values_two(const uint16_t *pb, const uint16_t *vp, int chunks, int padded,
                       float *res) {
    float part[16 * 32] __attribute__((aligned(64)));
    _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6);
    for (int k = 0; k < chunks; k += 2) {
        const uint16_t *vt = vp + (int64_t)k * 1024;
        _tile_loadd(0, pb + k * 32, padded * 2);
        _tile_loadd(1, vt, 64);
        _tile_dpbf16ps(3, 0, 1);
        _tile_loadd(7, vt + 512, 64);
        _tile_dpbf16ps(4, 0, 7);
        if (k + 1 < chunks) {
            _tile_loadd(2, pb + (k + 1) * 32, padded * 2);
            _tile_loadd(1, vt + 1024, 64);
            _tile_dpbf16ps(5, 2, 1);
            _tile_loadd(7, vt + 1536, 64);
            _tile_dpbf16ps(6, 2, 7);
        }
    }
    _tile_stored(3, res, 32 * 4);
    _tile_stored(4, res + 16, 32 * 4);
    _tile_stored(5, part, 32 * 4);
    _tile_stored(6, part + 16, 32 * 4);
    for (int i = 0; i < 16 * 32; i++) res[i] += part[i];
}

/* P V for output dims 16 d0 .. 16 (d0 + n) (n <= 4 tiles, 3-6), row stride D floats. */
static void values_four(const uint16_t *pb, const uint16_t *vp, int chunks, int padded,
                        int DT, int d0, int n, float *res, int D) {
    _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6);
    for (int k = 0; k < chunks; k++) {
        const uint16_t *vt = vp + (int64_t)(k * DT + d0) * 512;
        _tile_loadd(0, pb + k * 32, padded * 2);
        _tile_loadd(1, vt, 64);
        _tile_dpbf16ps(3, 0, 1);
        if (n > 1) { _tile_loadd(7, vt + 512, 64); _tile_dpbf16ps(4, 0, 7); }
        if (n > 2) { _tile_loadd(1, vt + 1024, 64); _tile_dpbf16ps(5, 0, 1); }
        if (n > 3) { _tile_loadd(7, vt + 1536, 64); _tile_dpbf16ps(6, 0, 7); }
    }
    _tile_stored(3, res, D * 4);
    if (n > 1) _tile_stored(4, res + 16, D * 4);
    if (n > 2) _tile_stored(5, res + 32, D * 4);
    if (n > 3) _tile_stored(6, res + 48, D * 4);
}

int amx_prefill_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                          const uint16_t *v_cache, const int32_t *table, int context,
                          int num_new, int num_heads, int num_kv_heads, int head_dim,
                          int block_size, float scale, uint16_t *out, int64_t out_stride) {
    if (head_dim % 32 != 0 || head_dim > 256) return -2;
    if (num_new <= 0) return 0;
    const int D = head_dim, DC = D / 32, DT = D / 16, group = num_heads / num_kv_heads;
    const int padded = (context + 31) / 32 * 32;
    const int64_t row = (int64_t)num_kv_heads * D;
    uint16_t *kp = aligned_alloc(64, (size_t)padded * D * 2);
    uint16_t *vp = aligned_alloc(64, (size_t)padded * D * 2);
    float *sc = aligned_alloc(64, (size_t)16 * padded * 4);
    uint16_t *pb = aligned_alloc(64, (size_t)16 * padded * 2);
    uint16_t *qb = aligned_alloc(64, (size_t)16 * D * 2);
    float *res = aligned_alloc(64, (size_t)16 * D * 4);
    if (!kp || !vp || !sc || !pb || !qb || !res) {
        free(kp); free(vp); free(sc); free(pb); free(qb); free(res);
        return -1;
    }
    tiles_on();
    const int first = context - num_new, rows = num_new * group;
    for (int kh = 0; kh < num_kv_heads; kh++) {
        pack_kv(k_cache, v_cache, table, context, block_size, row, kh, D, kp, vp, padded);
        for (int r0 = 0; r0 < rows; r0 += 16) {  /* row r: query r / group, head r % group */
            int len[16], lmax = 0;
            for (int r = 0; r < 16; r++) {
                len[r] = 0;
                if (r0 + r >= rows) {
                    memset(qb + r * D, 0, (size_t)D * 2);
                    continue;
                }
                const int i = (r0 + r) / group, h = kh * group + (r0 + r) % group;
                len[r] = first + i + 1;
                lmax = len[r] > lmax ? len[r] : lmax;
                memcpy(qb + r * D, q + (int64_t)i * q_stride + (int64_t)h * D, (size_t)D * 2);
            }
            const int blocks = (lmax + 15) / 16, span = (lmax + 31) / 32 * 32;
            for (int b = 0; b < blocks; b += 3)  /* scores of keys 16b .. 16b + 47 */
                scores(qb, kp, b, blocks - b < 3 ? blocks - b : 3, DC, D,
                       sc + b * 16, padded);
            for (int r = 0; r < 16; r++)
                probabilities(sc + (int64_t)r * padded, len[r], span, scale,
                              pb + (int64_t)r * padded);
            if (DT == 2)
                values_two(pb, vp, span / 32, padded, res);
            else
                for (int d0 = 0; d0 < DT; d0 += 4)
                    values_four(pb, vp, span / 32, padded, DT, d0,
                                DT - d0 < 4 ? DT - d0 : 4, res + d0 * 16, D);
            for (int r = 0; r < 16 && r0 + r < rows; r++) {
                const int i = (r0 + r) / group, h = kh * group + (r0 + r) % group;
                uint16_t *o = out + (int64_t)i * out_stride + (int64_t)h * D;
                for (int j = 0; j < D; j += 32) {  /* round to nearest even, as f32_to_bf16 */
                    __m512 lo, hi;
                    memcpy(&lo, res + r * D + j, sizeof lo);
                    memcpy(&hi, res + r * D + j + 16, sizeof hi);
                    __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);
                    memcpy(o + j, &both, sizeof both);
                }
            }
        }
    }
    _tile_release();
    free(kp); free(vp); free(sc); free(pb); free(qb); free(res);
    return 0;
}
