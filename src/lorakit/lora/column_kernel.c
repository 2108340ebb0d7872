/* Each column's own LoRA term: y[:, b] += (s B)_b A_b x[:, b], fp32.

   Column b of x (in, n) and y (out, n) goes through the adapter whose rank rows are
   first[b] .. first[b] + count[b] - 1 of A (rows of `in` floats) and of BT ((s B)^T: rows of `out`
   floats); count[b] == 0 leaves the column alone. Every column reads only its own adapter's ranks,
   so a batch of n columns over n adapters does the arithmetic of n single-adapter products, where
   side-by-side products with a mask do n times that.

   Blocks of four columns are split over the caller's OpenMP threads (the process's libgomp, shared
   with torch); four columns through the same ranks (a prompt's tokens) go together, each factor row
   loaded once for the four. Where a column's outputs are contiguous (y_feature == 1: row-major
   outputs), each column adds its term to its row of y as it computes it. Where they are strided (a
   decode step's feature-major y), one cache line of y holds one output of every column, and threads
   writing their own columns would fight over it: each column's term goes into its own row of `work`
   (in + out floats a column), and a second pass splits y by outputs over the threads, each adding
   every column's term to its outputs. Either way a column's term is summed the same way, so the two
   layouts agree to the bit.

   lora_lanes computes the same terms for a decode step's contiguous columns, for every layer of a
   sibling group fed the same x (q/k/v, gate/up) in one call, from the factors laid out by slot
   lanes: the ranks of slots 16 g + 1 .. 16 g + 16 interleaved, so that one 16-float vector holds
   rank j, feature i of all sixteen slots. Column c's lane is moved into column c's vector position
   with one shuffle, and a block of 16 columns advances through the factors as one stream of full
   vectors: no gather of x, no transpose of the outputs, the factors read front to back. It sums in
   another order than lora_columns (four partial sums over the inputs), so the two agree to fp32
   rounding, not to the bit.

   Built by lorakit/native.py, for lorakit/lora/column_kernel.py. */

#include "lanes.h" /* v16, i16, and the lane layouts' factor types */

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

/* A block of four columns through the same adapter (a prompt's tokens): each A and BT row is loaded once for
   the four, where one column at a time loads it four times. */
