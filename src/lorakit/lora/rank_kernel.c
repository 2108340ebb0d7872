/* LoRA's rank-wide products in fp32: U = X A^T (N, r) and U^T G (r, M), r a LoRA rank (or a sibling group's
   ranks side by side).

   BLAS libraries are tuned for wide products; with one dimension of 8 they ran at 20-55 GFLOP/s on a 2-core
   EPYC, where these loops run at about twice that. Both read the wide operand once, along its rows:
   rank_product takes ROWS rows of X at a time against eight ranks of A, 16 inputs a vector, and sums each
   product's 16 lanes in order at the end; rank_gradient takes BLOCKS vectors of 16 columns of G at a time,
   eight ranks of U broadcast against them, down all N rows. Each output is summed by one thread in a fixed
   order, so the results do not depend on the thread count.

   Built by lorakit/native.py, for lorakit/lora/rank_kernel.py. */

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#define ROWS 3   /* rows of X a product holds: 3 x 8 sums in registers */
#define BLOCKS 2 /* vectors of 16 columns of G a gradient holds: 2 x 8 sums in registers */

static inline float lanes_sum(v16 v) {
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += v[l];
    return s;
}

/* U[n][j] = sum_k X[n][k] A[j][k] for X (N, K) with row stride x_row, A (r, K) and U (N, r) contiguous. */
void rank_product(const float *X, int64_t N, int64_t K, int64_t x_row, const float *A, int64_t r, float *U,
                  int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROWS) {
        int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        const float *x[ROWS];
        for (int i = 0; i < ROWS; i++) x[i] = X + (n0 + (i < rows ? i : 0)) * x_row;
        for (int64_t j0 = 0; j0 < r; j0 += 8) {
            const float *a[8];
            for (int j = 0; j < 8; j++) a[j] = A + (j0 + j < r ? j0 + j : r - 1) * K;
            v16 s[ROWS][8] = {{{0}}};
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                v16 xv[ROWS];
                for (int i = 0; i < ROWS; i++) xv[i] = *(const v16u *)(x[i] + k);
                for (int j = 0; j < 8; j++) {
                    v16 av = *(const v16u *)(a[j] + k);
                    for (int i = 0; i < ROWS; i++) s[i][j] += xv[i] * av;
                }
            }
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < 8 && j0 + j < r; j++) {
                    float t = lanes_sum(s[i][j]);
                    for (int64_t kk = k; kk < K; kk++) t += x[i][kk] * a[j][kk];
                    U[(n0 + i) * r + j0 + j] = t;
                }
        }
    }
}

/* V[j][m] = sum_n U[n][j] G[n][m] for G (N, M) with row stride g_row, U (N, r) and V (r, M) contiguous. */
void rank_gradient(const float *G, int64_t N, int64_t M, int64_t g_row, const float *U, int64_t r, float *V,
                   int threads) {
    int64_t width = 16 * BLOCKS, blocks = (M + width - 1) / width;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m0 = b * width;
        for (int64_t j0 = 0; j0 < r; j0 += 8) {
            if (m0 + width > M) { /* the last columns, fewer than a block: one at a time */
                for (int64_t m = m0; m < M; m++)
                    for (int64_t j = j0; j < r && j < j0 + 8; j++) {
                        float t = 0.f;
                        for (int64_t n = 0; n < N; n++) t += U[n * r + j] * G[n * g_row + m];
                        V[j * M + m] = t;
                    }
                continue;
            }
            v16 s[BLOCKS][8] = {{{0}}};
            for (int64_t n = 0; n < N; n++) {
                const float *g = G + n * g_row + m0, *u = U + n * r + j0;
                v16 gv[BLOCKS];
                for (int c = 0; c < BLOCKS; c++) gv[c] = *(const v16u *)(g + 16 * c);
                for (int j = 0; j < 8; j++) {
                    float uj = j0 + j < r ? u[j] : 0.f;
                    for (int c = 0; c < BLOCKS; c++) s[c][j] += uj * gv[c];
                }
            }
            for (int j = 0; j < 8 && j0 + j < r; j++)
                for (int c = 0; c < BLOCKS; c++) *(v16u *)(V + (j0 + j) * M + m0 + 16 * c) = s[c][j];
        }
    }
}
