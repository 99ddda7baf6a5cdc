/* MF-BPR SGD in C for train.engine: native (compiled and loaded by recval_ray/core/native_bpr.py).
 *
 * recval_bpr_step: one batch-synchronous SGD step on the B training rows idx[b] (user u, positive
 * item i), one negative j each, on the loss mean_b softplus(-x_b) + reg * mean_b l2_b / 2:
 *   x_b = p_u . (q_i - q_j),  s_b = lr / B * sigmoid(-x_b),  rho = lr * reg / B
 *   p_u += s_b (q_i - q_j) - rho p_u,   q_i += s_b p_u - rho q_i,   q_j += -s_b p_u - rho q_j
 * The gradients use the rows as they were before the step (p_u and s_b (q_i - q_j) are copied in
 * pass 1); an item row's decay uses its value when the update is applied.
 * Pass 1 (the batch split in T contiguous chunks, one per thread) gathers, draws the negatives,
 * scores, and lists each slot under the thread that owns its rows (row % T). Pass 2: every
 * thread applies the updates of the rows it owns: positives' rows, then negatives' rows, then
 * users' rows, each in batch order. No races, no atomics, and each row sees the same sequence
 * of float operations whatever T: the same weights for any number of threads.
 *
 * Negatives: uniform over the items the user has no training row with, by rejection with a
 * counter-based hash of (seed, training row, attempt); membership: a filter of the training
 * pairs (one bit per hashed pair, ~16 bits a row) answers "not a training pair" with one load,
 * and only when its bit is set does a binary search in the user's sorted items (CSR) decide;
 * after MAX_TRIES rejections, the exact walk to the r-th free item. Exact either way.
 * Memory latency is hidden by a software pipeline (prefetches AHEAD slots in advance).
 *
 * recval_visit_rows: positions [start, start + B) of an epoch's visit order, a seeded bijection
 * of [0, n) (odd multiplications, xor-shifts and additions on the next power of two, cycle
 * walking into [0, n)): each row once an epoch, without a permutation array.
 */
#include <stdint.h>
#include <math.h>
#include <omp.h>

#define MAX_TRIES 32
#define AHEAD 8
#define MAX_THREADS 64

static inline void prefetch_row(const float *p, int64_t d) {
    for (int64_t k = 0; k < d; k += 16) __builtin_prefetch(p + k);
}

static inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline int contains(const int32_t *a, int64_t lo, int64_t hi, int32_t v) {
    while (hi - lo > 8) {
        int64_t mid = lo + ((hi - lo) >> 1);
        if (a[mid] > v) hi = mid; else lo = mid;
    }
    for (; lo < hi; ++lo)
        if (a[lo] == v) return 1;
    return 0;
}

static inline int64_t below(uint64_t r, int64_t n) {          /* uniform in [0, n), n < 2^32 */
    return (int64_t)(((r >> 32) * (uint64_t)n) >> 32);
}

/* the training pairs' filter: bit h(u, j) set for every training row (u, j); clear = (u, j)
 * is not a training row (no search needed), set = maybe (the binary search decides) */
static inline uint64_t pair_bit(int64_t u, int64_t j, int64_t n_items, uint64_t fmask) {
    return mix64((uint64_t)(u * n_items + j) ^ 0x5851F42D4C957F2DULL) & fmask;
}

static inline int maybe_pair(const uint64_t *filter, uint64_t fmask, int64_t u, int64_t j, int64_t n_items) {
    const uint64_t h = pair_bit(u, j, n_items, fmask);
    return (int)((filter[h >> 6] >> (h & 63)) & 1);
}

/* the first candidate of a draw (attempt 0), for the pipeline to prefetch its filter word */
static inline int64_t first_candidate(uint64_t key, int64_t n_items) {
    return below(mix64(key), n_items);
}

/* a negative for user u whose sorted items are csr[lo:hi); filter may be NULL (search always):
 * the same negative either way */
static inline int64_t draw_negative(uint64_t key, int64_t u, const int32_t *csr, int64_t lo, int64_t hi,
                                    int64_t n_items, const uint64_t *filter, uint64_t fmask) {
    const int64_t free_ = n_items - (hi - lo);
    if (free_ <= 0) return below(mix64(key), n_items);
    for (uint64_t a = 0; a < MAX_TRIES; ++a) {
        const int64_t j = below(mix64(key + a * 0xD1B54A32D192ED03ULL), n_items);
        if ((filter && !maybe_pair(filter, fmask, u, j, n_items)) || !contains(csr, lo, hi, (int32_t)j))
            return j;
    }
    int64_t j = below(mix64(key ^ 0xA0761D6478BD642FULL), free_);   /* the j-th free item */
    for (int64_t p = lo; p < hi && csr[p] <= j; ++p) ++j;
    return j;
}

