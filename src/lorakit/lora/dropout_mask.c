/* Dropout's keep mask, drawn as torch.rand_like(x) >= p draws it from PyTorch's CPU generator, faster.

   PyTorch's CPU generator is MT19937 (ATen/core/MT19937RNGEngine.h); rand_like takes one 32-bit draw per element,
   in memory order, keeps its low 24 bits m and yields m / 2^24, and the mask keeps the elements whose value is at
   least p as a float, i.e. m >= threshold = ceil(float(p) * 2^24). PyTorch draws them one call at a time under
   the generator's lock; here a block of up to 624 draws is tempered and compared in one vectorisable loop after
   each twist of the state. The state is the generator's own (torch.get_rng_state's layout: the 624 words widened
   to 64 bits, `left` and `next`), read and written in place, so the generator goes on exactly as after rand_like. */
#include <stdint.h>

#define N 624
#define M 397

static inline uint32_t mixed(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void twist(uint32_t *s) { /* the engine's next_state, in the same order */
    int i = 0;
    for (; i < N - M; i++) s[i] = s[i + M] ^ mixed(s[i], s[i + 1]);
    for (; i < N - 1; i++) s[i] = s[i + M - N] ^ mixed(s[i], s[i + 1]);
    s[N - 1] = s[M - 1] ^ mixed(s[N - 1], s[0]);
}

/* keep[i] = the i-th draw's low 24 bits >= threshold, for n draws; `words` (624 of them, one per 64-bit slot),
   `left` and `next` are the generator state, updated. Returns 0, or 1 for a state PyTorch never holds. */
int keep_mask(uint64_t *words, int32_t *left, uint64_t *next, uint8_t *keep, int64_t n, uint32_t threshold) {
    uint32_t s[N];
    if (*left < 1 || *left > N || *next > N) return 1;
    for (int i = 0; i < N; i++) s[i] = (uint32_t)words[i];
    int64_t at = *next, remaining = *left;
    for (int64_t i = 0; i < n;) {
        if (remaining == 1) { /* the next draw twists first, then reads word 0 */
            twist(s);
            remaining = N + 1;
            at = 0;
        }
        int64_t take = remaining - 1 < n - i ? remaining - 1 : n - i;
        const uint32_t *w = s + at;
        uint8_t *k = keep + i;
        for (int64_t j = 0; j < take; j++) {
            uint32_t y = w[j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            k[j] = (y & 0xffffffu) >= threshold;
        }
        at += take;
        remaining -= take;
        i += take;
    }
    for (int i = 0; i < N; i++) words[i] = s[i];
    *left = (int32_t)remaining;
    *next = (uint64_t)at;
    return 0;
}

/* out[i] = x[i] * keep[i] for n elements (out may be x): dropout applied, each element times 1.0 or 0.0 as
   PyTorch's x * keep computes it, without first copying the mask into floats. */
void apply_mask(const float *x, const uint8_t *keep, float *out, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * (float)keep[i];
}
