/* Input-sparse matrix-vector products for decode: the weight rows of active inputs only.
 *
 * y[t, c] = scale[c] * sum_{j = off[t]}^{off[t+1]-1} val[j] * W[idx[j], c]  (+ bias[c])
 *
 * W is stored by input row ([K, ldr] row-major, TEAL / WINA's transposed layout): fp32, bf16 or
 * int8 codes (scale: the per-output scales of an int8 weight; NULL for fp32 / bf16). idx / val
 * are each token's non-zero inputs (column, value), tokens one after another as offsets say (an
 * embedding bag's layout). y is [T, n], fp32 or bf16 (rounded to nearest even once, from the fp32
 * sum).
 *
 * Why not torch's embedding bags (kernels/cpu_input_sparse.py): a bag reads its rows one at a
 * time with no look-ahead, so scattered rows stream at ~9 GB/s where a dense weight streams at
 * ~12 (one core, bench/README.md section 8b), and each decode linear costs several torch calls
 * (blocked indices, the bag, unblocking, scale, cast). Here G rows are summed per pass over an
 * accumulator that stays in L1, and while one group of rows streams, the next group's rows are
 * prefetched at the same columns, so the loads of the next rows are in flight before they are
 * needed. One call does the whole linear.
 *
 * Each output is one FMA chain over the token's rows in idx order, whatever the thread count
 * (threads split the columns) and however many tokens the call carries: a token batched gives
 * the same bits as alone.
 */
#include <omp.h>
#include <stdlib.h>

#include "simd.h"

#define G 4         /* rows summed per pass over the accumulator */
#define BLOCK 4096  /* most columns a thread accumulates at once (16 KB of fp32 in L1) */
#define MIN_WIDTH 256

enum { W_FP32 = 0, W_BF16 = 1, W_INT8 = 2, W_INT4 = 3 };

/* the byte offset of column c in a row of fp32, bf16 or int8 */
static inline __attribute__((always_inline)) int64_t at(int64_t c, const int kind) {
    return kind == W_FP32 ? 4 * c : kind == W_BF16 ? 2 * c : c;
}

static inline __attribute__((always_inline)) vec wload(const char *row, int64_t c, const int kind) {
    if (kind == W_FP32) return LOADX((const float *)row + c);
    if (kind == W_BF16) return BF16((const uint16_t *)row + c);
    return CODES((const int8_t *)row + c);
}

static inline __attribute__((always_inline)) float wscalar(const char *row, int64_t c, const int kind) {
    if (kind == W_FP32) return ((const float *)row)[c];
    if (kind == W_BF16) {
        union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)row)[c] << 16};
        return v.f;
    }
    if (kind == W_INT8) return ((const int8_t *)row)[c];
    const uint8_t b = ((const uint8_t *)row)[c / 2];
    return (float)((c & 1 ? b >> 4 : b & 15) - 8);
}

