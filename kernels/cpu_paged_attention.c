/* Paged attention for CPU serving, decode (one query token per sequence) and prefill (a
 * sequence's new tokens): K/V read straight from the paged cache (no gather copy), float32
 * math, bf16 or float32 storage. At the end, the grammar mask for the sampler's logits.
 *
 * kernels/cpu_native.py compiles this file once per machine (cc -O3 -march=native
 * -fopenmp-simd) and calls it through ctypes, which drops the GIL for the call. The
 * references they are tested against are kernels.reference.paged_decode_attention and
 * paged_prefill_attention.
 *
 * Layout (engine/kv_layout.py): k_cache and v_cache are [num_blocks, block_size, Hk, D]
 * (the two halves of the [2, ...] cache); token t of sequence i sits in block
 * tables[i * table_stride + t / block_size], row t % block_size. Query head h reads KV
 * head h / (Hq / Hk) (grouped-query attention; MHA and MQA are the two ends).
 *
 * Per sequence: pass 1 reads each token's K row once (all KV heads, contiguous) and scores
 * every query head; pass 2 is the softmax per query head; pass 3 reads each V row once and
 * accumulates every query head. Scores live in a [Hq, context rounded up to 16] float32
 * scratch. Rows are
 * handled 16 floats at a time with GCC/Clang vector extensions (one AVX-512 register, two
 * AVX2 ones; the compiler lowers them to what -march=native has), and the head size is a
 * compile-time constant for 64, 128 and 32-wide heads (the accumulators then stay in
 * registers); other multiples of 16 take a loop over the row, anything else is refused and
 * the caller falls back to torch.
 */

#include "cpu_vector.h"

#ifdef __AVX512BF16__
/* Decode scores from bf16 queries and keys (head size a multiple of 32): each product of
 * two bf16 values is exact in float32 and the pairs are summed in float32 by the bf16 dot
 * instruction, with no conversion of K; sixteen tokens' sums at a time, then scaled.
 * q: [Hq][D] bf16, unscaled. scores: [Hq][padded], as the float32 pass writes them. */
static void decode_scores_bf16(const uint16_t *q, const uint16_t *k_cache,
                               const int32_t *table, int n, int num_heads, int num_kv_heads,
                               int D, int block_size, float scale, float *scores,
                               int padded) {
    const int group = num_heads / num_kv_heads, chunks = D / 32;
    const int64_t row = (int64_t)num_kv_heads * D;
    for (int t0 = 0; t0 < n; t0 += 16) {
        const int count = n - t0 < 16 ? n - t0 : 16;
        int64_t at[16];
        for (int j = 0; j < count; j++) at[j] = slot_of(table, t0 + j, block_size) * row;
        for (int h = 0; h < num_heads; h++) {
            const int kh = h / group;
            __m512 p[16];
            for (int j = 0; j < 16; j++) p[j] = _mm512_setzero_ps();
            for (int c = 0; c < chunks; c++) {
                const __m512bh qc = (__m512bh)_mm512_loadu_si512(q + h * D + c * 32);
                for (int j = 0; j < count; j++)
                    p[j] = _mm512_dpbf16_ps(p[j], qc, (__m512bh)_mm512_loadu_si512(
                        k_cache + at[j] + (int64_t)kh * D + c * 32));
            }
            _mm512_storeu_ps(scores + (int64_t)h * padded + t0,
                             _mm512_mul_ps(sum_each16(p), _mm512_set1_ps(scale)));
        }
    }
}
/* Decode values from bf16 probabilities and V (head size a multiple of 32, a group of at
 * most 4 query heads): tokens in pairs, each pair's V rows interleaved once per KV head
 * into the dot instruction's pair layout and weighed by every query head of the group's
 * two probabilities at once (exact products, float32 sums). probs: [Hq][padded] floats
 * (the softmax), rounded here to bf16, as torch's bf16 attention rounds them before P V.
 * acc: [Hq][D] floats. */
