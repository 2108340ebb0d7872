/* The few-columns product's block (weight_kernel.c: few_columns_product; infer/decode_layer.c): 4 rows of a weight
   (out, in) times 1 to FEW columns, each column's inputs contiguous, 16 inputs of each row against 16 of each column
   at a time, the weight streamed once. For 2 or more columns the 4 rows go side by side and the next block's rows are
   asked for on the way into the outer caches, whose columns' vectors then stay in the first level (a 135M model's
   decode step through infer/decode_layer.c, the two ways taking turns step by step, medians of 180 steps on a
   2-core EPYC: 2 rows 22.3 against 25.9 ms, 3 rows 20.9 against 26.4, 4 rows 23.6 against 28.6). For one column the
   rows go one after the other, each thread's weight one stream front to back, asking the second level for the bytes
   4 KiB ahead: a 135M model's products and head at one column (538 MB) took 17.5 against 19.1 ms with the 4 rows side
   by side and the next ones asked into the first level (medians of 41 passes, the two taking turns; a plain read of
   as many bytes: 16.2 ms). Either way each output is one 16-lane sum over the inputs in order, summed across its
   lanes, then the inputs past the last multiple of 16: the same bits. */

#ifndef LORAKIT_FEW_COLUMNS_H
#define LORAKIT_FEW_COLUMNS_H

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#define FEW 4 /* the most columns few_columns_product takes */
#define FEW_AHEAD 1024 /* floats ahead that one column's stream asks for (4 KiB) */

/* block o's 4 rows (past the last row: row o again) times N columns of xt, 16 inputs a step: 4 N sums in registers,
   each summed across its lanes at the end, then the inputs past the last multiple of 16 in order */
static inline __attribute__((always_inline)) void few_block(const float *W, const float *xt, float *y, int64_t out,
                                                            int64_t in, const int N, int64_t o) {
    int64_t rows = out - o < 4 ? out - o : 4, body = in - in % 16;
    if (N == 1) { /* one stream: row after row, the second level asked for what comes 4 KiB later */
        for (int64_t r = 0; r < rows; r++) {
            const float *wr = W + (o + r) * in;
            v16 a = {0};
            for (int64_t i = 0; i < body; i += 16) {
                __builtin_prefetch(wr + FEW_AHEAD + i, 0, 2);
                a += *(const v16u *)(wr + i) * *(const v16u *)(xt + i);
            }
            float s = 0.f;
            for (int l = 0; l < 16; l++) s += a[l];
            for (int64_t i = body; i < in; i++) s += wr[i] * xt[i];
            y[o + r] = s;
        }
        return;
    }
    const float *w[4];
    for (int r = 0; r < 4; r++) w[r] = W + (o + (r < rows ? r : 0)) * in;
    const float *next = W + (o + 4) * in; /* the next block's rows, 4 cache lines asked for every 16 inputs */
    v16 zero = {0}, a[4][FEW];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < N; c++) a[r][c] = zero;
    for (int64_t i = 0; i < body; i += 16) {
        if (o + 4 < out)
            for (int k = 0; k < 4; k++) __builtin_prefetch(next + 4 * i + 16 * k, 0, 1);
        v16 xv[FEW];
        for (int c = 0; c < N; c++) xv[c] = *(const v16u *)(xt + c * in + i);
        for (int r = 0; r < 4; r++) {
            v16 wv = *(const v16u *)(w[r] + i);
            for (int c = 0; c < N; c++) a[r][c] += wv * xv[c];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < N; c++) {
            float s = 0.f;
            for (int l = 0; l < 16; l++) s += a[r][c][l];
            for (int64_t i = body; i < in; i++) s += w[r][i] * xt[c * in + i];
            y[(o + r) * N + c] = s;
        }
}

/* block o of W (rows o to o + 3) times n columns, n a constant in each case so that the sums stay in registers */
static inline void few_rows(const float *W, const float *xt, float *y, int64_t out, int64_t in, int64_t n,
                            int64_t o) {
    switch (n) {
    case 1: few_block(W, xt, y, out, in, 1, o); break;
    case 2: few_block(W, xt, y, out, in, 2, o); break;
    case 3: few_block(W, xt, y, out, in, 3, o); break;
    default: few_block(W, xt, y, out, in, 4, o); break;
    }
}

#endif
