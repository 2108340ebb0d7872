/* A sibling group's decode step in one pass: every member's base product and every column's LoRA term.

   A decode step of a mixed-adapter batch computes, for the layers of a sibling group fed the same x
   (q/k/v, gate/up; or one layer), y_m = W_m x + b_m + each column's (s B)_b A_b x. The base products
   (weight_kernel.c's loop: 8 weight rows, 16 columns, one broadcast weight per row and input) stream
   the weights; the LoRA terms, read by slot lanes (column_kernel.c's lora_lanes: the factors of 16
   slots interleaved, each column's lane moved into place with one shuffle), stream the factors of every
   adapter in the batch and do little with them. Run one after the other, the lanes wait on memory with
   the arithmetic units idle. Here each thread's blocks of weight rows carry the lane work with them,
   and ask the memory for the next block's weights and the factors it will read while they compute
   (where the products already read memory at full speed, the factors' bytes cost about the same either
   way; the pass still saves a call and a pass over x per group):

   - phase 1: the first blocks; each also computes whole ranks h[g][j] = A_j x for every column (one
     more vector sum in the block's loop, on the same x vector), the ranks spread evenly over them;
   - phase 2, once every rank is known: the other blocks; each adds its own rows' terms
     sum_j (s B)[o][j] h[j] as it writes them, and those of a share of phase 1's rows.

   Each block's base sums run over the inputs in order with the same multiply-adds as weight_product,
   so that a member's W x (+ b) is the same to the bit as weight_product's (+ the bias), and the term
   is added to it once, as lora_lanes adds it. At most 16 columns (one block of columns).

   The factors are fp32, bf16 or int8 (lanes.h: each lane vector widened to fp32 as it is read, the sums in
   fp32; int8's rank j of A x multiplied by its factor in SL, both factors' scales, as lora_lanes does).

   Built by lorakit/native.py with FMA contraction, as weight_kernel.c; called by lora/group_kernel.py. */

#include "lanes.h" /* v16, i16, and the lane layouts' factor types */

#define LANE_BYTES (16 * (int64_t)sizeof(lane_t)) /* one lane vector: 16 slots' factors */

#define MEMBERS 4 /* layers of a sibling group one call serves at most */
#define GROUPS 4  /* groups of 16 slots at most */
#define SPANS 8   /* regions of factors one block asks the memory for at most (the rest come on demand) */

typedef struct {
    const char *at;
    int64_t lines; /* lane vectors from `at` */
} Span;

typedef struct { /* what a call shares with its blocks */
    const float *xb, *W[MEMBERS], *bias[MEMBERS];
    const lane_t *AL, *BL[MEMBERS];
    const float *SL; /* null, or each slot's rank factors (groups, R, 16) */
    float *Y[MEMBERS], *h;
    int64_t in, n, members, R, groups, rank0[MEMBERS], ranks[MEMBERS], out[MEMBERS], start[MEMBERS + 1];
    int64_t total, split, tasks, task_group[GROUPS];
    i16 idx[GROUPS], in_group[GROUPS], touched;
    int used[GROUPS];
} Step;

/* inputs [i0, i1) of 8 weight rows: s[r] += w[r][i] x[i]; with `a`, *t += lanes(a[i]) x[i]; one lane vector from
   `ask` per input on the way (none without `ask`) */
static inline __attribute__((always_inline)) void stretch(const float *const w[8], const float *xb, int64_t i0,
                                                          int64_t i1, v16 s[8], const lane_t *a, i16 idx, v16 *t,
                                                          const char *ask, const char *next) {
    v16 a0 = s[0], a1 = s[1], a2 = s[2], a3 = s[3], a4 = s[4], a5 = s[5], a6 = s[6], a7 = s[7], u = *t;
    for (int64_t i = i0; i < i1; i++) {
        if (ask) __builtin_prefetch(ask + LANE_BYTES * (i - i0), 0, 3);
        if ((i & 1) == 0) __builtin_prefetch(next + 32 * i, 0, 1); /* the next block's weights, as weight_product */
        v16 xv = *(const v16u *)(xb + i * 16);
        if (a) u += lanes_of(a + i * 16, idx) * xv;
        a0 += w[0][i] * xv, a1 += w[1][i] * xv, a2 += w[2][i] * xv, a3 += w[3][i] * xv;
        a4 += w[4][i] * xv, a5 += w[5][i] * xv, a6 += w[6][i] * xv, a7 += w[7][i] * xv;
    }
    s[0] = a0, s[1] = a1, s[2] = a2, s[3] = a3, s[4] = a4, s[5] = a5, s[6] = a6, s[7] = a7, *t = u;
}