/* acc[0, width) = sum_j val[j] * W[idx[j], c0 + c], G rows a pass, in idx order per output. */
static inline __attribute__((always_inline)) void accumulate(const char *w, int64_t row_bytes, const int kind,
                                                             const int64_t *idx, const float *val, int64_t nnz,
                                                             int64_t c0, int64_t width, float *acc) {
    const int64_t vw = width - width % VL, start = at(c0, kind);
    for (int64_t c = 0; c < width; c++) acc[c] = 0.0f;
    int64_t j = 0;
    for (; j + G <= nnz; j += G) {
        const char *r[G], *p[G];
        vec v[G];
        const int64_t *nx = j + 2 * G <= nnz ? idx + j + G : idx + j;  /* the last group prefetches itself */
        for (int g = 0; g < G; g++) {
            r[g] = w + idx[j + g] * row_bytes + start;
            p[g] = w + nx[g] * row_bytes + start;
            v[g] = SET1(val[j + g]);
        }
        for (int64_t c = 0; c < vw; c += VL) {
            if (at(c, kind) % 64 == 0)
                for (int g = 0; g < G; g++) _mm_prefetch(p[g] + at(c, kind), _MM_HINT_T0);
            vec a = LOADX(acc + c);
            for (int g = 0; g < G; g++) a = FMA(v[g], wload(r[g], c, kind), a);
            STORE(acc + c, a);
        }
        for (int64_t c = vw; c < width; c++)
            for (int g = 0; g < G; g++) acc[c] = __builtin_fmaf(val[j + g], wscalar(r[g], c, kind), acc[c]);
    }
    for (; j < nnz; j++) {
        const char *r = w + idx[j] * row_bytes + start;
        vec v = SET1(val[j]);
        int64_t c = 0;
        for (; c < vw; c += VL) STORE(acc + c, FMA(v, wload(r, c, kind), LOADX(acc + c)));
        for (; c < width; c++) acc[c] = __builtin_fmaf(val[j], wscalar(r, c, kind), acc[c]);
    }
}

static inline void finish(const float *acc, int64_t width, const float *scale, const float *bias, void *y,
                          int bf16) {
    int64_t c = 0;
    if (bf16) {
        uint16_t *o = (uint16_t *)y;
        for (; c + VL <= width; c += VL) {
            vec a = LOADX(acc + c);
            if (scale) a = MUL(a, LOADX(scale + c));
            if (bias) a = ADD(a, LOADX(bias + c));
            store_bf16(o + c, a);
        }
        for (; c < width; c++) {
            union { float f; uint32_t u; } v = {.f = acc[c] * (scale ? scale[c] : 1.0f) + (bias ? bias[c] : 0.0f)};
            o[c] = (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
        }
    } else {
        float *o = (float *)y;
        for (; c < width; c++) o[c] = acc[c] * (scale ? scale[c] : 1.0f) + (bias ? bias[c] : 0.0f);
    }
}

/* How many column blocks each token's row sum is split into: enough for every thread to have
 * one, each at least MIN_WIDTH columns and at most BLOCK, a multiple of 64 columns wide. */
static int64_t block_width(int64_t n, int64_t t, int threads) {
    int64_t nb = (n + BLOCK - 1) / BLOCK;
    while (nb * t < threads && n / (nb + 1) >= MIN_WIDTH) nb++;
    int64_t width = (n + nb - 1) / nb;
    width = (width + 63) / 64 * 64;
    return width < BLOCK ? width : BLOCK;
}

static void rows_sum(const void *w, int kind, int64_t ldr, int64_t n, const int64_t *idx, const float *val,
                     const int64_t *off, int64_t t, const float *scale, const float *bias, void *y, int bf16);
static void rows4_sum(const uint8_t *w, int64_t ldr, int64_t n, int64_t gk, const int64_t *idx, const float *val,
                      const int64_t *off, int64_t t, const float *s, const float *z, const float *bias, void *y,
                      int bf16);

/* Returns 0, or -1 for an unknown kind. w: [K, ldr] elements of `kind`; y: [t, n]. off NULL: one
 * token whose entries are all nnz of idx / val. */
int sq_rows_mv(const void *w, int kind, int64_t ldr, int64_t n, const int64_t *idx, const float *val,
               const int64_t *off, int64_t t, int64_t nnz, const float *scale, const float *bias, void *y,
               int bf16) {
    if (kind < W_FP32 || kind > W_INT8 || (!off && t != 1)) return -1;
    const int64_t one[2] = {0, nnz};
    rows_sum(w, kind, ldr, n, idx, val, off ? off : one, t, scale, bias, y, bf16);
    return 0;
}

static void rows_sum(const void *w, int kind, int64_t ldr, int64_t n, const int64_t *idx, const float *val,
                     const int64_t *off, int64_t t, const float *scale, const float *bias, void *y, int bf16) {
    const int64_t width = block_width(n, t, omp_get_max_threads());
    const int64_t nb = (n + width - 1) / width;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < t * nb; q++) {
        float acc[BLOCK] __attribute__((aligned(64)));
        const int64_t tok = q / nb, c0 = (q % nb) * width;
        const int64_t wd = c0 + width <= n ? width : n - c0;
        const int64_t *ix = idx + off[tok];
        const float *vx = val + off[tok];
        const int64_t count = off[tok + 1] - off[tok];
        const char *wc = (const char *)w;
        if (kind == W_FP32) accumulate(wc, at(ldr, W_FP32), W_FP32, ix, vx, count, c0, wd, acc);
        else if (kind == W_BF16) accumulate(wc, at(ldr, W_BF16), W_BF16, ix, vx, count, c0, wd, acc);
        else accumulate(wc, ldr, W_INT8, ix, vx, count, c0, wd, acc);
        char *yo = (char *)y + (tok * n + c0) * (bf16 ? 2 : 4);
        finish(acc, wd, scale ? scale + c0 : NULL, bias ? bias + c0 : NULL, yo, bf16);
    }
}

