/* The lane layouts' factor types, shared by column_kernel.c (lora_lanes) and group_kernel.c.

   A lane vector holds one factor of 16 slots side by side. The factors are fp32, bf16 where built with
   -DLANE_BF16 (half the bytes, widened to fp32 as read), or int8 where built with -DLANE_INT8 (a quarter of
   the bytes; each rank of each slot then has its own factor, applied to its sum: the kernels' SL). The sums
   are in fp32 either way. lanes_of(p, idx) reads the lane vector at p in fp32, lane l taken from lane
   idx[l]: each column's own slot moved into the column's place. */

#ifndef LORAKIT_LANES_H
#define LORAKIT_LANES_H

#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

#if defined(LANE_INT8)
#include <immintrin.h>
typedef int8_t lane_t;
typedef int8_t b16u __attribute__((vector_size(16), aligned(1)));
static inline v16 lanes_of(const lane_t *p, i16 idx) {
#ifdef __AVX512F__ /* one widening load and one conversion (GCC widens a generic int8 vector byte by byte) */
    v16 wide = (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    v16 wide = __builtin_convertvector(*(const b16u *)p, v16);
#endif
    return __builtin_shuffle(wide, idx);
}
#elif defined(LANE_BF16)
typedef uint16_t lane_t;
typedef uint16_t w16u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u16 __attribute__((vector_size(64)));
static inline v16 lanes_of(const lane_t *p, i16 idx) {
    u16 wide = __builtin_convertvector(*(const w16u *)p, u16); /* a bf16 is the top half of its fp32 */
    return __builtin_shuffle((v16)(wide << 16), idx);
}
#else
typedef float lane_t;
static inline v16 lanes_of(const lane_t *p, i16 idx) { return __builtin_shuffle(*(const v16u *)p, idx); }
#endif

/* sum times the 16 scales at SL, moved as lanes_of moves lanes; sum itself where SL is null */
static inline v16 scaled(v16 sum, const float *SL, i16 idx) {
    return SL ? sum * __builtin_shuffle(*(const v16u *)SL, idx) : sum;
}

#endif
