/* A sibling group's decode step in one call: every member's base product and every column's LoRA term.

   A decode step of a mixed-adapter batch computes, for the layers of a sibling group fed the same x
   (q/k/v, gate/up; or one layer), y_m = W_m x + b_m + each column's (s B)_b A_b x. The base products
   (weight_kernel.c's loop: 8 weight rows, 16 columns, one broadcast weight per row and input) stream
   the weights; the LoRA terms, read by slot lanes (column_kernel.c's lora_lanes: the factors of 16
   slots interleaved, each column's lane moved into place with one shuffle), stream the factors of every
   adapter in the batch and do little with them. One parallel region does both:

   - first the ranks, h[g][j] = A_j x for every column, four ranks at a time over the inputs (each rank's sum over
     the inputs in order);
   - then the blocks of 8 weight rows: each block's base sums over the inputs in order with the same multiply-adds
     as weight_product, asking the memory for the next block's rows meanwhile, so that a member's W x (+ b) is the
     same to the bit as weight_product's (+ the bias); and each row's term sum_j (s B)[o][j] h[j] added to it once,
     as lora_lanes adds it, before it is stored.

   The ranks' factors read in a loop of their own stream faster than carried in the blocks' loop, one rank beside
   8 weight rows (a 135M model's 120 groups at 16 columns: 3% less time, the same bits). At most 16 columns (one
   block of columns).

   The factors are fp32, bf16 or int8 (lanes.h: each lane vector widened to fp32 as it is read, the sums in
   fp32; int8's rank j of A x multiplied by its factor in SL, both factors' scales, as lora_lanes does).

   Built by lorakit/native.py with FMA contraction, as weight_kernel.c; called by lora/group_kernel.py. */

#include "lanes.h" /* v16, i16, and the lane layouts' factor types */

#define MEMBERS 4 /* layers of a sibling group one call serves at most */
#define GROUPS 4  /* groups of 16 slots at most */
#define AT_ONCE 4 /* ranks summed side by side over the inputs */

typedef struct { /* what a call shares with its blocks */
    const float *xb, *W[MEMBERS], *bias[MEMBERS];
    const lane_t *AL, *BL[MEMBERS];
    const float *SL; /* null, or each slot's rank factors (groups, R, 16) */
    float *Y[MEMBERS], *h;
    int64_t in, n, R, groups, rank0[MEMBERS], ranks[MEMBERS], out[MEMBERS], start[MEMBERS + 1];
    int64_t total, tasks, task_group[GROUPS];
    i16 idx[GROUPS], in_group[GROUPS], touched;
    int used[GROUPS];
} Step;

/* the factors of rank task q (rank q % R of the q / R-th used group): A_j over the inputs, one lane vector per input */
static inline const lane_t *task_factors(const Step *st, int64_t q) {
    int64_t g = st->task_group[q / st->R];
    return st->AL + (g * st->R + q % st->R) * st->in * 16;
}

/* rank tasks q0 .. q0 + count - 1 (count <= AT_ONCE): each one's sums for every column over the inputs in order,
   stored in h times its factors where SL holds them */
static void ranks_of(const Step *st, int64_t q0, int64_t count) {
    const lane_t *a[AT_ONCE];
    i16 idx[AT_ONCE];
    v16 u[AT_ONCE];
    for (int c = 0; c < AT_ONCE; c++) {
        int64_t q = q0 + (c < count ? c : 0); /* past the last: rank q0 again, not stored */
        a[c] = task_factors(st, q);
        idx[c] = st->idx[st->task_group[q / st->R]];
        u[c] = (v16){0};
    }
    for (int64_t i = 0; i < st->in; i++) {
        v16 xv = *(const v16u *)(st->xb + i * 16);
        for (int c = 0; c < AT_ONCE; c++) u[c] += lanes_of(a[c] + i * 16, idx[c]) * xv;
    }
    for (int64_t c = 0; c < count; c++) {
        int64_t q = q0 + c, g = st->task_group[q / st->R], row = g * st->R + q % st->R;
        *(v16u *)(st->h + row * 16) = scaled(u[c], st->SL ? st->SL + row * 16 : 0, st->idx[g]);
    }
}

/* s[r] = the block's 8 rows times x over all inputs in order, asking for the next 8 rows (of this member or the next
   one) on the way, as weight_product does */
static void rows8(const Step *st, const float *const w[8], v16 s[8]) {
    const char *next = (const char *)(w[0] + 8 * st->in);
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    for (int64_t i = 0; i < st->in; i++) {
        if ((i & 1) == 0) __builtin_prefetch(next + 32 * i, 0, 1);
        v16 xv = *(const v16u *)(st->xb + i * 16);
        a0 += w[0][i] * xv, a1 += w[1][i] * xv, a2 += w[2][i] * xv, a3 += w[3][i] * xv;
        a4 += w[4][i] * xv, a5 += w[5][i] * xv, a6 += w[6][i] * xv, a7 += w[7][i] * xv;
    }
    s[0] = a0, s[1] = a1, s[2] = a2, s[3] = a3, s[4] = a4, s[5] = a5, s[6] = a6, s[7] = a7;
}

static inline int member_of(const Step *st, int64_t k) {
    int m = 0;
    while (k >= st->start[m + 1]) m++;
    return m;
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

/* block k: its 8 rows' base products, plus the bias and their terms, into y */
static void block(const Step *st, int64_t k) {
    int m = member_of(st, k);
    int64_t o = (k - st->start[m]) * 8, rows = st->out[m] - o < 8 ? st->out[m] - o : 8;
    const float *w[8];
    for (int r = 0; r < 8; r++) w[r] = st->W[m] + (o + (r < rows ? r : 0)) * st->in; /* past the last row: row o */
    v16 s[8];
    rows8(st, w, s);
    for (int64_t r = 0; r < rows; r++) {
        v16 v = s[r];
        if (st->bias[m]) v += st->bias[m][o + r];
        v = (v16)(((i16)(v + term_of(st, m, o + r)) & st->touched) | ((i16)v & ~st->touched));
        store(st->Y[m] + (o + r) * st->n, v, st->n);
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
    Step st = {.in = in, .n = n, .R = R, .groups = groups, .AL = AL, .SL = SL};
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
    int64_t tasks = st.tasks, total = st.total;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t q = 0; q < tasks; q += AT_ONCE) ranks_of(&st, q, tasks - q < AT_ONCE ? tasks - q : AT_ONCE);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < total; k++) block(&st, k);
    }
    return 0;
}