/* accumulate() for int4 codes (u - 8): VL bytes hold 2 VL columns, the low nibbles the even ones
 * and the high the odd ones, so a pass sums them into two vectors of even and of odd columns
 * (no nibble shuffling per row) and the sums are put back in column order once at the end. The
 * columns past the last 2 VL block are summed one by one, in the same row order. */
static void accumulate4(const char *w, int64_t row_bytes, const int64_t *idx, const float *val, int64_t nnz,
                        int64_t c0, int64_t width, float *acc) {
    const int64_t vw = width - width % (2 * VL), start = c0 / 2;
    for (int64_t c = 0; c < width; c++) acc[c] = 0.0f;
    int64_t j = 0;
    for (; j + G <= nnz; j += G) {
        const char *r[G], *p[G];
        vec v[G];
        const int64_t *nx = j + 2 * G <= nnz ? idx + j + G : idx + j;
        for (int g = 0; g < G; g++) {
            r[g] = w + idx[j + g] * row_bytes + start;
            p[g] = w + nx[g] * row_bytes + start;
            v[g] = SET1(val[j + g]);
        }
        for (int64_t c = 0; c < vw; c += 2 * VL) {
            if ((c / 2) % 64 == 0)
                for (int g = 0; g < G; g++) _mm_prefetch(p[g] + c / 2, _MM_HINT_T0);
            vec e = LOADX(acc + c), o = LOADX(acc + c + VL);
            for (int g = 0; g < G; g++) {
                ivec b = BYTES(r[g] + c / 2);
                e = FMA(v[g], U4F(LO4(b)), e);
                o = FMA(v[g], U4F(HI4(b)), o);
            }
            STORE(acc + c, e);
            STORE(acc + c + VL, o);
        }
        for (int64_t c = vw; c < width; c++)
            for (int g = 0; g < G; g++) acc[c] = __builtin_fmaf(val[j + g], wscalar(r[g], c, W_INT4), acc[c]);
    }
    for (; j < nnz; j++) {
        const char *r = w + idx[j] * row_bytes + start;
        vec v = SET1(val[j]);
        for (int64_t c = 0; c < vw; c += 2 * VL) {
            ivec b = BYTES(r + c / 2);
            STORE(acc + c, FMA(v, U4F(LO4(b)), LOADX(acc + c)));
            STORE(acc + c + VL, FMA(v, U4F(HI4(b)), LOADX(acc + c + VL)));
        }
        for (int64_t c = vw; c < width; c++) acc[c] = __builtin_fmaf(val[j], wscalar(r, c, W_INT4), acc[c]);
    }
    for (int64_t c = 0; c < vw; c += 2 * VL) INTERLEAVE(LOADX(acc + c), LOADX(acc + c + VL), acc + c);
}