static inline float sum16(v16 v) {  /* a fixed order: the same bits wherever it runs */
    v16 w = v;
    float s[16];
    for (int l = 0; l < 16; l++) s[l] = w[l];
    for (int l = 0; l < 8; l++) s[l] += s[l + 8];
    for (int l = 0; l < 4; l++) s[l] += s[l + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* h[c * count + j] = A_j x_c for the four columns x_c */
static void down4(const float *const xs[4], const float *A, int64_t in, int64_t count, float *h) {
    for (int64_t j = 0; j < count; j++) {
        const float *a = A + j * in;
        v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int64_t i = 0;
        for (; i + 16 <= in; i += 16) {
            v16 av = *(const v16u *)(a + i);
            s0 += av * *(const v16u *)(xs[0] + i);
            s1 += av * *(const v16u *)(xs[1] + i);
            s2 += av * *(const v16u *)(xs[2] + i);
            s3 += av * *(const v16u *)(xs[3] + i);
        }
        float t[4] = {sum16(s0), sum16(s1), sum16(s2), sum16(s3)};
        for (; i < in; i++)
            for (int c = 0; c < 4; c++) t[c] += a[i] * xs[c][i];
        for (int c = 0; c < 4; c++) h[c * count + j] = t[c];
    }
}

/* d_c[o] = sum_j h[c * count + j] BT[j][o], j in order, for the four columns; added to ds[c] where `add`, else
   stored there */
static void up4(const float *h, const float *BT, int64_t out, int64_t count, float *const ds[4], int add) {
    int64_t o = 0;
    for (; o + 16 <= out; o += 16) {
        v16 d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};
        for (int64_t j = 0; j < count; j++) {
            v16 b = *(const v16u *)(BT + j * out + o);
            d0 += h[j] * b, d1 += h[count + j] * b, d2 += h[2 * count + j] * b, d3 += h[3 * count + j] * b;
        }
        if (add) {
            *(v16u *)(ds[0] + o) += d0, *(v16u *)(ds[1] + o) += d1, *(v16u *)(ds[2] + o) += d2;
            *(v16u *)(ds[3] + o) += d3;
        } else {
            *(v16u *)(ds[0] + o) = d0, *(v16u *)(ds[1] + o) = d1, *(v16u *)(ds[2] + o) = d2, *(v16u *)(ds[3] + o) = d3;
        }
    }
    for (; o < out; o++)
        for (int c = 0; c < 4; c++) {
            float d = 0.f;
            for (int64_t j = 0; j < count; j++) d += h[c * count + j] * BT[j * out + o];
            ds[c][o] = add ? ds[c][o] + d : d;
        }
}

/* Column b's term, by blocks: four columns through the same ranks together, any other column alone. Added to
   y's row b where y's rows are contiguous (y_row: y + b * y_column; else NULL), else stored in work's row b (x
   in its first `in` floats where gathered, the term after them) for the strided pass. */
static void terms(const float *x, int64_t in, int64_t n, int64_t x_feature, int64_t x_column, const float *A,
                  const float *BT, int64_t out, const int64_t *first, const int64_t *count, int64_t max_rank,
                  float *y_row, int64_t y_column, float *work, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float h[4 * (max_rank > 0 ? max_rank : 1)];
#pragma omp for schedule(static)
        for (int64_t k = 0; k < (n + 3) / 4; k++) {
            int64_t b0 = 4 * k, width = n - b0 < 4 ? n - b0 : 4, together = width == 4;
            for (int64_t b = b0 + 1; b < b0 + width; b++)
                together &= first[b] == first[b0] && count[b] == count[b0];
            const float *xs[4];
            float *ds[4];
            for (int64_t c = 0; c < width; c++) {
                int64_t b = b0 + c;
                float *row = work + b * (in + out);
                xs[c] = x + b * x_column, ds[c] = row + in;
                if (count[b] && x_feature != 1) {
                    for (int64_t i = 0; i < in; i++) row[i] = xs[c][i * x_feature];
                    xs[c] = row;
                }
            }
            if (together && count[b0]) {
                float *ys[4];
                for (int c = 0; c < 4; c++) ys[c] = y_row ? y_row + (b0 + c) * y_column : ds[c];
                down4(xs, A + first[b0] * in, in, count[b0], h);
                up4(h, BT + first[b0] * out, out, count[b0], ys, y_row != 0);
                continue;
            }
            for (int64_t c = 0; c < width; c++) {
                int64_t b = b0 + c;
                if (count[b] == 0) continue;
                down(xs[c], A + first[b] * in, in, count[b], h);
                for (int64_t o = 0; o < out; o++) ds[c][o] = 0.f;
                up(h, BT + first[b] * out, out, count[b], ds[c]);
                if (y_row) {
                    float *yb = y_row + b * y_column;
#pragma omp simd
                    for (int64_t o = 0; o < out; o++) yb[o] += ds[c][o];  /* as the strided pass adds it */
                }
            }
        }
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
    if (y_feature == 1) {  /* each column's outputs contiguous: a row of y each, added as computed */
        terms(x, in, n, x_feature, x_column, A, BT, out, first, count, max_rank, y, y_column, work, threads);
        return 0;
    }
    terms(x, in, n, x_feature, x_column, A, BT, out, first, count, max_rank, 0, 0, work, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        float *row = y + o * y_feature;
        for (int64_t b = 0; b < n; b++)
            if (count[b]) row[b * y_column] += work[b * (in + out) + in + o];
    }
    return 0;
}

/* Segments of consecutive columns through the same adapter (a prompt pass's tokens side by side), feature-major
   x (in, n) and y (out, n) with contiguous columns (row strides x_feature, y_feature): segment k covers columns
   start[k] .. start[k] + length[k] - 1, through rank rows first[k] .. first[k] + count[k] - 1 of A (W, in) and of
   (s B) (out, W). Blocks of 16 columns of a segment: h (ranks, 16) = A_k x_block, eight ranks at a time held in
   registers along x's rows (one A value times a row's 16 columns); then each output row o of y gets
   sum_j (s B)[o][j] h[j] over each block's columns, four rows at a time. The factors are read once a segment,
   the inputs and outputs along their rows, nothing gathered or transposed. `work` holds
   sum_k count[k] * 16 * ceil(length[k] / 16) floats of the work_floats given. Returns 0, 1 for a segment outside
   the columns or its ranks outside the W rank rows, or 2 for too small a `work` (nothing is written then). */
static inline v16 block_of(const float *p, int64_t w, int full) { /* w <= 16 floats at p, the rest any values */
    if (w == 16 || full) return *(const v16u *)p; /* `full`: 16 floats at p lie inside the tensor */
    v16 v = {0};
    for (int64_t l = 0; l < w; l++) v[l] = p[l];
    return v;
}

static const i16 LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

int lora_segments(const float *x, int64_t in, int64_t n, int64_t x_feature, const float *A, const float *B,
                  int64_t W, int64_t out, int64_t segments, const int64_t *start, const int64_t *length,
                  const int64_t *first, const int64_t *count, float *y, int64_t y_feature, float *work,
                  int64_t work_floats, int threads) {
    int64_t offset[segments + 1];
    offset[0] = 0;
    for (int64_t k = 0; k < segments; k++) {
        if (start[k] < 0 || length[k] < 0 || start[k] + length[k] > n || count[k] < 0 ||
            (count[k] && (first[k] < 0 || first[k] + count[k] > W)))
            return 1;
        offset[k + 1] = offset[k] + count[k] * 16 * ((length[k] + 15) / 16);
    }
    if (offset[segments] > work_floats) return 2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t k = 0; k < segments; k++) /* h = A_k x, a block of 16 columns and 8 ranks at a time */
            for (int64_t j0 = 0; j0 < W; j0 += 8) {
                int64_t ranks = count[k];
                if (j0 >= ranks) continue;
                const float *a[8];
                for (int r = 0; r < 8; r++) a[r] = A + (first[k] + (j0 + r < ranks ? j0 + r : ranks - 1)) * in;
                for (int64_t l0 = 0; l0 < length[k]; l0 += 16) {
                    int64_t w = length[k] - l0 < 16 ? length[k] - l0 : 16;
                    int64_t inside = start[k] + l0 + 16 <= n; /* else only the rows before the last run on */
                    const float *xs = x + start[k] + l0;
                    v16 s[8] = {{0}};
                    for (int64_t i = 0; i < in; i++) {
                        v16 xv = block_of(xs + i * x_feature, w, inside || i + 1 < in);
                        for (int r = 0; r < 8; r++) s[r] += a[r][i] * xv;
                    }
                    float *h = work + offset[k] + l0 * ranks; /* the block's (ranks, 16) */
                    for (int r = 0; r < 8 && j0 + r < ranks; r++) *(v16u *)(h + (j0 + r) * 16) = s[r];
                }
            }
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < out; o0 += 4) { /* y[o] += sum_j (s B)[o][j] h[j] over each block's columns */
            int rows = out - o0 < 4 ? (int)(out - o0) : 4;
            for (int64_t k = 0; k < segments; k++) {
                int64_t ranks = count[k];
                const float *b[4];
                for (int r = 0; r < 4; r++) b[r] = B + (o0 + (r < rows ? r : 0)) * W + first[k];
                for (int64_t l0 = 0; l0 < length[k]; l0 += 16) {
                    int64_t w = length[k] - l0 < 16 ? length[k] - l0 : 16;
                    const float *h = work + offset[k] + l0 * ranks;
                    v16 d[4] = {{0}};
                    for (int64_t j = 0; j < ranks; j++) {
                        v16 hj = *(const v16u *)(h + j * 16);
                        for (int r = 0; r < 4; r++) d[r] += b[r][j] * hj;
                    }
                    for (int r = 0; r < rows; r++) {
                        float *yk = y + (o0 + r) * y_feature + start[k] + l0;
                        if (w == 16)
                            *(v16u *)yk += d[r];
                        else if (start[k] + l0 + 16 <= n) /* the row's next columns: read, written back as they are */
                            *(v16u *)yk += (v16)((i16)d[r] & (LANE < (int32_t)w));
                        else
                            for (int64_t l = 0; l < w; l++) yk[l] += d[r][l];
                    }
                }
            }
        }
    }
    return 0;
}

