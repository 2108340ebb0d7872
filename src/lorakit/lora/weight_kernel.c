/* A decode step's base products: y (out, n) = W (out, in) x (in, n), fp32, x and y row-major (n columns).

   A decode step multiplies each weight by a few columns (one per row of the batch). BLAS libraries
   tile such a product for large matrices and reach a fraction of the CPU's speed at these shapes
   (MKL: about half of what this loop does at 8 to 64 columns on a 2-core EPYC). Here each thread
   takes blocks of 8 weight rows; each block goes through x 16 columns at a time, one 16-float
   vector of x per input feature and one broadcast weight per row, eight sums in registers, so that
   the weight streams through once, front to back, whatever n is. While a block computes it asks the
   memory for the next block's rows (one cache line every other input): eight short rows at a time
   are too short for the hardware's stream prefetchers to find, and without asking, a block waited on
   them (a 135M model's step of products: 17-18 ms without, 11 with). A last block of fewer than 16
   columns is read from a copy padded with zeros (`pad`, 16 * in floats). Every output is summed
   over the inputs in order, the same way for any n.

   Built by lorakit/native.py; called by lorakit/lora/weight_kernel.py. */

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

/* x's last, partial block of columns (n % 16 of them) copied into pad (16 per input), zeros past them */
static void pad_last_block(const float *x, int64_t in, int64_t n, float *pad) {
    int64_t tail = n % 16, first = n - tail;
    if (tail)
        for (int64_t i = 0; i < in; i++)
            for (int l = 0; l < 16; l++) pad[i * 16 + l] = l < tail ? x[i * n + first + l] : 0.f;
}

/* the rows of block o (8 from row o, fewer at the end: past the last row, row o again), elements of `size` bytes */
static int64_t block_rows(const char *W, int64_t out, int64_t in, int64_t size, int64_t o, const char *w[8]) {
    int64_t rows = out - o < 8 ? out - o : 8;
    for (int r = 0; r < 8; r++) w[r] = W + (o + (r < rows ? r : 0)) * in * size;
    return rows;
}

void weight_product(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t n, float *pad,
                    int threads) {
    int64_t blocks = (n + 15) / 16, tail = n % 16;
    pad_last_block(x, in, n, pad);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += 8) {
        const float *w[8];
        int64_t rows = block_rows((const char *)W, out, in, sizeof(float), o, (const char **)w);
        const char *next = (const char *)(W + (o + 8) * in);  /* the next block's 8 rows, asked for meanwhile */
        for (int64_t c = 0; c < blocks; c++) {
            int padded = tail && c == blocks - 1;
            const float *xb = padded ? pad : x + c * 16;
            int64_t stride = padded ? 16 : n, width = padded ? tail : 16;
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (int64_t i = 0; i < in; i++) {
                if (c == 0 && (i & 1) == 0) __builtin_prefetch(next + 32 * i, 0, 3);  /* 16 floats, every other input */
                v16 xv = *(const v16u *)(xb + i * stride);
                a0 += w[0][i] * xv, a1 += w[1][i] * xv, a2 += w[2][i] * xv, a3 += w[3][i] * xv;
                a4 += w[4][i] * xv, a5 += w[5][i] * xv, a6 += w[6][i] * xv, a7 += w[7][i] * xv;
            }
            v16 sums[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
            for (int r = 0; r < rows; r++) {
                float *yr = y + (o + r) * n + c * 16;
                if (width == 16)
                    *(v16u *)yr = sums[r];
                else
                    for (int l = 0; l < width; l++) yr[l] = sums[r][l];
            }
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>
/* 16 int8 weights widened to floats: two instructions (compilers leave the generic form as 16 scalar loads) */
static inline v16 widen(const int8_t *p) {
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#else
static inline v16 widen(const int8_t *p) {
    v16 v;
    for (int l = 0; l < 16; l++) v[l] = p[l];
    return v;
}
#endif

#define CHUNK 256 /* inputs of 8 rows widened to floats at a time: 8 KiB, read back from the first-level cache */

/* y (out, n) = diag(scales) Q x for an int8 weight Q (out, in) with one fp32 scale per output, `in` a multiple of 16:
   as weight_product, 8 rows and 16 columns at a time; the 8 rows' weights are widened to floats CHUNK inputs at a
   time into a small buffer that the loop then reads as weight_product reads its rows, the sums scaled at the end. */
void int8_weight_product(const int8_t *Q, const float *scales, const float *x, float *y, int64_t out, int64_t in,
                         int64_t n, float *pad, int threads) {
    int64_t blocks = (n + 15) / 16, tail = n % 16;
    if (in % 16) return;
    pad_last_block(x, in, n, pad);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += 8) {
        const int8_t *q[8];
        int64_t rows = block_rows((const char *)Q, out, in, 1, o, (const char **)q);
        const char *next = (const char *)(Q + (o + 8) * in);  /* the next block's 8 rows, asked for meanwhile */
        float w[8][CHUNK] __attribute__((aligned(64)));
        for (int64_t c = 0; c < blocks; c++) {
            int padded = tail && c == blocks - 1;
            const float *xb = padded ? pad : x + c * 16;
            int64_t stride = padded ? 16 : n, width = padded ? tail : 16;
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (int64_t i0 = 0; i0 < in; i0 += CHUNK) {
                int64_t size = in - i0 < CHUNK ? in - i0 : CHUNK;
                for (int64_t i = 0; i < size; i += 16) {
                    if (c == 0) {  /* the next block's 8 rows: 128 bytes for these 16 inputs */
                        __builtin_prefetch(next + 8 * (i0 + i), 0, 3);
                        __builtin_prefetch(next + 8 * (i0 + i) + 64, 0, 3);
                    }
                    for (int r = 0; r < 8; r++) *(v16 *)(w[r] + i) = widen(q[r] + i0 + i);
                }
                const float *x0 = xb + i0 * stride;
                for (int64_t i = 0; i < size; i++) {
                    v16 xv = *(const v16u *)(x0 + i * stride);
                    a0 += w[0][i] * xv, a1 += w[1][i] * xv, a2 += w[2][i] * xv, a3 += w[3][i] * xv;
                    a4 += w[4][i] * xv, a5 += w[5][i] * xv, a6 += w[6][i] * xv, a7 += w[7][i] * xv;
                }
            }
            v16 sums[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
            for (int r = 0; r < rows; r++) {
                v16 scaled = sums[r] * scales[o + r];
                float *yr = y + (o + r) * n + c * 16;
                if (width == 16)
                    *(v16u *)yr = scaled;
                else
                    for (int l = 0; l < width; l++) yr[l] = scaled[l];
            }
        }
    }
}
