/* The w8a8 product for 1 to FEW columns (weight_kernel.c: w8a8_product; infer/decode_layer.c). weight_kernel.c's
   16-column loop multiplies every weight by 16 columns whatever n is, so at one to a few columns it computes rather
   than reads. Here a thread takes 16 weight rows at a time, 64 inputs (two blocks of 32) of each row against the same
   64 of each column's q, one vpdpbusd each, and asks the second level for the next 16 rows on the way; the 16 rows'
   sums are then added across their lanes into one vector per block, lane r for row r, and each block goes into the
   rows' fp32 sums in order, as the 16-column loop adds them: the same integer sums, the same multiply-adds, the same
   bits. A 135M model's int8 products and head at one column (135 MB), the C calls alone, the two loops taking turns:
   6.8 against 9.7 ms (medians of 15; a plain read of as many bytes: 4.7 ms). */

#ifndef LORAKIT_W8A8_ROWS_H
#define LORAKIT_W8A8_ROWS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "few_columns.h" /* v16, FEW */

typedef int32_t i16v __attribute__((vector_size(64)));
typedef int32_t i16vu __attribute__((vector_size(64), aligned(4)));

/* each of n columns xt (n, in), its inputs contiguous, rounded per block of 32 as the 16-column loop rounds them
   (d = max |x| / 127, q = x 127 / max |x| rounded half to even; a block of zeros: d = 0, q = 0): q (n, in), d and
   the sum of q (n, in / 32) */
static void quantize_columns(const float *xt, int64_t in, int64_t n, int8_t *q, float *d, int32_t *sums) {
    for (int64_t c = 0; c < n; c++)
        for (int64_t b = 0; b < in / 32; b++) {
            const float *x = xt + c * in + b * 32;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = amax > fabsf(x[i]) ? amax : fabsf(x[i]); /* as _mm512_max_ps */
            float inverse = amax > 0.f ? 127.f / amax : 0.f;
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) {
                int32_t v = (int32_t)nearbyintf(x[i] * inverse);
                q[c * in + b * 32 + i] = (int8_t)v;
                sum += v;
            }
            d[c * (in / 32) + b] = amax / 127.f;
            sums[c * (in / 32) + b] = sum;
        }
}

/* t[r]: lanes 0-7 the partial sums of block 2k of row r, lanes 8-15 those of block 2k + 1; *even, *odd: each row's
   whole sums (lane r), by adding neighbouring lanes and then neighbouring rows' vectors, as a transpose would */
static inline __attribute__((always_inline)) void row_sums(const __m512i t[16], __m512i *even, __m512i *odd) {
    __m512i x[8], y[4];
    for (int m = 0; m < 8; m++) /* each 128-bit quarter: rows 2m, 2m + 1, two partial sums each */
        x[m] = _mm512_add_epi32(_mm512_unpacklo_epi32(t[2 * m], t[2 * m + 1]),
                                _mm512_unpackhi_epi32(t[2 * m], t[2 * m + 1]));
    for (int m = 0; m < 4; m++) /* quarter q: the sum of lanes 4q .. 4q + 3 of rows 4m .. 4m + 3 */
        y[m] = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2 * m], x[2 * m + 1]),
                                _mm512_unpackhi_epi64(x[2 * m], x[2 * m + 1]));
    __m512i p01 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[0], y[1], 0x88), _mm512_shuffle_i32x4(y[0], y[1], 0xdd));
    __m512i p23 = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2], y[3], 0x88), _mm512_shuffle_i32x4(y[2], y[3], 0xdd));
    *even = _mm512_shuffle_i32x4(p01, p23, 0x88); /* quarters: rows 0-3, 4-7, 8-11, 12-15 */
    *odd = _mm512_shuffle_i32x4(p01, p23, 0xdd);
}

/* blocks b and b + 1 (or b alone: `bytes` its 32) of rows o .. o + 15 against column c's q, into the rows' sums f */
static inline __attribute__((always_inline)) v16 w8a8_step(const int8_t *w, const int64_t at[16], const int8_t *qc,
                                                           const float *dc, const int32_t *sc, int64_t b, int two,
                                                           v16 f) {
    const __m512i flip = _mm512_set1_epi32((int32_t)0x80808080u);
    __mmask64 bytes = two ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
    __m512i qv = _mm512_maskz_loadu_epi8(bytes, qc + b * 32), t[16], even, odd;
    for (int r = 0; r < 16; r++)
        t[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                   _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, w + at[r] + b * 32), flip), qv);
    row_sums(t, &even, &odd);
    f += __builtin_convertvector((i16v)even - sc[b] * 128, v16) * dc[b];
    if (two) f += __builtin_convertvector((i16v)odd - sc[b + 1] * 128, v16) * dc[b + 1];
    return f;
}

/* rows o .. o + 15 (past the last row: row o again, not stored) times N <= FEW columns: q (N, in) each column's
   rounded inputs, d and sums (N, in / 32) */
static inline __attribute__((always_inline)) void w8a8_rows16(const int8_t *Q, const float *scales, const int8_t *q,
                                                              const float *d, const int32_t *sums, float *y,
                                                              int64_t out, int64_t in, const int N, int64_t o) {
    int64_t rows = out - o < 16 ? out - o : 16, groups = in / 32, pairs = groups - groups % 2;
    const int8_t *w = Q + o * in;
    int64_t at[16]; /* each row's offset from w (past the last row: row o's) */
    for (int r = 0; r < 16; r++) at[r] = (r < rows ? r : 0) * in;
    v16 f[FEW];
    for (int c = 0; c < N; c++) f[c] = (v16){0};
    const char *next = (const char *)(w + 16 * in); /* the next 16 rows, 16 * 64 bytes of them asked for each step */
    for (int64_t b = 0; b < pairs; b += 2) { /* a second column reads the rows' bytes again from the first level */
        if (o + 16 < out)
            for (int k = 0; k < 16; k++) __builtin_prefetch(next + b * 512 + 64 * k, 0, 2);
        for (int c = 0; c < N; c++) f[c] = w8a8_step(w, at, q + c * in, d + c * groups, sums + c * groups, b, 1, f[c]);
    }
    if (pairs < groups)
        for (int c = 0; c < N; c++)
            f[c] = w8a8_step(w, at, q + c * in, d + c * groups, sums + c * groups, pairs, 0, f[c]);
    for (int c = 0; c < N; c++)
        for (int r = 0; r < rows; r++) y[(o + r) * N + c] = f[c][r] * scales[o + r];
}

/* rows o .. o + 15 of y (out, n) = diag(scales) Q xq for n <= FEW columns (quantize_columns' q, d, sums) */
static inline void w8a8_rows(const int8_t *Q, const float *scales, const int8_t *q, const float *d, const int32_t *sums,
                             float *y, int64_t out, int64_t in, int64_t n, int64_t o) {
    switch (n) { /* N a constant in each case: the sums stay in registers */
    case 1: w8a8_rows16(Q, scales, q, d, sums, y, out, in, 1, o); break;
    case 2: w8a8_rows16(Q, scales, q, d, sums, y, out, in, 2, o); break;
    case 3: w8a8_rows16(Q, scales, q, d, sums, y, out, in, 3, o); break;
    default: w8a8_rows16(Q, scales, q, d, sums, y, out, in, 4, o); break;
    }
}

#endif
