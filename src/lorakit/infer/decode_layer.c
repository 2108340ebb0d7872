/* One decoder layer of a Llama-family model for a decode step of 1 to FEW rows, in one call.

   At one to a few rows a decode step is its products, which read the weights at memory speed, and some
   twenty small operations a layer around them (norms, rotary, cache append, attention, SiLU, adds), each a
   torch call with its Python: on SmolLM2-135M at one row those took a quarter of the step. This computes
   the whole layer on the step's residual stream h (H, B), feature-major, updated in place:

     x = rms_norm(h) w_in;  q, k, v = Wq x + bq, Wk x + bk, Wv x + bv      (one parallel loop for the three)
     q, k = rotary(q), rotary(k); k, v written into the cache at token T - 1 of each row
     a = softmax(q K^T scale + keep) V per row and query head (its key/value head: head / (heads / kv_heads))
     h += Wo a + bo
     x = rms_norm(h) w_post;  g, u = Wg x + bg, Wu x + bu                  (one parallel loop for the two)
     h += Wd (silu(g) u) + bd

   The products are weight_kernel.c's few-columns blocks (lora/few_columns.h), or for a w8a8 model (int8 weights,
   each product's input rounded to int8 per block of 32) its few-columns int8 rows (lora/w8a8_rows.h), the same
   sums in the same order; the rest computes infer/decode_step.py's expressions, the attention's sums in token
   order (torch's SDPA may take another: the same up to float rounding). The cache: element (b, g, t, d) of the keys
   and of the values at b * strides[0] + g * strides[1] + t * strides[2] + d; keep (B, T) is 0 or -inf per cached
   token.

   Built by lorakit/native.py; called by lorakit/infer/decode_layer.py. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "../lora/few_columns.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "../lora/w8a8_rows.h"
#define W8A8 1
#else
#define W8A8 0
#endif

enum { Q, K, V, O, GATE, UP, DOWN, WEIGHTS };

/* room for a product's input columns rounded to int8 (w8a8): q (n, in), d and sums (n, in / 32) */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *sums;
} Rounded;

/* y[k] (outs[k], n) = W[k] x + bias[k] for `count` weights by the same x, its n columns contiguous (n, in): the
   blocks of all of them in one parallel loop, 4 rows of fp32 weights or, with `scales` (each weight's fp32 scales),
   16 rows of int8 ones times x rounded per block of 32 into `r` (lora/w8a8_rows.h: the bits of lorakit's w8a8
   product) */
static void products(int count, const float *const *W, const float *const *bias, const float *const *scales,
                     const int64_t *outs, int64_t in, const float *xt, float **y, int64_t n, const Rounded *r,
                     int threads) {
    int64_t starts[WEIGHTS + 1] = {0}, rows = scales ? 16 : 4;
    for (int k = 0; k < count; k++) starts[k + 1] = starts[k] + (outs[k] + rows - 1) / rows;
#if W8A8
    if (scales) quantize_columns(xt, in, n, r->q, r->d, r->sums);
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < starts[count]; block++) {
        int k = 0;
        while (block >= starts[k + 1]) k++;
        int64_t o = (block - starts[k]) * rows;
#if W8A8
        if (scales)
            w8a8_rows((const int8_t *)W[k], scales[k], r->q, r->d, r->sums, y[k], outs[k], in, n, o);
        else
#endif
            few_rows(W[k], xt, y[k], outs[k], in, n, o);
        if (bias[k])
            for (int64_t r = o; r < o + rows && r < outs[k]; r++)
                for (int64_t c = 0; c < n; c++) y[k][r * n + c] += bias[k][r];
    }
}

/* x (B, H), row-major: each column of h (H, B) normed, w (x r) with r = 1 / sqrt(mean(x^2) + eps) */
static void rms_norm_rows(const float *h, const float *w, float *x, int64_t H, int64_t B, float eps) {
    for (int64_t b = 0; b < B; b++) {
        float sum = 0.f;
        for (int64_t j = 0; j < H; j++) sum += h[j * B + b] * h[j * B + b];
        float r = 1.f / sqrtf(sum / (float)H + eps);
        for (int64_t j = 0; j < H; j++) x[b * H + j] = w[j] * (h[j * B + b] * r);
    }
}

/* head `head` of row b of a projection's output p (heads D, B), rotated: p cos + rotate_half(p) sin, into y (D) */
static void rotate_head(const float *p, const float *cos_, const float *sin_, float *y, int64_t head, int64_t D,
                        int64_t B, int64_t b) {
    int64_t half = D / 2;
    const float *ph = p + head * D * B + b, *c = cos_ + b * D, *s = sin_ + b * D;
    for (int64_t d = 0; d < D; d++) {
        float other = d < half ? -ph[(d + half) * B] : ph[(d - half) * B];
        float first = ph[d * B] * c[d], second = other * s[d];
        y[d] = first + second;
    }
}