/* How far ahead (in lane elements) the lane loops ask for the factors they will read: 2 KiB, about 7% faster than
   the hardware's own prefetching alone on a 2-core EPYC (bench: 210 calls of a 135M model's shapes). A
   prefetch past the end of the factors is harmless: it never faults. */
#define AHEAD (2048 / (int64_t)sizeof(lane_t))

#define MEMBERS 4  /* layers of a sibling group (q/k/v, gate/up) one lora_lanes call serves at most */

/* For each member m of a sibling group fed the same x[i * x_feature + b * x_column]: y_m[o * y_feature_m + b] +=
   each column's LoRA term (y_m's columns contiguous), from the lane layouts AL (groups, R, in, 16), the members'
   ranks one after the other (member m's from rank0_m, ranks_m of them), and BL_m (groups, out_m, ranks_m, 16);
   lane l of group g holds slot 16 g + l + 1 (zero ranks past a slot's own); SL (groups, R, 16), where not null,
   the factor each slot's rank j of A x is multiplied by (int8 lanes: both factors' scales). table holds rank0,
   ranks, out and y_feature of each member. lane[b]: column b's lane over all groups (its slot - 1), or -1 for a
   column left alone. `work` holds 16 * in + groups * R * 16 floats. Returns 0, or 1 when a lane lies outside the groups or
   a member's ranks outside R (nothing is written then). */
