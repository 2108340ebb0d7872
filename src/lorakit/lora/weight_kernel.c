/* A decode step's base products: y (out, n) = W (out, in) x (in, n), fp32, x and y row-major (n columns).

   A decode step multiplies each weight by a few columns (one per row of the batch). BLAS libraries
   tile such a product for large matrices and reach a fraction of the CPU's speed at these shapes
   (MKL: about half of what this loop does at 8 to 64 columns on a 2-core EPYC). Here each thread
   takes blocks of 8 weight rows; each block goes through x 16 columns at a time, one 16-float
   vector of x per input feature and one broadcast weight per row, eight sums in registers, so that
   the weight streams through once, front to back, whatever n is. While a block computes it asks the
   memory for the next block's rows (one cache line every other input): eight short rows at a time
   are too short for the hardware's stream prefetchers to find, and without asking, a block waited on
   them (a 135M model's step of products: 17-18 ms without, 11 with). They are asked into the outer
   caches, not the first level, which keeps x's vectors: a 135M model's decode step of 16 rows took
   38.5 ms against 42.2 asking into the first level (medians of 124 steps each, the two kernels taking
   turns step by step, 2-core EPYC). A last block of fewer than 16 columns is read from a copy padded
   with zeros (`pad`, 16 * in floats). Every output is summed over the inputs in order, the same way
   for any n.

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
                if (c == 0 && (i & 1) == 0) __builtin_prefetch(next + 32 * i, 0, 1);  /* 16 floats, every other input */
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

#include "few_columns.h"

/* y (out, n) = W x for 1 <= n <= FEW columns (a decode step of a few rows), xt the columns of x, each contiguous (n,
   in). At so few columns the loop above does 16 / n times the arithmetic it needs, and BLAS wants copies around a
   product (its two-column product was the fastest layout here at one row); this one streams the weight once, each
   thread blocks of 4 rows, 16 inputs of each row against 16 of each column at a time. */
void few_columns_product(const float *W, const float *xt, float *y, int64_t out, int64_t in, int64_t n, int threads) {
    if (n < 1 || n > FEW) return;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += 4) few_rows(W, xt, y, out, in, n, o);
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

/* w8a8_product: y (out, n) = diag(scales) Q xq, the int8 weight Q (out, in) times x rounded to int8 as llama.cpp's
   q8_0 rounds activations: per column and block of 32 inputs, d = max |x| / 127 and q = round(x / d) (ties to even),
   so x ~ d q. Each block's products are summed exactly in int32, then scaled by d into the output's fp32 sum:
   y[o][c] = scales[o] * sum over blocks b of d[b][c] * (Q[o] . q[b][c]), b in order.

   The columns go 16 at a time; their q is laid out (in / 4, 16, 4): one 64-byte vector holds 4 consecutive inputs
   of all 16 columns, so that AVX-512 VNNI's vpdpbusd adds, for each column, 4 products of one 4-byte group of a
   weight row (broadcast) at once: a quarter of the fp32 loop's instructions for a quarter of its bytes. vpdpbusd
   takes its first factor unsigned: the weights go in as w + 128 (their sign bit flipped), and 128 times the block's
   sum of q is taken off again. Without VNNI the same integer sums are computed plainly (the same results, slower).
   Blocks of 8 weight rows per thread, the next block's rows asked for meanwhile, as in int8_weight_product. */

#include <math.h>

typedef int32_t i16v __attribute__((vector_size(64)));
typedef int32_t i16vu __attribute__((vector_size(64), aligned(4)));

/* columns c0 .. c0 + width - 1 of x (in, n) rounded per block of 32 inputs: q (in / 4, 16, 4), d and the sum of q
   (in / 32, 16); columns past width are zeros. With AVX-512 the 16 columns go as one vector (the same operations). */
static void quantize_block(const float *x, int64_t in, int64_t n, int64_t c0, int64_t width, int8_t *q, float *d,
                           int32_t *sums) {
#ifdef __AVX512F__
    const __mmask16 live = (__mmask16)((1u << width) - 1);
    for (int64_t b = 0; b < in / 32; b++) {
        const float *xb = x + b * 32 * n + c0;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < 32; i++)
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(live, xb + i * n)));
        __mmask16 some = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
        __m512 inverse = _mm512_maskz_div_ps(some, _mm512_set1_ps(127.f), amax);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < 32; i += 4) {
            __m512i packed = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, xb + (i + j) * n), inverse);
                __m512 rounded = _mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512i v = _mm512_cvtps_epi32(rounded);
                sum = _mm512_add_epi32(sum, v);
                __m512i low = _mm512_and_si512(v, _mm512_set1_epi32(0xff));
                packed = _mm512_or_si512(packed, _mm512_slli_epi32(low, 8 * j));
            }
            _mm512_storeu_si512((void *)(q + (b * 32 + i) * 16), packed); /* byte 4 l + j: input i + j of column l */
        }
        _mm512_storeu_ps(d + b * 16, _mm512_div_ps(amax, _mm512_set1_ps(127.f)));
        _mm512_storeu_si512((void *)(sums + b * 16), sum);
    }
#else
    for (int64_t b = 0; b < in / 32; b++)
        for (int64_t l = 0; l < 16; l++) {
            float amax = 0.f;
            for (int64_t i = b * 32; l < width && i < b * 32 + 32; i++) {
                float v = fabsf(x[i * n + c0 + l]);
                amax = v > amax ? v : amax;
            }
            float inverse = amax > 0.f ? 127.f / amax : 0.f;
            int32_t sum = 0;
            for (int64_t i = b * 32; i < b * 32 + 32; i++) {
                int32_t v = l < width ? (int32_t)nearbyintf(x[i * n + c0 + l] * inverse) : 0;
                q[((i >> 2) * 16 + l) * 4 + (i & 3)] = (int8_t)v;
                sum += v;
            }
            d[b * 16 + l] = amax / 127.f;
            sums[b * 16 + l] = sum;
        }
