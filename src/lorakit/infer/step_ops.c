/* A decode step's small per-layer operations on feature-major activations, each in one call instead of the
   handful of torch operations (and their Python) it takes: at one to a few rows a step is mostly such calls.

   - rms_norm: Llama's RMSNorm of each column of x (H, B): y = w (x / sqrt(mean(x^2) + eps)), computed as
     infer/decode_step.py's torch expression is, w * (x * r) with r = 1 / sqrt(mean + eps), without
     multiply-add contraction; the squares are summed over the features in order (torch's reduction may
     take another order: the same up to float rounding), up to COLUMNS columns side by side: each row of
     x is read contiguously, and a prompt pass's hundreds of columns norm in vectors, not one at a time.
   - rotate: rotary position embedding of a projection's output x (heads D, N), feature-major, into
     y (N, heads, D): y = x cos + rotate_half(x) sin with cos, sin (N, D), as transformers'
     apply_rotary_pos_emb computes it (two products, then their sum).

   Built by lorakit/native.py (-std=c11: no contraction); called by lorakit/infer/step_ops.py. */

#include <math.h>
#include <stdint.h>

#define COLUMNS 256 /* columns normed at a time: their sums side by side, in order over the features */

void rms_norm(const float *x, const float *w, float *y, int64_t H, int64_t B, float eps) {
    for (int64_t b0 = 0; b0 < B; b0 += COLUMNS) {
        int64_t n = B - b0 < COLUMNS ? B - b0 : COLUMNS;
        float r[COLUMNS];
        for (int64_t b = 0; b < n; b++) r[b] = 0.f;
        for (int64_t h = 0; h < H; h++) {
            const float *row = x + h * B + b0;
            for (int64_t b = 0; b < n; b++) r[b] += row[b] * row[b];
        }
        for (int64_t b = 0; b < n; b++) r[b] = 1.f / sqrtf(r[b] / (float)H + eps);
        for (int64_t h = 0; h < H; h++) {
            const float *row = x + h * B + b0;
            float *out = y + h * B + b0;
            for (int64_t b = 0; b < n; b++) out[b] = w[h] * (row[b] * r[b]);
        }
    }
}

void rotate(const float *x, const float *cos_, const float *sin_, float *y, int64_t heads, int64_t D, int64_t N) {
    int64_t half = D / 2;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + h * D * N + n, *c = cos_ + n * D, *s = sin_ + n * D;
            float *yh = y + (n * heads + h) * D;
            for (int64_t d = 0; d < D; d++) {
                float other = d < half ? -xh[(d + half) * N] : xh[(d - half) * N];
                float a = xh[d * N] * c[d], b = other * s[d];
                yh[d] = a + b;
            }
        }
}