static void decode_values_bf16(const float *probs, const uint16_t *v_cache,
                               const int32_t *table, int n, int num_heads, int num_kv_heads,
                               int D, int block_size, int padded, float *acc) {
    const int group = num_heads / num_kv_heads, chunks = D / 32;
    const int64_t row = (int64_t)num_kv_heads * D;
    /* lanes 2i, 2i + 1 of the result: element i of a, element i of b (16-bit elements);
     * the second index takes elements 16 .. 31 */
    __m512i lo_idx, hi_idx;
    {
        uint16_t lo[32], hi[32];
        for (int i = 0; i < 16; i++) {
            lo[2 * i] = (uint16_t)i; lo[2 * i + 1] = (uint16_t)(32 + i);
            hi[2 * i] = (uint16_t)(16 + i); hi[2 * i + 1] = (uint16_t)(48 + i);
        }
        lo_idx = _mm512_loadu_si512(lo);
        hi_idx = _mm512_loadu_si512(hi);
    }
    for (int kh = 0; kh < num_kv_heads; kh++) {
        __m512 a[4][8];
        for (int g = 0; g < group; g++)
            for (int c = 0; c < 2 * chunks; c++) a[g][c] = _mm512_setzero_ps();
        for (int t = 0; t < n; t += 2) {
            const int second = t + 1 < n;
            const uint16_t *v0 = v_cache + slot_of(table, t, block_size) * row + (int64_t)kh * D;
            const uint16_t *v1 = second
                ? v_cache + slot_of(table, t + 1, block_size) * row + (int64_t)kh * D : v0;
            __m512bh pair[8];
            for (int c = 0; c < chunks; c++) {
                const __m512i x = _mm512_loadu_si512(v0 + c * 32);
                const __m512i y = _mm512_loadu_si512(v1 + c * 32);
                pair[2 * c] = (__m512bh)_mm512_permutex2var_epi16(x, lo_idx, y);
                pair[2 * c + 1] = (__m512bh)_mm512_permutex2var_epi16(x, hi_idx, y);
            }
            for (int g = 0; g < group; g++) {
                const float *p = probs + (int64_t)(kh * group + g) * padded + t;
                const uint32_t w = (uint32_t)f32_to_bf16(p[0])
                                 | (uint32_t)(second ? f32_to_bf16(p[1]) : 0) << 16;
                const __m512bh weights = (__m512bh)_mm512_set1_epi32((int)w);
                for (int c = 0; c < 2 * chunks; c++)
                    a[g][c] = _mm512_dpbf16_ps(a[g][c], weights, pair[c]);
            }
        }
        for (int g = 0; g < group; g++)
            for (int c = 0; c < 2 * chunks; c++)
                _mm512_storeu_ps(acc + (int64_t)(kh * group + g) * D + c * 16, a[g][c]);
    }
}
#define HAVE_BF16_SCORES 1
#define DECODE_SCORES_BF16(...) decode_scores_bf16(__VA_ARGS__)
#define DECODE_VALUES_BF16(...) decode_values_bf16(__VA_ARGS__)
#else
#define HAVE_BF16_SCORES 0
#define DECODE_SCORES_BF16(...) ((void)0)
#define DECODE_VALUES_BF16(...) ((void)0)
#endif

/* One sequence. q: [Hq][D] floats, pre-scaled; acc: [Hq][D] floats, the result. qraw: the
 * same queries as bf16, unscaled, when the scores take the bf16 dot path (else NULL). */