#endif
}

static inline int32_t group4(const int8_t *p) { /* 4 weights as one int32, read from any address */
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

static inline void block_dots(const int8_t *const w[8], int64_t i0, const int8_t *qb, i16v s[8]) {
#if defined(__AVX512VNNI__)
    __m512i t0 = _mm512_setzero_si512(), t1 = t0, t2 = t0, t3 = t0, t4 = t0, t5 = t0, t6 = t0, t7 = t0;
    const __m512i flip = _mm512_set1_epi32((int32_t)0x80808080u);
    for (int k = 0; k < 8; k++) {
        __m512i xv = _mm512_loadu_si512((const void *)(qb + k * 64));
#define DOT(t, r) t = _mm512_dpbusd_epi32(t, _mm512_xor_si512(_mm512_set1_epi32(group4(w[r] + i0 + 4 * k)), flip), xv)
        DOT(t0, 0); DOT(t1, 1); DOT(t2, 2); DOT(t3, 3); DOT(t4, 4); DOT(t5, 5); DOT(t6, 6); DOT(t7, 7);
#undef DOT
    }
    s[0] = (i16v)t0, s[1] = (i16v)t1, s[2] = (i16v)t2, s[3] = (i16v)t3;
    s[4] = (i16v)t4, s[5] = (i16v)t5, s[6] = (i16v)t6, s[7] = (i16v)t7;
#else
    for (int r = 0; r < 8; r++) {
        i16v t = {0};
        for (int64_t i = 0; i < 32; i++)
            for (int l = 0; l < 16; l++) t[l] += (int32_t)(w[r][i0 + i] + 128) * qb[((i >> 2) * 16 + l) * 4 + (i & 3)];
        s[r] = t;
    }
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "w8a8_rows.h"

/* the few-columns product; `work`: n * in floats, n * in bytes, then n * in / 32 floats and as many int32 */
static void w8a8_few(const int8_t *Q, const float *scales, const float *x, float *y, int64_t out, int64_t in,
                     int64_t n, char *work, int threads) {
    float *xt = (float *)work, *d = (float *)(work + n * in * 5);
    int8_t *q = (int8_t *)(work + n * in * 4);
    int32_t *sums = (int32_t *)(work + n * in * 5 + n * (in / 32) * 4);
    for (int64_t c = 0; c < n; c++) /* each column's inputs contiguous */
        for (int64_t i = 0; i < in; i++) xt[c * in + i] = x[i * n + c];
    quantize_columns(xt, in, n, q, d, sums);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += 16) w8a8_rows(Q, scales, q, d, sums, y, out, in, n, o);
}
#endif

/* `work`: for each block of 16 columns, in * 16 bytes of q, then in / 32 * 16 floats of d and as many int32 sums
   (for FEW columns or fewer, with VNNI, w8a8_few's: n * in * 5 bytes, then n * in / 32 floats and as many int32) */
void w8a8_product(const int8_t *Q, const float *scales, const float *x, float *y, int64_t out, int64_t in, int64_t n,
                  char *work, int threads) {
    int64_t blocks = (n + 15) / 16, groups = in / 32, stride = in * 16 + groups * 16 * 8;
    if (in % 32) return;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (n <= FEW) {
        w8a8_few(Q, scales, x, y, out, in, n, work, threads);
        return;
    }
#endif
    for (int64_t c = 0; c < blocks; c++) {
        char *at = work + c * stride;
        int64_t width = n - c * 16 < 16 ? n - c * 16 : 16;
        quantize_block(x, in, n, c * 16, width, (int8_t *)at, (float *)(at + in * 16),
                       (int32_t *)(at + in * 16 + groups * 16 * 4));
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o += 8) {
        const int8_t *w[8];
        int64_t rows = block_rows((const char *)Q, out, in, 1, o, (const char **)w);
        const char *next = (const char *)(Q + (o + 8) * in);
        for (int64_t c = 0; c < blocks; c++) {
            const char *at = work + c * stride;
            const int8_t *q = (const int8_t *)at;
            const float *d = (const float *)(at + in * 16);
            const int32_t *sums = (const int32_t *)(at + in * 16 + groups * 16 * 4);
            v16 f[8] = {{0}};
            for (int64_t b = 0; b < groups; b++) {
                if (c == 0) { /* the next block's 8 rows: 256 bytes for these 32 inputs */
                    for (int p = 0; p < 4; p++) __builtin_prefetch(next + 8 * 32 * b + 64 * p, 0, 3);
                }
                i16v s[8];
                block_dots(w, b * 32, q + b * 32 * 16, s);
                i16v offset = *(const i16vu *)(sums + b * 16) * 128;
                v16 db = *(const v16u *)(d + b * 16);
                for (int r = 0; r < 8; r++) f[r] += __builtin_convertvector(s[r] - offset, v16) * db;
            }
            int64_t width = n - c * 16 < 16 ? n - c * 16 : 16;
            for (int r = 0; r < rows; r++) {
                v16 scaled = f[r] * scales[o + r];
                float *yr = y + (o + r) * n + c * 16;
                for (int l = 0; l < width; l++) yr[l] = scaled[l];
            }
        }
    }
}
