/* Weight-only int8 matrix-vector products for decode on x86 CPUs with AVX2 + FMA, or AVX-512.
 *
 * y[m, n] = scale[n] * sum_k codes[n, k] * x[m, k]   (fp32 accumulation, fp32 output)
 *
 * codes int8 [N, ldw] row-major (K padded with zero codes to a multiple of 16), x fp32 [M, ldw]
 * (padded with zeros), scale fp32 [N], y fp32 [M, N]. Each output is summed by one thread in a
 * fixed order, so the result depends neither on the thread count nor on how many tokens a call
 * carries (the order is the build's: an AVX2 and an AVX-512 build differ in the last bits).
 *
 * Why not torch's _weight_int8pack_mm: on x86 it runs fp32 / fp16 activations through a scalar
 * loop, 5-10x slower than dense, and in bf16 it converts eight codes per instruction even on
 * AVX-512, once per token. Here a tile of rows shares every load of x and, from two tokens on, a
 * tile of tokens every convert of the codes; the codes a few cache lines ahead are prefetched.
 * At one token the AVX2 build is bound by its convert-and-FMA work (~4-6 GB/s of codes a core, in
 * cache and from memory alike); the AVX-512 build converts sixteen codes per instruction and
 * streams ~7 GB/s a core, the rate dense bf16 weights stream at on the same core. From two tokens
 * on the codes come from cache after the first and the FMAs set the pace
 * (python -c "import squeeze.kernels.cpu_native as m; m._bench_report()"; kernels/README.md).
 *
 * Threads: OpenMP. The library is linked against libgomp.so.1 by soname; torch's CPU wheels load
 * their own libgomp.so.1 first, so the loader hands this library the same runtime, and its
 * parallel regions run on torch's threads at torch.get_num_threads().
 */
#include <omp.h>

#include "simd.h"

#define PREFETCH 512  /* bytes ahead of the codes being read */
#define TOKENS 4       /* tokens sharing each convert of the codes */
#if ISA == 512         /* a tile of R rows x T tokens holds R * T accumulators, T of x and one of codes */
#define ROWS 8         /* rows of a tile at one or two tokens */
#define TROWS 4        /* rows of a tile at TOKENS tokens */
#else
#define ROWS 4
#define TROWS 2
#endif

/* y[t0 + t, r0 + i] = scale[r0 + i] * sum_k codes[r0 + i, k] * x[t0 + t, k] for R rows and T
 * tokens (compile-time constants once inlined). Each (row, token) is one FMA chain over chunks of
 * VL columns in order, then HSUM: the same operations whatever tile it is in, so an output has
 * the same bits at any token count (a row of a batch == that row alone, which self-speculative
 * verification relies on) and any thread count. The codes of a chunk are converted once for the
 * T tokens, x is loaded once for the R rows; the first P rows are prefetched (a tile that starts
 * a block prefetches the whole block, so the streams from memory are as many as at one token). */
static inline __attribute__((always_inline)) void tile(const int8_t *codes, int64_t n, int64_t ldw,
                                                       const float *scale, const float *x, float *y,
                                                       int64_t r0, int64_t t0, const int R, const int T,
                                                       const int P) {
    const int8_t *w = codes + r0 * ldw;
    x += t0 * ldw;
    vec a[ROWS * TOKENS];
    for (int q = 0; q < R * T; q++) a[q] = ZERO();
    for (int64_t j = 0; j < ldw; j += VL) {
        vec xs[TOKENS];
        for (int t = 0; t < T; t++) xs[t] = LOADX(x + t * ldw + j);
        for (int i = 0; i < P; i++) _mm_prefetch((const char *)(w + i * ldw + j + PREFETCH), _MM_HINT_T0);
        for (int i = 0; i < R; i++) {
            vec c = CODES(w + i * ldw + j);
            for (int t = 0; t < T; t++) a[t * R + i] = FMA(c, xs[t], a[t * R + i]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int i = 0; i < R; i++) y[(t0 + t) * n + r0 + i] = scale[r0 + i] * HSUM(a[t * R + i]);
}

/* Returns 0, or -1 when ldw is not a multiple of 16. Rows go to threads in blocks of ROWS; the
 * tokens of a call loop inside a block (TOKENS at a time in tiles of TROWS rows, then two, then
 * one, over the whole block), so its codes are read from memory once per call and from cache for
 * every further token, and converted once per tile. */
int sq_int8_gemv(const int8_t *codes, int64_t n, int64_t ldw, const float *scale, const float *x, int64_t m,
                 float *y) {
    if (ldw % 16) return -1;
    int64_t blocks = n / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r = b * ROWS, t = 0;
        for (; t + TOKENS <= m; t += TOKENS) {
            tile(codes, n, ldw, scale, x, y, r, t, TROWS, TOKENS, ROWS);
            for (int i = TROWS; i < ROWS; i += TROWS) tile(codes, n, ldw, scale, x, y, r + i, t, TROWS, TOKENS, 0);
        }
        for (; t + 2 <= m; t += 2) tile(codes, n, ldw, scale, x, y, r, t, ROWS, 2, ROWS);
        for (; t < m; t++) tile(codes, n, ldw, scale, x, y, r, t, ROWS, 1, ROWS);
    }
    for (int64_t r = blocks * ROWS; r < n; r++)
        for (int64_t t = 0; t < m; t++) tile(codes, n, ldw, scale, x, y, r, t, 1, 1, 1);
    return 0;
}

/* out[r - r0, c] = codes[r, c] * scale[r] for rows r0 <= r < r1 and columns c < k, as bf16
 * (rounded to nearest even) when bf16, else fp32; out is [r1 - r0, k] contiguous. Prefill runs its
 * GEMM on such panels of decoded rows, a cache's worth at a time (kernels/quant_cpu.py). */
void sq_int8_decode(const int8_t *codes, int64_t ldw, int64_t k, const float *scale, int64_t r0, int64_t r1,
                    void *out, int bf16) {
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *w = codes + r * ldw;
        vec s = SET1(scale[r]);
        int64_t c = 0;
        if (bf16) {
            uint16_t *o = (uint16_t *)out + (r - r0) * k;
            for (; c + VL <= k; c += VL) store_bf16(o + c, MUL(CODES(w + c), s));
            for (; c < k; c++) {
                union { float f; uint32_t u; } v = {.f = w[c] * scale[r]};
                o[c] = (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
            }
        } else {
            float *o = (float *)out + (r - r0) * k;
            for (; c + VL <= k; c += VL) STORE(o + c, MUL(CODES(w + c), s));
            for (; c < k; c++) o[c] = w[c] * scale[r];
        }
    }
}

/* The vector width it was built for, in bits (256: AVX2, 512: AVX-512). */
int sq_isa(void) { return ISA; }

/* The thread count this library's parallel regions get (tests: it is torch's). */
int sq_threads(void) { return omp_get_max_threads(); }