/* s[r] = the block's 8 rows times x over all inputs (with rank `a`'s sum into *t), asking for the spans on the way */
static void rows8(const Step *st, const float *const w[8], v16 s[8], const lane_t *a, i16 idx, v16 *t,
                  const Span *spans, int count) {
    const char *next = (const char *)(w[0] + 8 * st->in); /* the next 8 rows (of this member or the next one) */
    v16 zero = {0};
    for (int r = 0; r < 8; r++) s[r] = zero;
    int64_t i = 0;
    for (int k = 0; k < count && i < st->in; k++) {
        int64_t stop = i + spans[k].lines < st->in ? i + spans[k].lines : st->in;
        if (a)
            stretch(w, st->xb, i, stop, s, a, idx, t, spans[k].at, next);
        else
            stretch(w, st->xb, i, stop, s, 0, idx, t, spans[k].at, next);
        i = stop;
    }
    if (a)
        stretch(w, st->xb, i, st->in, s, a, idx, t, 0, next);
    else
        stretch(w, st->xb, i, st->in, s, 0, idx, t, 0, next);
}

static inline int member_of(const Step *st, int64_t k) {
    int m = 0;
    while (k >= st->start[m + 1]) m++;
    return m;
}

/* the first of phase 1's ranks block k computes, and the first of phase 1's blocks phase 2's block k takes */
static inline int64_t first_task(const Step *st, int64_t k) { return (k * st->tasks + st->split - 1) / st->split; }
static inline int64_t first_taken(const Step *st, int64_t k) {
    int64_t q = k - st->split, later = st->total - st->split;
    return (q * st->split + later - 1) / later;
}

/* the factors of rank task q: A_j over the inputs, one lane vector per input */
static inline const lane_t *task_factors(const Step *st, int64_t q) {
    int64_t g = st->task_group[q / st->R];
    return st->AL + (g * st->R + q % st->R) * st->in * 16;
}

/* where rank task q's sums for every column go in h */
static inline float *h_of(const Step *st, int64_t q) {
    return st->h + (st->task_group[q / st->R] * st->R + q % st->R) * 16;
}

/* rank task q's sums for every column, stored in h times its factors where SL holds them */
static inline void put_h(const Step *st, int64_t q, v16 sum) {
    int64_t g = st->task_group[q / st->R];
    *(v16u *)h_of(st, q) = scaled(sum, st->SL ? st->SL + (g * st->R + q % st->R) * 16 : 0, st->idx[g]);
}

/* each used group's (s B) rows o .. o + rows of member m: one span per group */
static int b_spans(const Step *st, int m, int64_t o, int64_t rows, Span *spans, int count) {
    for (int64_t g = 0; g < st->groups && count < SPANS; g++)
        if (st->used[g]) {
            spans[count].at = (const char *)(st->BL[m] + (g * st->out[m] + o) * st->ranks[m] * 16);
            spans[count++].lines = rows * st->ranks[m];
        }
    return count;
}

static void rows_of(const Step *st, int64_t k, int *m, int64_t *o, int64_t *rows) {
    *m = member_of(st, k);
    *o = (k - st->start[*m]) * 8;
    *rows = st->out[*m] - *o < 8 ? st->out[*m] - *o : 8;
}

/* the factors block k asks the memory for while it computes. Phase 1: the ranks' A, all of them one stream in rank
   order, an even share of it per block, one rank ahead of the blocks that read it. Phase 2: the (s B) rows the next
   block reads, its own and those of the phase 1 blocks it takes. */
static int spans_of(const Step *st, int64_t k, Span *spans) {
    int count = 0;
    if (k < st->split) {
        int64_t lines = st->tasks * st->in, share = (lines + st->split - 1) / st->split;
        int64_t s = k * share + st->in, stop = s + share < lines ? s + share : lines;
        while (s < stop && count < SPANS) {
            int64_t q = s / st->in, end = (q + 1) * st->in < stop ? (q + 1) * st->in : stop;
            spans[count].at = (const char *)(task_factors(st, q) + (s - q * st->in) * 16);
            spans[count++].lines = end - s;
            s = end;
        }
        return count;
    }
    if (++k >= st->total) return 0;
    int m;
    int64_t o, rows;
    rows_of(st, k, &m, &o, &rows);
    count = b_spans(st, m, o, rows, spans, count);
    for (int64_t p = first_taken(st, k); p < first_taken(st, k + 1) && count < SPANS; p++) {
        rows_of(st, p, &m, &o, &rows);
        count = b_spans(st, m, o, rows, spans, count);
    }
    return count;
}

