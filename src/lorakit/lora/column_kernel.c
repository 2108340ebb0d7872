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

   lora_lanes computes the same terms for a decode step's contiguous columns from the factors laid
   out by slot lanes: the ranks of slots 16 g + 1 .. 16 g + 16 interleaved, so that one 16-float
   vector holds rank j, feature i of all sixteen slots. Column c's lane is moved into column c's
   vector position with one shuffle, and a block of 16 columns advances through the factors as one
   stream of full vectors: no gather of x, no transpose of the outputs, the factors read
   front to back. It sums in another order than lora_columns (four partial sums over the inputs),
   so the two agree to fp32 rounding, not to the bit.

   Built by lorakit/lora/column_kernel.py with the system's C compiler. */

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

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

/* the 16 floats at p, lane l taken from lane idx[l] */
static inline v16 lanes_of(const float *p, i16 idx) { return __builtin_shuffle(*(const v16u *)p, idx); }

/* y[o * y_feature + b] += each column's LoRA term (y's columns contiguous), for x[i * x_feature + b * x_column], from the
   lane layouts AL (groups, R, in, 16) and BL (groups, out, R, 16), where lane l of group g holds slot
   16 g + l + 1 (zero ranks past a slot's own). lane[b]: column b's lane over all groups (its slot - 1), or -1
   for a column left alone. `work` holds 16 * in + groups * R * 16 floats. Returns 0, or 1 when a lane lies
   outside the groups (nothing is written then). */
int lora_lanes(const float *x, int64_t in, int64_t n, int64_t x_feature, int64_t x_column, const float *AL, const float *BL,
               int64_t groups, int64_t R, int64_t out, const int64_t *lane, float *y, int64_t y_feature,
               float *work, int threads) {
    for (int64_t b = 0; b < n; b++)
        if (lane[b] < -1 || lane[b] >= 16 * groups) return 1;
    if (R <= 0 || groups <= 0) return 0;
    for (int64_t c = 0; c < n; c += 16) {
        int64_t width = n - c < 16 ? n - c : 16;
        i16 idx[groups], member[groups], touched = {0};
        int used[groups];
        for (int64_t g = 0; g < groups; g++) {
            used[g] = 0;
            for (int l = 0; l < 16; l++) {
                int64_t s = l < width && lane[c + l] >= 0 ? lane[c + l] - 16 * g : -1;
                int inside = s >= 0 && s < 16;
                idx[g][l] = inside ? (int32_t)s : 0;
                member[g][l] = inside ? -1 : 0;
                used[g] |= inside;
            }
            touched |= member[g];
        }
        const float *xb = x + c * x_column;
        int64_t stride = x_feature;
        float *h = work + 16 * in;
        if (width < 16 || x_column != 1) {  /* strided columns, or a last partial block padded to a full vector */
            for (int64_t i = 0; i < in; i++)
                for (int l = 0; l < 16; l++) work[i * 16 + l] = l < width ? x[i * x_feature + (c + l) * x_column] : 0.f;
            xb = work, stride = 16;
        }
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < groups * R; t++) {  /* h[g][j] = A_j x for every column, lanes of group g */
                int64_t g = t / R;
                if (!used[g]) continue;
                const float *a = AL + t * in * 16;
                v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                int64_t i = 0;
                for (; i + 4 <= in; i += 4) {
                    s0 += lanes_of(a + i * 16, idx[g]) * *(const v16u *)(xb + i * stride);
                    s1 += lanes_of(a + i * 16 + 16, idx[g]) * *(const v16u *)(xb + (i + 1) * stride);
                    s2 += lanes_of(a + i * 16 + 32, idx[g]) * *(const v16u *)(xb + (i + 2) * stride);
                    s3 += lanes_of(a + i * 16 + 48, idx[g]) * *(const v16u *)(xb + (i + 3) * stride);
                }
                for (; i < in; i++) s0 += lanes_of(a + i * 16, idx[g]) * *(const v16u *)(xb + i * stride);
                *(v16u *)(h + t * 16) = (s0 + s1) + (s2 + s3);
            }
#pragma omp for schedule(static)
            for (int64_t o = 0; o < out; o++) {  /* y[o] += sum_j (s B)[o][j] h[j], each column from its group */
                v16 term = {0};
                for (int64_t g = 0; g < groups; g++) {
                    if (!used[g]) continue;
                    const float *bl = BL + (g * out + o) * R * 16, *hg = h + g * R * 16;
                    v16 d = lanes_of(bl, idx[g]) * *(const v16u *)hg;
                    for (int64_t j = 1; j < R; j++) d += lanes_of(bl + j * 16, idx[g]) * *(const v16u *)(hg + j * 16);
                    term = (v16)(((i16)d & member[g]) | ((i16)term & ~member[g]));
                }
                float *yo = y + o * y_feature + c;
                if (width == 16) {
                    v16 before = *(v16u *)yo;
                    *(v16u *)yo = (v16)(((i16)(before + term) & touched) | ((i16)before & ~touched));
                } else {
                    for (int l = 0; l < width; l++)
                        if (touched[l]) yo[l] += term[l];
                }
            }
        }
    }
    return 0;
}
