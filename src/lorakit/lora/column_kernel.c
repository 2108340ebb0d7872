/* Each column's own LoRA term: y[:, b] += (s B)_b A_b x[:, b], fp32.

   Column b of x (in, n) and y (out, n) goes through the adapter whose rank rows are
   first[b] .. first[b] + count[b] - 1 of A (rows of `in` floats) and of BT ((s B)^T: rows of `out`
   floats); count[b] == 0 leaves the column alone. Every column reads only its own adapter's ranks,
   so a batch of n columns over n adapters does the arithmetic of n single-adapter products, where
   side-by-side products with a mask do n times that.

   Columns are split over the caller's OpenMP threads (the process's libgomp, shared with torch),
   and each column computes its term into its own row of `work` (in + out floats a column). Where
   a column's outputs are contiguous (y_feature == 1: row-major outputs, a prompt's tokens), it
   adds that row to y itself. Where they are strided (a decode step's feature-major y), one cache
   line of y holds one output of every column, and threads writing their own columns would fight
   over it: a second pass splits y by outputs over the threads, each adding every column's term
   to its outputs. Either way a column's term is summed the same way, so the two layouts agree to
   the bit.

   Built by lorakit/lora/column_kernel.py with the system's C compiler. */

#include <stdint.h>

static void down(const float *restrict xb, const float *restrict A, int64_t in, int64_t count,
                 float *restrict h) {
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const float *a0 = A + j * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < in; i++) {
            float v = xb[i];
            s0 += a0[i] * v;
            s1 += a1[i] * v;
            s2 += a2[i] * v;
            s3 += a3[i] * v;
        }
        h[j] = s0, h[j + 1] = s1, h[j + 2] = s2, h[j + 3] = s3;
    }
    for (; j < count; j++) {
        const float *a = A + j * in;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < in; i++) s += a[i] * xb[i];
        h[j] = s;
    }
}

/* d[o] += sum_j h[j] BT[j][o] */
static void up(const float *restrict h, const float *restrict BT, int64_t out, int64_t count,
               float *restrict d) {
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
        const float *b0 = BT + j * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;
        float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
#pragma omp simd
        for (int64_t o = 0; o < out; o++) d[o] += h0 * b0[o] + h1 * b1[o] + h2 * b2[o] + h3 * b3[o];
    }
    for (; j < count; j++) {
        const float *b = BT + j * out;
        float hj = h[j];
#pragma omp simd
        for (int64_t o = 0; o < out; o++) d[o] += hj * b[o];
    }
}

/* Returns 0, or 1 when a column's ranks lie outside the W rank rows (nothing is written then). `work` holds
   n * (in + out) floats. */
int lora_columns(const float *x, int64_t in, int64_t n, int64_t x_feature, int64_t x_column,
                 const float *A, const float *BT, int64_t W, int64_t out, const int64_t *first, const int64_t *count,
                 int64_t max_rank, float *y, int64_t y_feature, int64_t y_column, float *work, int threads) {
    for (int64_t b = 0; b < n; b++)
        if (count[b] < 0 || count[b] > max_rank || (count[b] && (first[b] < 0 || first[b] + count[b] > W)))
            return 1;
    if (y_feature == 1) {
#pragma omp parallel num_threads(threads)
        {
            float h[max_rank > 0 ? max_rank : 1];
#pragma omp for schedule(static)
            for (int64_t b = 0; b < n; b++) {
                if (count[b] == 0) continue;
                const float *xb = x + b * x_column;
                float *d = work + b * (in + out) + in, *yb = y + b * y_column;
                if (x_feature != 1) {
                    float *gathered = d - in;
                    for (int64_t i = 0; i < in; i++) gathered[i] = xb[i * x_feature];
                    xb = gathered;
                }
                down(xb, A + first[b] * in, in, count[b], h);
                for (int64_t o = 0; o < out; o++) d[o] = 0.f;
                up(h, BT + first[b] * out, out, count[b], d);
#pragma omp simd
                for (int64_t o = 0; o < out; o++) yb[o] += d[o];  /* as the strided pass adds it: the same sums */
            }
        }
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        float h[max_rank > 0 ? max_rank : 1];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n; b++) {
            if (count[b] == 0) continue;
            float *xb = work + b * (in + out), *d = xb + in;
            const float *column = x + b * x_column;
            for (int64_t i = 0; i < in; i++) xb[i] = column[i * x_feature];
            down(xb, A + first[b] * in, in, count[b], h);
            for (int64_t o = 0; o < out; o++) d[o] = 0.f;
            up(h, BT + first[b] * out, out, count[b], d);
        }
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            float *row = y + o * y_feature;
            for (int64_t b = 0; b < n; b++)
                if (count[b]) row[b * y_column] += work[b * (in + out) + in + o];
        }
    }
    return 0;
}