/* each column's term for output o of member m: sum_j (s B)[o][j] h[j], each column from its lane group */
static v16 term_of(const Step *st, int m, int64_t o) {
    v16 term = {0};
    int64_t ranks = st->ranks[m];
    if (ranks == 0) return term;
    for (int64_t g = 0; g < st->groups; g++) {
        if (!st->used[g]) continue;
        const lane_t *bl = st->BL[m] + (g * st->out[m] + o) * ranks * 16;
        const float *hg = st->h + (g * st->R + st->rank0[m]) * 16;
        v16 d = lanes_of(bl, st->idx[g]) * *(const v16u *)hg;
        for (int64_t j = 1; j < ranks; j++) d += lanes_of(bl + j * 16, st->idx[g]) * *(const v16u *)(hg + j * 16);
        term = (v16)(((i16)d & st->in_group[g]) | ((i16)term & ~st->in_group[g]));
    }
    return term;
}

static inline void store(float *y, v16 v, int64_t n) {
    if (n == 16)
        *(v16u *)y = v;
    else
        for (int64_t l = 0; l < n; l++) y[l] = v[l];
}

static inline v16 with_term(const Step *st, v16 v, v16 term) {
    return (v16)(((i16)(v + term) & st->touched) | ((i16)v & ~st->touched));
}

/* block k: its 8 rows' base products into y (with their terms in phase 2), its share of the lane work */
static void block(const Step *st, int64_t k) {
    int m;
    int64_t o, rows;
    rows_of(st, k, &m, &o, &rows);
    const float *w[8];
    for (int r = 0; r < 8; r++) w[r] = st->W[m] + (o + (r < rows ? r : 0)) * st->in; /* past the last row: row o */
    Span spans[SPANS];
    int count = spans_of(st, k, spans);
    v16 s[8], t = {0};
    if (k < st->split) {
        int64_t q = first_task(st, k), last = first_task(st, k + 1);
        if (q < last) { /* the first rank rides in the block's loop, any others follow it */
            rows8(st, w, s, task_factors(st, q), st->idx[st->task_group[q / st->R]], &t, spans, count);
            put_h(st, q, t);
            for (q++; q < last; q++) {
                const lane_t *a = task_factors(st, q);
                i16 idx = st->idx[st->task_group[q / st->R]];
                v16 u = {0};
                for (int64_t i = 0; i < st->in; i++) u += lanes_of(a + i * 16, idx) * *(const v16u *)(st->xb + i * 16);
                put_h(st, q, u);
            }
        } else {
            rows8(st, w, s, 0, st->idx[0], &t, spans, count);
        }
    } else {
        rows8(st, w, s, 0, st->idx[0], &t, spans, count);
    }
    for (int64_t r = 0; r < rows; r++) {
        v16 v = s[r];
        if (st->bias[m]) v += st->bias[m][o + r];
        if (k >= st->split) v = with_term(st, v, term_of(st, m, o + r));
        store(st->Y[m] + (o + r) * st->n, v, st->n);
    }
}

/* phase 1's block p, its terms added to the rows it wrote */
static void add_terms(const Step *st, int64_t p) {
    int m;
    int64_t o, rows;
    rows_of(st, p, &m, &o, &rows);
    for (int64_t r = 0; r < rows; r++) {
        float *y = st->Y[m] + (o + r) * st->n;
        v16 v = {0};
        for (int64_t l = 0; l < st->n; l++) v[l] = y[l];
        store(y, with_term(st, v, term_of(st, m, o + r)), st->n);
    }
}

/* For each member m (table row m: rank0, ranks, out) y_m (out_m, n) = W_m x + b_m (b_m may be null) + each
   column's LoRA term, x (in, n) and y_m row-major, n <= 16 columns. AL (groups, R, in, 16), BL_m (groups,
   out_m, ranks_m, 16) and SL (null, or (groups, R, 16)) as lora_lanes takes them; lane[b]: column b's lane
   (its slot - 1), or -1 for a column with no term. `work` holds 16 * in + groups * R * 16 floats. Returns 0, or
   1 for arguments out of range (nothing is written then). */