#define ATTEND_ONE(NAME, D_CONST)                                                             \
static void NAME(const float *q, const void *k_cache, const void *v_cache,                  \
                 const int32_t *table, int n, int num_heads, int num_kv_heads, int dim,     \
                 int block_size, int is_bf16, float *scores, float *acc,                    \
                 const uint16_t *qraw, float scale) {                                       \
    const int D = D_CONST ? D_CONST : dim;                                                  \
    const int chunks = D / 16, group = num_heads / num_kv_heads;                            \
    const int64_t row = (int64_t)num_kv_heads * D;                                          \
    const int padded = (n + 15) / 16 * 16;  /* each head's row of scores */                 \
    if (HAVE_BF16_SCORES && qraw != NULL)                                                   \
        DECODE_SCORES_BF16(qraw, k_cache, table, n, num_heads, num_kv_heads, D, block_size, \
                           scale, scores, padded);                                          \
    else                                                                                    \
    for (int t = 0; t < n; t++) {                                                           \
        const int64_t at = slot_of(table, t, block_size) * row;                             \
        for (int kh = 0; kh < num_kv_heads; kh++) {                                         \
            v16 k[D_CONST ? D_CONST / 16 : 16];                                             \
            for (int c = 0; c < chunks; c++) k[c] = load16(k_cache, at + kh * D + c * 16,   \
                                                           is_bf16);                        \
            for (int g = 0; g < group; g++) {                                               \
                const int h = kh * group + g;                                               \
                v16 s = {0};                                                                \
                for (int c = 0; c < chunks; c++) {                                          \
                    v16 qc;                                                                 \
                    memcpy(&qc, q + h * D + c * 16, sizeof qc);                             \
                    s += qc * k[c];                                                         \
                }                                                                           \
                scores[(int64_t)h * padded + t] = hsum16(s);                                \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    for (int h = 0; h < num_heads; h++)                                                     \
        softmax_row(scores + (int64_t)h * padded, n, padded);                               \
    if (HAVE_BF16_SCORES && qraw != NULL && group <= 4 && D <= 128) {                       \
        DECODE_VALUES_BF16(scores, v_cache, table, n, num_heads, num_kv_heads, D,           \
                           block_size, padded, acc);                                        \
        return;                                                                             \
    }                                                                                       \
    for (int h0 = 0; h0 < num_heads; h0 += group) {                                         \
        const int kh = h0 / group;                                                          \
        for (int g = 0; g < group; g++) {                                                   \
            const int h = h0 + g;                                                           \
            v16 a[D_CONST ? D_CONST / 16 : 16];                                             \
            for (int c = 0; c < chunks; c++) a[c] = (v16){0};                               \
            const float *p = scores + (int64_t)h * padded;                                  \
            for (int t0 = 0; t0 < n; t0 += block_size) {                                    \
                const int end = n - t0 < block_size ? n : t0 + block_size;                  \
                int64_t at = (int64_t)table[t0 / block_size] * block_size * row + kh * D;   \
                for (int t = t0; t < end; t++, at += row)                                   \
                    for (int c = 0; c < chunks; c++)                                        \
                        a[c] += p[t] * load16(v_cache, at + c * 16, is_bf16);               \
            }                                                                               \
            memcpy(acc + h * D, a, (size_t)D * sizeof(float));                              \
        }                                                                                   \
    }                                                                                       \
}

ATTEND_ONE(attend_d32, 32)
ATTEND_ONE(attend_d64, 64)
ATTEND_ONE(attend_d128, 128)
ATTEND_ONE(attend_any, 0)

/* Returns 0; -1 when scratch memory could not be had; -2 for a head size it does not
 * handle (a multiple of 16 up to 256). */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int32_t *tables, int table_stride, const int32_t *context,
                           int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                           int block_size, float scale, int is_bf16, void *out,
                           int bf16_scores) {
    if (head_dim % 16 != 0 || head_dim > 256) return -2;
    int max_context = 1;
    for (int i = 0; i < num_seqs; i++)
        if (context[i] > max_context) max_context = context[i];
    const int width = num_heads * head_dim;
    const int bf16_dots = HAVE_BF16_SCORES && is_bf16 && head_dim % 32 == 0 && bf16_scores;
    float *scores = malloc((size_t)num_heads * ((max_context + 15) / 16 * 16) * sizeof(float));
    float *qf = malloc((size_t)width * sizeof(float));
    float *acc = malloc((size_t)width * sizeof(float));
    if (!scores || !qf || !acc) {
        free(scores); free(qf); free(acc);
        return -1;
    }
    for (int i = 0; i < num_seqs; i++) {
        const int64_t base = (int64_t)i * width;
        if (!bf16_dots)  /* (the bf16 dot path reads q as it is) */
            for (int j = 0; j < width; j++)
                qf[j] = scale * (is_bf16 ? bf16_to_f32(((const uint16_t *)q)[base + j])
                                         : ((const float *)q)[base + j]);
        const int32_t *table = tables + (int64_t)i * table_stride;
        void (*attend)(const float *, const void *, const void *, const int32_t *, int, int,
                       int, int, int, int, float *, float *, const uint16_t *, float) =
            head_dim == 32 ? attend_d32 : head_dim == 64 ? attend_d64
            : head_dim == 128 ? attend_d128 : attend_any;
        if (context[i] > 0)
            attend(qf, k_cache, v_cache, table, context[i], num_heads, num_kv_heads, head_dim,
                   block_size, is_bf16, scores, acc,
                   bf16_dots ? (const uint16_t *)q + base : NULL, scale);
        else
            memset(acc, 0, (size_t)width * sizeof(float));
        if (is_bf16) {
            uint16_t *o = (uint16_t *)out + base;
            for (int j = 0; j < width; j++) o[j] = f32_to_bf16(acc[j]);
        } else {
            memcpy((float *)out + base, acc, (size_t)width * sizeof(float));
        }
    }
    free(scores); free(qf); free(acc);
    return 0;
}

/* ---- prefill: the new tokens of one sequence, causal over everything cached before ----
 *
 * Query i of the n new tokens sits at position context - n + i and attends keys
 * 0 ..= that position, all read from the paged cache (the step wrote its own K/V there
 * first). Per KV head, K is transposed once into floats [D][keys] and V converted into
 * [keys][D], so the hot loops are vectorized over 16 keys (scores) or 16 head elements
 * (values). Rows (query, query head of the group) go in tiles of TILE: each K vector and
 * V row loaded serves every row of the tile, whose accumulators stay in registers (a
 * partial last tile computes zero rows and drops them). */
#define TILE 8

#define PREFILL_TILE(NAME, D_CONST)                                                           \
static void NAME(const float *qr, const float *kt, const float *vf, float *sc, int padded,  \
                 const int *len, int dim, float *res) {                                     \
    const int D = D_CONST ? D_CONST : dim, chunks = D / 16;                                 \
    int lmax = 0;                                                                           \
    for (int r = 0; r < TILE; r++) lmax = len[r] > lmax ? len[r] : lmax;                    \
    const int span = (lmax + 15) / 16 * 16;                                                 \
    for (int t0 = 0; t0 < span; t0 += 16) {  /* scores, 16 keys at a time */                \
        v16 s[TILE];                                                                        \
        for (int r = 0; r < TILE; r++) s[r] = (v16){0};                                     \
        for (int j = 0; j < D; j++) {                                                       \
            v16 k;                                                                          \
            memcpy(&k, kt + (int64_t)j * padded + t0, sizeof k);                            \
            for (int r = 0; r < TILE; r++) s[r] += qr[r * D + j] * k;                       \
        }                                                                                   \
        for (int r = 0; r < TILE; r++) memcpy(sc + (int64_t)r * padded + t0, &s[r], 64);    \
    }                                                                                       \
    for (int r = 0; r < TILE; r++) softmax_row(sc + (int64_t)r * padded, len[r], span);     \
    v16 acc[TILE][D_CONST ? D_CONST / 16 : 16];                                             \
    for (int r = 0; r < TILE; r++)                                                          \
        for (int c = 0; c < chunks; c++) acc[r][c] = (v16){0};                              \
    for (int t = 0; t < lmax; t++) {  /* values: each row of V loaded once per tile */      \
        float p[TILE];                                                                      \
        for (int r = 0; r < TILE; r++) p[r] = sc[(int64_t)r * padded + t];                  \
        for (int c = 0; c < chunks; c++) {                                                  \
            v16 v;                                                                          \
            memcpy(&v, vf + (int64_t)t * D + c * 16, sizeof v);                             \
            for (int r = 0; r < TILE; r++) acc[r][c] += p[r] * v;                           \
        }                                                                                   \
    }                                                                                       \
    for (int r = 0; r < TILE; r++)                                                          \
        for (int c = 0; c < chunks; c++) memcpy(res + r * D + c * 16, &acc[r][c], 64);      \
}

PREFILL_TILE(prefill_tile_d32, 32)
PREFILL_TILE(prefill_tile_d64, 64)
PREFILL_TILE(prefill_tile_d128, 128)
PREFILL_TILE(prefill_tile_any, 0)

int paged_prefill_attention(const void *q, int64_t q_stride, const void *k_cache,
                            const void *v_cache, const int32_t *table, int context,
                            int num_new, int num_heads, int num_kv_heads, int head_dim,
                            int block_size, float scale, int is_bf16, void *out,
                            int64_t out_stride) {
    if (head_dim % 16 != 0 || head_dim > 256) return -2;
    if (num_new <= 0) return 0;
    const int D = head_dim, chunks = D / 16, group = num_heads / num_kv_heads;
    const int padded = (context + 15) / 16 * 16;
    const int64_t row = (int64_t)num_kv_heads * D;
    float *kt = calloc((size_t)D * padded, sizeof(float));
    float *vf = calloc((size_t)padded * D, sizeof(float));
    float *sc = malloc((size_t)TILE * padded * sizeof(float));
    float *qr = malloc((size_t)TILE * D * sizeof(float));
    float *res = malloc((size_t)TILE * D * sizeof(float));
    if (!kt || !vf || !sc || !qr || !res) {
        free(kt); free(vf); free(sc); free(qr); free(res);
        return -1;
    }
    void (*tile_fn)(const float *, const float *, const float *, float *, int, const int *,
                    int, float *) =
        D == 32 ? prefill_tile_d32 : D == 64 ? prefill_tile_d64
        : D == 128 ? prefill_tile_d128 : prefill_tile_any;
    const int first = context - num_new;  /* position of the first new token */
    const int rows = num_new * group;
    for (int kh = 0; kh < num_kv_heads; kh++) {
        for (int t = 0; t < context; t++) {
            const int64_t at = slot_of(table, t, block_size) * row + kh * D;
            for (int c = 0; c < chunks; c++) {
                v16 k = load16(k_cache, at + c * 16, is_bf16);
                v16 v = load16(v_cache, at + c * 16, is_bf16);
                for (int j = 0; j < 16; j++) kt[(int64_t)(c * 16 + j) * padded + t] = k[j];
                memcpy(vf + (int64_t)t * D + c * 16, &v, sizeof v);
            }
        }
        for (int r0 = 0; r0 < rows; r0 += TILE) {  /* row r: query r / group, head g */
            int len[TILE];
            for (int r = 0; r < TILE; r++) {
                if (r0 + r >= rows) {  /* padding row: no keys, zero query */
                    len[r] = 0;
                    memset(qr + r * D, 0, (size_t)D * sizeof(float));
                    continue;
                }
                const int i = (r0 + r) / group, h = kh * group + (r0 + r) % group;
                len[r] = first + i + 1;
                const int64_t at = (int64_t)i * q_stride + (int64_t)h * D;
                for (int j = 0; j < D; j++)
                    qr[r * D + j] = scale * (is_bf16 ? bf16_to_f32(((const uint16_t *)q)[at + j])
                                                     : ((const float *)q)[at + j]);
            }
            tile_fn(qr, kt, vf, sc, padded, len, D, res);
            for (int r = 0; r < TILE && r0 + r < rows; r++) {
                const int i = (r0 + r) / group, h = kh * group + (r0 + r) % group;
                const int64_t at = (int64_t)i * out_stride + (int64_t)h * D;
                for (int j = 0; j < D; j++) {
                    if (is_bf16) ((uint16_t *)out)[at + j] = f32_to_bf16(res[r * D + j]);
                    else ((float *)out)[at + j] = res[r * D + j];
                }
            }
        }
    }
    free(kt); free(vf); free(sc); free(qr); free(res);
    return 0;
}

/* ---- the grammar mask: -inf in each row's tokens whose bit is clear ----
 * (llguidance's layout: token t is bit t % 32 of word t / 32). The sampler's logits are
 * float32; words with every bit set (the common case inside strings) are skipped. */
void apply_token_bitmask(float *logits, int64_t logits_stride, const int32_t *mask,
                         int64_t mask_stride, int batch, int vocab) {
    for (int b = 0; b < batch; b++) {
        float *row = logits + (int64_t)b * logits_stride;
        const int32_t *words = mask + (int64_t)b * mask_stride;
        for (int w = 0; w * 32 < vocab; w++) {
            const uint32_t m = (uint32_t)words[w];
            if (m == 0xFFFFFFFFu) continue;
            const int end = vocab - w * 32 < 32 ? vocab - w * 32 : 32;
            for (int j = 0; j < end; j++)
                if (!((m >> j) & 1u)) row[w * 32 + j] = -INFINITY;
        }
    }
}