/* sets the filter's bits of the n training rows (filter: fmask + 1 bits, zeroed by the caller) */
void recval_build_filter(const int32_t *users, const int32_t *items, int64_t n, int64_t n_items,
                         uint64_t *filter, uint64_t fmask) {
    for (int64_t r = 0; r < n; ++r) {
        const uint64_t h = pair_bit(users[r], items[r], n_items, fmask);
        filter[h >> 6] |= 1ULL << (h & 63);
    }
}

/* negatives for (users[b], key rows[b]); the draw of a training row does not depend on the
 * other rows of the batch */
void recval_sample_negatives(const int64_t *users, const int64_t *rows, int64_t n,
                             const int64_t *indptr, const int32_t *csr, int64_t n_items,
                             const uint64_t *filter, uint64_t fmask, uint64_t seed, int64_t *out,
                             int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n; ++b) {
        const int64_t u = users[b];
        out[b] = draw_negative(mix64(seed ^ mix64((uint64_t)rows[b])), u, csr, indptr[u], indptr[u + 1], n_items,
                               filter, fmask);
    }
}

static inline uint64_t permute_bits(uint64_t x, const uint64_t *k, int bits, uint64_t mask) {
    const int h = bits / 2 + 1;
    for (int r = 0; r < 4; ++r) {
        x = (x * (k[r] | 1ULL)) & mask;
        x ^= x >> h;
        x = (x + (k[r] >> 32)) & mask;
    }
    return x;
}

void recval_visit_rows(uint64_t seed, int64_t n, int64_t start, int64_t B, const int64_t *visit,
                       int64_t *out, int threads) {
    int bits = 1;
    while (bits < 63 && ((int64_t)1 << bits) < n) ++bits;
    const uint64_t mask = ((uint64_t)1 << bits) - 1;
    uint64_t k[4];
    for (int r = 0; r < 4; ++r) k[r] = mix64(seed + 0x632BE59BD9B4E019ULL * (uint64_t)(r + 1));
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        uint64_t x = permute_bits((uint64_t)(start + b), k, bits, mask);
        while (x >= (uint64_t)n) x = permute_bits(x, k, bits, mask);
        out[b] = visit ? visit[x] : (int64_t)x;
    }
}

/* users/items: the training rows' codes (int32); idx: the B rows of the batch; neg: drawn here
 * when draw != 0, else given. Writes u/i of each slot (U, I), S (the scale s_b), P (p_u), G
 * (user gradient rows), per (softplus(-x)), l2 (|p_u|^2 + |q_i|^2 + |q_j|^2), and per into
 * row_loss[idx[b]] unless row_loss is NULL (the trainer's per-row loss record). Workspace: lists
 * 3 T (B + T) int32, counts 3 T T int64, T = min(threads, MAX_THREADS). */