int group_step(const float *x, int64_t in, int64_t n, int64_t members, const int64_t *table,
               const float *W0, const float *W1, const float *W2, const float *W3,
               const float *b0, const float *b1, const float *b2, const float *b3,
               const lane_t *AL, const float *SL, int64_t groups, int64_t R, const int64_t *lane,
               const lane_t *BL0, const lane_t *BL1, const lane_t *BL2, const lane_t *BL3,
               float *y0, float *y1, float *y2, float *y3, float *work, int threads) {
    Step st = {.in = in, .n = n, .members = members, .R = R, .groups = groups, .AL = AL, .SL = SL};
    const float *W[MEMBERS] = {W0, W1, W2, W3}, *bias[MEMBERS] = {b0, b1, b2, b3};
    const lane_t *BL[MEMBERS] = {BL0, BL1, BL2, BL3};
    float *Y[MEMBERS] = {y0, y1, y2, y3};
    if (members < 1 || members > MEMBERS || n < 1 || n > 16 || in < 1 || R < 0 || groups < 1 || groups > GROUPS)
        return 1;
    for (int64_t m = 0; m < members; m++) {
        const int64_t *row = table + 3 * m;
        if (row[0] < 0 || row[1] < 0 || row[0] + row[1] > R || row[2] < 0) return 1;
        st.W[m] = W[m], st.bias[m] = bias[m], st.BL[m] = BL[m], st.Y[m] = Y[m];
        st.rank0[m] = row[0], st.ranks[m] = row[1], st.out[m] = row[2];
        st.start[m + 1] = st.start[m] + (row[2] + 7) / 8;
    }
    for (int64_t b = 0; b < n; b++)
        if (lane[b] < -1 || lane[b] >= 16 * groups) return 1;
    int64_t used_groups = 0;
    st.touched = (i16){0};
    for (int64_t g = 0; g < groups; g++) {
        st.used[g] = 0;
        for (int l = 0; l < 16; l++) {
            int64_t s = l < n && lane[l] >= 0 ? lane[l] - 16 * g : -1;
            int inside = s >= 0 && s < 16;
            st.idx[g][l] = inside ? (int32_t)s : 0;
            st.in_group[g][l] = inside ? -1 : 0;
            st.used[g] |= inside;
        }
        st.touched |= st.in_group[g];
        if (st.used[g] && R > 0) st.task_group[used_groups++] = g;
        else st.used[g] = 0;
    }
    st.total = st.start[members];
    if (st.total == 0) return 0; /* no outputs */
    st.tasks = used_groups * R;
    st.h = work + 16 * in;
    st.xb = x;
    if (n < 16) { /* a partial block of columns: read from a copy padded with zeros */
        for (int64_t i = 0; i < in; i++)
            for (int l = 0; l < 16; l++) work[i * 16 + l] = l < n ? x[i * n + l] : 0.f;
        st.xb = work;
    }
    /* phase 1's share of the blocks: as the ranks' factors are of all the factors, at least one block a rank where
       there are enough, and at least one block left to phase 2 */
    double a_bytes = (double)st.tasks * in, b_bytes = 0;
    for (int64_t m = 0; m < members; m++) b_bytes += (double)used_groups * st.out[m] * st.ranks[m];
    st.split = 0;
    if (st.tasks) {
        st.split = (int64_t)(st.total * a_bytes / (a_bytes + b_bytes) + 0.5);
        if (st.split < st.tasks) st.split = st.tasks;
        if (st.split > st.total - 1) st.split = st.total - 1;
        if (st.split < 1) st.split = 1;
    }
    int64_t split = st.split, total = st.total;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < split; k++) block(&st, k);
#pragma omp for schedule(static)
        for (int64_t k = split; k < total; k++) {
            block(&st, k);
            for (int64_t p = first_taken(&st, k); p < first_taken(&st, k + 1); p++) add_terms(&st, p);
        }
        if (split == total) { /* a single block: its terms after it */
#pragma omp for schedule(static)
            for (int64_t p = 0; p < split; p++) add_terms(&st, p);
        }
    }
    return 0;
}
