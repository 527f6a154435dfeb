/* bf16 projections of one or two rows (a decode step at batch 1-2) on AVX512-BF16.
 *
 * Why: oneDNN's linear costs a fixed ~11-45 us a call on this project's CI CPU whatever
 * the weight's size, and a small model's decode step makes 17 of them for a few hundred KB
 * of weights each (two thirds of a batch-1 step; bench/RESULTS.md, issue 15 run 12). Here
 * a call is the weight read once: sixteen output columns at a time, each a dot product of
 * the row with one weight row by the bf16 dot instruction (exact products, float32 sums),
 * the sixteen sums gathered by sum_each16, the bias added in float32, rounded once to bf16.
 * kernels/cpu_native.py builds it with -mavx512bf16 and uses it only where the CPU has it.
 *
 * x: [rows][k] bf16, row stride x_stride; w: [n][k] bf16, row-major; bias: [n] bf16 or
 * NULL; out: [rows][n] bf16, row stride out_stride. k a multiple of 32. */

#include "cpu_vector.h"

int gemv_bf16(const uint16_t *x, int64_t x_stride, int rows, const uint16_t *w, int n, int k,
              const uint16_t *bias, uint16_t *out, int64_t out_stride) {
    if (k % 32 != 0 || rows < 1 || rows > 2) return -2;
    const int chunks = k / 32;
    for (int n0 = 0; n0 < n; n0 += 16) {
        const int count = n - n0 < 16 ? n - n0 : 16;
        __m512 p[2][16];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < 16; j++) p[r][j] = _mm512_setzero_ps();
        for (int j = 0; j < count; j++) {
            const uint16_t *wr = w + (int64_t)(n0 + j) * k;
            for (int c = 0; c < chunks; c++) {
                const __m512bh wc = (__m512bh)_mm512_loadu_si512(wr + c * 32);
                for (int r = 0; r < rows; r++)
                    p[r][j] = _mm512_dpbf16_ps(
                        p[r][j], (__m512bh)_mm512_loadu_si512(x + r * x_stride + c * 32), wc);
            }
        }
        for (int r = 0; r < rows; r++) {
            __m512 y = sum_each16(p[r]);
            float v[16];
            _mm512_storeu_ps(v, y);
            uint16_t *o = out + r * out_stride + n0;
            for (int j = 0; j < count; j++)
                o[j] = f32_to_bf16(v[j] + (bias ? bf16_to_f32(bias[n0 + j]) : 0.0f));
        }
    }
    return 0;
}