int lora_lanes(const float *x, int64_t in, int64_t n, int64_t x_feature, int64_t x_column, const lane_t *AL,
               const float *SL, int64_t groups, int64_t R, const int64_t *lane, int64_t members, const int64_t *table,
               const lane_t *BL0, const lane_t *BL1, const lane_t *BL2, const lane_t *BL3,
               float *y0, float *y1, float *y2, float *y3, float *work, int threads) {
    const lane_t *BL[MEMBERS] = {BL0, BL1, BL2, BL3};
    float *Y[MEMBERS] = {y0, y1, y2, y3};
    int64_t start[MEMBERS + 1] = {0};  /* where each member's outputs start among all members' */
    if (members < 1 || members > MEMBERS) return 1;
    for (int64_t m = 0; m < members; m++) {
        const int64_t *row = table + 4 * m;
        if (row[0] < 0 || row[1] < 0 || row[0] + row[1] > R || row[2] < 0) return 1;
        start[m + 1] = start[m] + row[2];
    }
    for (int64_t b = 0; b < n; b++)
        if (lane[b] < -1 || lane[b] >= 16 * groups) return 1;
    if (R <= 0 || groups <= 0) return 0;
    for (int64_t c = 0; c < n; c += 16) {
        int64_t width = n - c < 16 ? n - c : 16;
        i16 idx[groups], in_group[groups], touched = {0};
        int used[groups];
        for (int64_t g = 0; g < groups; g++) {
            used[g] = 0;
            for (int l = 0; l < 16; l++) {
                int64_t s = l < width && lane[c + l] >= 0 ? lane[c + l] - 16 * g : -1;
                int inside = s >= 0 && s < 16;
                idx[g][l] = inside ? (int32_t)s : 0;
                in_group[g][l] = inside ? -1 : 0;
                used[g] |= inside;
            }
            touched |= in_group[g];
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
                const lane_t *a = AL + t * in * 16;
                v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                int64_t i = 0;
                for (; i + 4 <= in; i += 4) {
                    __builtin_prefetch(a + i * 16 + AHEAD, 0, 0);
                    s0 += lanes_of(a + i * 16, idx[g]) * *(const v16u *)(xb + i * stride);
                    s1 += lanes_of(a + i * 16 + 16, idx[g]) * *(const v16u *)(xb + (i + 1) * stride);
                    s2 += lanes_of(a + i * 16 + 32, idx[g]) * *(const v16u *)(xb + (i + 2) * stride);
                    s3 += lanes_of(a + i * 16 + 48, idx[g]) * *(const v16u *)(xb + (i + 3) * stride);
                }
                for (; i < in; i++) s0 += lanes_of(a + i * 16, idx[g]) * *(const v16u *)(xb + i * stride);
                *(v16u *)(h + t * 16) = scaled((s0 + s1) + (s2 + s3), SL ? SL + t * 16 : 0, idx[g]);
            }
#pragma omp for schedule(static)
            for (int64_t all = 0; all < start[members]; all++) {  /* the members' outputs, one after the other */
                int64_t m = 0;
                while (all >= start[m + 1]) m++;
                const int64_t *row = table + 4 * m;
                int64_t o = all - start[m], ranks = row[1], out = row[2];
                if (ranks == 0) continue;
                v16 term = {0};  /* y[o] += sum_j (s B)[o][j] h[j], each column from its group */
                for (int64_t g = 0; g < groups; g++) {
                    if (!used[g]) continue;
                    const lane_t *bl = BL[m] + (g * out + o) * ranks * 16;
                    const float *hg = h + (g * R + row[0]) * 16;
                    __builtin_prefetch(bl + AHEAD, 0, 0), __builtin_prefetch(bl + AHEAD + 16, 0, 0);
                    v16 d = lanes_of(bl, idx[g]) * *(const v16u *)hg;
                    for (int64_t j = 1; j < ranks; j++)
                        d += lanes_of(bl + j * 16, idx[g]) * *(const v16u *)(hg + j * 16);
                    term = (v16)(((i16)d & in_group[g]) | ((i16)term & ~in_group[g]));
                }
                float *yo = Y[m] + o * row[3] + c;
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