/* int4 codes by input row, in groups of gk inputs (torch's 4-bit bag layout, ldr bytes a row: the
 * code u of column 2j in the low nibble of byte j, 2j + 1 in the high): weight (u - 8) * s[g, c] +
 * z[g, c] for input row i of group g = i / gk (z NULL: symmetric). Per token and column block,
 * each group's rows are summed as above (of u - 8) and the group's partial sums weighed by its
 * scales, its input sum by its zero terms, into the fp32 output sum. A run of a token's entries
 * in one group is weighed at once: increasing idx (as nonzero() gives them) makes each group one
 * run; any other order gives the same sum with more passes. */
int sq_rows4_mv(const uint8_t *w, int64_t ldr, int64_t n, int64_t gk, const int64_t *idx, const float *val,
                const int64_t *off, int64_t t, int64_t nnz, const float *s, const float *z, const float *bias,
                void *y, int bf16) {
    if (gk <= 0 || (!off && t != 1)) return -1;
    const int64_t one[2] = {0, nnz};
    rows4_sum(w, ldr, n, gk, idx, val, off ? off : one, t, s, z, bias, y, bf16);
    return 0;
}

static void rows4_sum(const uint8_t *w, int64_t ldr, int64_t n, int64_t gk, const int64_t *idx, const float *val,
                      const int64_t *off, int64_t t, const float *s, const float *z, const float *bias, void *y,
                      int bf16) {
    const int64_t width = block_width(n, t, omp_get_max_threads());
    const int64_t nb = (n + width - 1) / width;
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < t * nb; q++) {
        float acc[BLOCK] __attribute__((aligned(64))), part[BLOCK] __attribute__((aligned(64)));
        const int64_t tok = q / nb, c0 = (q % nb) * width;
        const int64_t wd = c0 + width <= n ? width : n - c0;
        for (int64_t c = 0; c < wd; c++) acc[c] = 0.0f;
        for (int64_t j = off[tok], e = off[tok + 1]; j < e;) {
            const int64_t g = idx[j] / gk;
            int64_t k = j;
            float xs = 0.0f;
            for (; k < e && idx[k] / gk == g; k++) xs += val[k];
            accumulate4((const char *)w, ldr, idx + j, val + j, k - j, c0, wd, part);
            const float *sg = s + g * n + c0, *zg = z ? z + g * n + c0 : NULL;
            for (int64_t c = 0; c < wd; c++) {
                float a = __builtin_fmaf(part[c], sg[c], acc[c]);
                acc[c] = zg ? __builtin_fmaf(xs, zg[c], a) : a;
            }
            j = k;
        }
        char *yo = (char *)y + (tok * n + c0) * (bf16 ? 2 : 4);
        finish(acc, wd, NULL, bias ? bias + c0 : NULL, yo, bf16);
    }
}


/* -- from an unmasked activation ------------------------------------------------------------- */

/* The entries the sums above read, found in the activation itself: for each token of x [t, k]
 * (fp32, or bf16 when bf16; ldx elements a row) the inputs whose score, |x| or |x| * wscale
 * (WINA; wscale NULL: TEAL), is above thr, as (column, fp32 value) in column order, tokens one
 * after another (off [t + 1]). Scores are rounded to x's dtype before the comparison and thr must
 * be a value of that dtype, so the kept set is exactly what torch's hardshrink(x, thr) or
 * where(|x| * s > thr, x, 0) keeps in that dtype (the masks of runtime/act_sparse.py). idx and val
 * have room for t * k entries. Returns the entry count. */