/* out (D) = softmax over t < T of (q . k_t) scale + keep_t, times v_t; scores: room for T floats */
static void attend(const float *q, const float *keys, const float *values, int64_t token_stride, int64_t T,
                   int64_t D, const float *keep, float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        const float *k = keys + t * token_stride;
        float dot = 0.f;
        for (int64_t d = 0; d < D; d++) dot += q[d] * k[d];
        scores[t] = dot * scale + keep[t];
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.f;
    for (int64_t t = 0; t < T; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    for (int64_t t = 0; t < T; t++) {
        const float *v = values + t * token_stride;
        float p = scores[t] / total;
        for (int64_t d = 0; d < D; d++) out[d] += p * v[d];
    }
}

/* Whether decode_layer takes w8a8 layers here (AVX-512 VNNI): 1 or 0 */
int decode_layer_w8a8(void) { return W8A8; }

/* One layer, as the comment above says. W and bias: the 7 projections' weights (out, in) and biases (NULL where
   none) in the order q, k, v, o, gate, up, down; scales: NULL for fp32 weights, or for w8a8 ones (int8 weights, their
   inputs rounded to int8 per block of 32, every `in` a multiple of 32) each weight's fp32 scales; norms: the input
   and post-attention norms' weights (H each); dims: H, heads, kv_heads, D, I (the MLP's width); cos_, sin_ (B, D);
   keys, values with `strides` (row, head, token), T tokens counting this step's; keep (B, T). Returns 0, or -1 where
   its memory could not be had or w8a8 is not built here (h unchanged). */
int decode_layer(float *h, int64_t B, const float *const *W, const float *const *bias, const float *const *scales,
                 const float *const *norms, float eps, const int64_t *dims, const float *cos_, const float *sin_,
                 float *keys, float *values, const int64_t *strides, int64_t T, const float *keep, float scale,
                 int threads) {
    int64_t H = dims[0], heads = dims[1], kv_heads = dims[2], D = dims[3], I = dims[4], group = heads / kv_heads;
    if (B < 1 || B > FEW || (scales && !W8A8)) return -1;
    int64_t widest = H > I ? H : I, attn_width = heads * D;
    if (attn_width > widest) widest = attn_width;
    Rounded room = {NULL, NULL, NULL}; /* for w8a8 weights' rounded inputs */
    if (scales) {
        room.q = malloc(B * widest);
        room.d = malloc(sizeof(float) * B * (widest / 32 + 1));
        room.sums = malloc(sizeof(int32_t) * B * (widest / 32 + 1));
    }
    float *x = malloc(sizeof(float) * B * widest), *q = malloc(sizeof(float) * B * attn_width),
          *k = malloc(sizeof(float) * B * kv_heads * D), *v = malloc(sizeof(float) * B * kv_heads * D),
          *a = malloc(sizeof(float) * B * attn_width), *gate = malloc(sizeof(float) * B * I),
          *up = malloc(sizeof(float) * B * I), *o = malloc(sizeof(float) * B * H),
          *scores = malloc(sizeof(float) * T * (threads > 0 ? threads : 1)); /* each thread's T scores */
    int status = -1;
    if (!x || !q || !k || !v || !a || !gate || !up || !o || !scores || (scales && (!room.q || !room.d || !room.sums)))
        goto done;

    rms_norm_rows(h, norms[0], x, H, B, eps);
    {
        const int64_t outs[3] = {attn_width, kv_heads * D, kv_heads * D};
        float *y[3] = {q, k, v};
        products(3, W + Q, bias + Q, scales ? scales + Q : NULL, outs, H, x, y, B, &room, threads);
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < kv_heads; g++) {
            float *kt = keys + b * strides[0] + g * strides[1] + (T - 1) * strides[2];
            float *vt = values + b * strides[0] + g * strides[1] + (T - 1) * strides[2];
            rotate_head(k, cos_, sin_, kt, g, D, B, b);
            for (int64_t d = 0; d < D; d++) vt[d] = v[(g * D + d) * B + b];
        }
#pragma omp parallel num_threads(threads) if (B * heads * T * D > 65536)
    {
        float qh[D], *own = scores + omp_get_thread_num() * T;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * heads; bh++) {
            int64_t b = bh / heads, head = bh % heads, g = head / group;
            rotate_head(q, cos_, sin_, qh, head, D, B, b);
            attend(qh, keys + b * strides[0] + g * strides[1], values + b * strides[0] + g * strides[1], strides[2],
                   T, D, keep + b * T, scale, own, a + b * attn_width + head * D);
        }
    }
    {
        float *y[1] = {o};
        products(1, W + O, bias + O, scales ? scales + O : NULL, &H, attn_width, a, y, B, &room, threads);
    }
    for (int64_t i = 0; i < H * B; i++) h[i] += o[i];

    rms_norm_rows(h, norms[1], x, H, B, eps);
    {
        const int64_t outs[2] = {I, I};
        float *y[2] = {gate, up};
        products(2, W + GATE, bias + GATE, scales ? scales + GATE : NULL, outs, H, x, y, B, &room, threads);
    }
    for (int64_t j = 0; j < I; j++)
        for (int64_t b = 0; b < B; b++) {
            float g = gate[j * B + b];
            x[b * I + j] = g / (1.f + expf(-g)) * up[j * B + b];
        }
    {
        float *y[1] = {o};
        products(1, W + DOWN, bias + DOWN, scales ? scales + DOWN : NULL, &H, I, x, y, B, &room, threads);
    }
    for (int64_t i = 0; i < H * B; i++) h[i] += o[i];
    status = 0;
done:
    free(x), free(q), free(k), free(v), free(a), free(gate), free(up), free(o), free(scores);
    free(room.q), free(room.d), free(room.sums);
    return status;
}