void recval_bpr_step(float *Wu, float *Wi, int64_t d, const int32_t *users, const int32_t *items,
                     const int64_t *idx, int64_t B, const int64_t *indptr, const int32_t *csr,
                     int64_t n_items, const uint64_t *filter, uint64_t fmask,
                     uint64_t seed, int draw, int64_t *neg, float lr, float reg,
                     int64_t *U, int64_t *I, float *S, float *P, float *G, float *per, float *l2,
                     float *row_loss, int32_t *lists, int64_t *counts, int threads) {
    const float scale = lr / (float)B, rho = lr * reg / (float)B;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t lo = B * t / T, hi = B * (t + 1) / T;     /* this thread's slots */
        const int64_t cap = B / T + 1;                          /* >= hi - lo */
        /* the slots of this chunk whose positive / negative / user row thread o owns:
         * lists[((t * T + o) * 3 + kind) * cap + n], counted in len[t][o][kind] */
        int64_t len[3 * MAX_THREADS];
        for (int64_t x = 0; x < 3 * T; ++x) len[x] = 0;
        /* a software pipeline over the slots: at b + 3A the row's codes are prefetched, at
         * b + 2A its embedding rows and CSR bounds, at b + A the negative is drawn and its row
         * prefetched, at b the slot is scored */
        for (int64_t b = lo; b < hi && b < lo + AHEAD; ++b)
            if (draw) {
                const int64_t r = idx[b], u = users[r];
                neg[b] = draw_negative(mix64(seed ^ mix64((uint64_t)r)), u, csr, indptr[u], indptr[u + 1], n_items,
                                       filter, fmask);
            }
        for (int64_t b = lo; b < hi; ++b) {
            if (b + 3 * AHEAD < hi) {
                const int64_t r3 = idx[b + 3 * AHEAD];
                __builtin_prefetch(users + r3);
                __builtin_prefetch(items + r3);
            }
            if (b + 2 * AHEAD < hi) {
                const int64_t r2 = idx[b + 2 * AHEAD], u2 = users[r2], i2 = items[r2];
                prefetch_row(Wu + u2 * d, d);
                prefetch_row(Wi + i2 * d, d);
                __builtin_prefetch(indptr + u2);
                if (row_loss) __builtin_prefetch(row_loss + r2, 1);
                if (draw && filter) {       /* the filter word of the draw's first candidate */
                    const uint64_t h = pair_bit(u2, first_candidate(mix64(seed ^ mix64((uint64_t)r2)), n_items),
                                                n_items, fmask);
                    __builtin_prefetch(filter + (h >> 6));
                }
            }
            if (b + AHEAD < hi) {
                const int64_t r1 = idx[b + AHEAD];
                if (draw) {
                    const int64_t u1 = users[r1];
                    neg[b + AHEAD] = draw_negative(mix64(seed ^ mix64((uint64_t)r1)), u1, csr, indptr[u1],
                                                   indptr[u1 + 1], n_items, filter, fmask);
                }
                prefetch_row(Wi + neg[b + AHEAD] * d, d);
            }
            const int64_t r = idx[b], u = users[r], i = items[r];
            U[b] = u;
            I[b] = i;
            {
                const int64_t oi = i % T, oj = neg[b] % T, ou = u % T;
                lists[((t * T + oi) * 3 + 0) * cap + len[oi * 3 + 0]++] = (int32_t)b;
                lists[((t * T + oj) * 3 + 1) * cap + len[oj * 3 + 1]++] = (int32_t)b;
                lists[((t * T + ou) * 3 + 2) * cap + len[ou * 3 + 2]++] = (int32_t)b;
            }
            const int64_t j = neg[b];
            const float *pu = Wu + u * d, *qi = Wi + i * d, *qj = Wi + j * d;
            float *g = G + b * d, *p = P + b * d;
            float x = 0.f, n2 = 0.f;
            #pragma omp simd reduction(+:x, n2)
            for (int64_t k = 0; k < d; ++k) {
                const float diff = qi[k] - qj[k];
                g[k] = diff;
                p[k] = pu[k];
                x += pu[k] * diff;
                n2 += pu[k] * pu[k] + qi[k] * qi[k] + qj[k] * qj[k];
            }
            /* e = exp(-x): softplus(-x) = log1p(e), sigmoid(-x) = e / (1 + e) */
            const float e = expf(fminf(-x, 80.f));
            per[b] = -x > 20.f ? -x : log1pf(e);
            if (row_loss) row_loss[r] = per[b];
            l2[b] = n2;
            const float s = scale * (e / (1.f + e));
            S[b] = s;
            #pragma omp simd
            for (int64_t k = 0; k < d; ++k)
                g[k] = s * g[k] - rho * p[k];
        }
        for (int64_t x = 0; x < 3 * T; ++x) counts[t * 3 * T + x] = len[x];
        #pragma omp barrier
        /* every table row by the thread that owns it: the positives' rows, the negatives' rows,
         * then the users' rows, each in batch order (chunks in order, slots in order) */
        for (int kind = 0; kind < 3; ++kind)
            for (int64_t c = 0; c < T; ++c) {
                const int32_t *list = lists + ((c * T + t) * 3 + kind) * cap;
                const int64_t n = counts[(c * T + t) * 3 + kind];
                for (int64_t e = 0; e < n; ++e) {
                    if (e + AHEAD < n) {
                        const int32_t b1 = list[e + AHEAD];
                        prefetch_row(kind == 2 ? Wu + U[b1] * d : Wi + (kind ? neg[b1] : I[b1]) * d, d);
                    }
                    const int32_t b = list[e];
                    const float *p = P + (int64_t)b * d;
                    if (kind == 2) {
                        float *w = Wu + U[b] * d;
                        const float *g = G + (int64_t)b * d;
                        #pragma omp simd
                        for (int64_t k = 0; k < d; ++k) w[k] += g[k];
                    } else {
                        const float s = kind ? -S[b] : S[b];
                        float *q = Wi + (kind ? neg[b] : I[b]) * d;
                        #pragma omp simd
                        for (int64_t k = 0; k < d; ++k) q[k] += s * p[k] - rho * q[k];
                    }
                }
            }
    }
}