int64_t sq_select(const void *x, int bf16, int64_t t, int64_t k, int64_t ldx, float thr, const float *wscale,
                  int64_t *idx, float *val, int64_t *off) {
    const vec th = SET1(thr);
    int64_t nnz = 0;
    off[0] = 0;
    for (int64_t tok = 0; tok < t; tok++) {
        const float *xf = (const float *)x + tok * ldx;
        const uint16_t *xb = (const uint16_t *)x + tok * ldx;
        int64_t i = 0;
        for (; i + VL <= k; i += VL) {
            vec s = ABS(bf16 ? BF16(xb + i) : LOADX(xf + i));
            if (wscale) s = bf16 ? round_bf16(MUL(s, LOADX(wscale + i))) : MUL(s, LOADX(wscale + i));
            for (unsigned m = GT(s, th); m; m &= m - 1) {  /* few lanes pass: visit those only */
                const int64_t c = i + __builtin_ctz(m);
                idx[nnz] = c;
                val[nnz++] = bf16 ? wscalar((const char *)xb, c, W_BF16) : xf[c];
            }
        }
        for (; i < k; i++) {
            const float f = bf16 ? wscalar((const char *)xb, i, W_BF16) : xf[i];
            float s = __builtin_fabsf(f);
            if (wscale) {
                s *= wscale[i];
                if (bf16) {
                    union { float f; uint32_t u; } v = {.f = s};
                    v.u = (v.u + 0x7fff + ((v.u >> 16) & 1)) & 0xffff0000u;
                    s = v.f;
                }
            }
            idx[nnz] = i;
            val[nnz] = f;
            nnz += s > thr;
        }
        off[tok + 1] = nnz;
    }
    return nnz;
}

/* Where a site call keeps its entries: per calling thread, grown to the largest call, never freed
 * (t * k entries: 12 bytes an input). */
static __thread char *scratch;
static __thread int64_t scratch_bytes;

static int entries_room(int64_t t, int64_t k, int64_t **idx, float **val, int64_t **off) {
    const int64_t need = t * k * 12 + (t + 1) * 8;
    if (need > scratch_bytes) {
        char *p = realloc(scratch, need);
        if (!p) return -1;
        scratch = p;
        scratch_bytes = need;
    }
    *idx = (int64_t *)scratch;
    *off = *idx + t * k;
    *val = (float *)(*off + t + 1);
    return 0;
}

/* One input-sparse linear from its unmasked input: sq_select, then sq_rows_mv's sums, or nothing
 * when the call keeps more than max_nnz entries (the caller's plan says the dense kernel wins
 * there). Returns the entry count, -2 over max_nnz, -1 for a bad kind or no memory. */
int64_t sq_site_mv(const void *x, int xbf16, int64_t t, int64_t k, int64_t ldx, float thr, const float *wscale,
                   int64_t max_nnz, const void *w, int kind, int64_t ldr, int64_t n, const float *scale,
                   const float *bias, void *y, int bf16) {
    int64_t *idx, *off;
    float *val;
    if (kind < W_FP32 || kind > W_INT8 || entries_room(t, k, &idx, &val, &off)) return -1;
    const int64_t nnz = sq_select(x, xbf16, t, k, ldx, thr, wscale, idx, val, off);
    if (nnz > max_nnz) return -2;
    rows_sum(w, kind, ldr, n, idx, val, off, t, scale, bias, y, bf16);
    return nnz;
}

/* The same over int4 codes (sq_rows4_mv's layout and arguments). */
int64_t sq_site4_mv(const void *x, int xbf16, int64_t t, int64_t k, int64_t ldx, float thr, const float *wscale,
                    int64_t max_nnz, const uint8_t *w, int64_t ldr, int64_t n, int64_t gk, const float *s,
                    const float *z, const float *bias, void *y, int bf16) {
    int64_t *idx, *off;
    float *val;
    if (gk <= 0 || entries_room(t, k, &idx, &val, &off)) return -1;
    const int64_t nnz = sq_select(x, xbf16, t, k, ldx, thr, wscale, idx, val, off);
    if (nnz > max_nnz) return -2;
    rows4_sum(w, ldr, n, gk, idx, val, off, t, s, z, bias, y, bf16);
    return nnz;
}
