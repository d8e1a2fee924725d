/* Weight-only int8 matrix-vector products for decode on x86 CPUs with AVX2 + FMA.
 *
 * y[m, n] = scale[n] * sum_k codes[n, k] * x[m, k]   (fp32 accumulation, fp32 output)
 *
 * codes int8 [N, ldw] row-major (K padded with zero codes to a multiple of 16), x fp32 [M, ldw]
 * (padded with zeros), scale fp32 [N], y fp32 [M, N]. Each output row is summed by one thread in a
 * fixed order, so the result does not depend on the thread count.
 *
 * Why not torch's _weight_int8pack_mm: on AVX2 it runs fp32 / fp16 activations through a scalar
 * loop, 5-10x slower than dense (bf16 keeps the op: end to end it decodes as fast as this kernel
 * there, kernels/README.md). Here four rows share
 * every load of x, two independent FMA chains run per row, and the codes a few cache lines ahead
 * are prefetched. One core is still bound by the convert-and-FMA work (~4 GB/s of codes on the
 * development machine, in cache and from memory alike), not by bytes
 * (python -c "import squeeze.kernels.cpu_native as m; m._bench_report()"; kernels/README.md).
 *
 * Threads: OpenMP. The library is linked against libgomp.so.1 by soname; torch's CPU wheels load
 * their own libgomp.so.1 first, so the loader hands this library the same runtime, and its
 * parallel regions run on torch's threads at torch.get_num_threads().
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define ROWS 4        /* rows per block: x is loaded once per 4 rows */
#define PREFETCH 512  /* bytes ahead of the codes being read */

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* eight int8 codes -> eight floats (exact: |code| <= 127) */
static inline __m256 codes8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static void block4(const int8_t *w, int64_t ldw, const float *x, int64_t k, float *acc) {
    const int8_t *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t j = 0; j < k; j += 16) {
        _mm_prefetch((const char *)(w0 + j + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + j + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w2 + j + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w3 + j + PREFETCH), _MM_HINT_T0);
        __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
        a0 = _mm256_fmadd_ps(codes8(w0 + j), x0, a0);
        b0 = _mm256_fmadd_ps(codes8(w0 + j + 8), x1, b0);
        a1 = _mm256_fmadd_ps(codes8(w1 + j), x0, a1);
        b1 = _mm256_fmadd_ps(codes8(w1 + j + 8), x1, b1);
        a2 = _mm256_fmadd_ps(codes8(w2 + j), x0, a2);
        b2 = _mm256_fmadd_ps(codes8(w2 + j + 8), x1, b2);
        a3 = _mm256_fmadd_ps(codes8(w3 + j), x0, a3);
        b3 = _mm256_fmadd_ps(codes8(w3 + j + 8), x1, b3);
    }
    acc[0] = hsum(_mm256_add_ps(a0, b0));
    acc[1] = hsum(_mm256_add_ps(a1, b1));
    acc[2] = hsum(_mm256_add_ps(a2, b2));
    acc[3] = hsum(_mm256_add_ps(a3, b3));
}

static float row1(const int8_t *w, const float *x, int64_t k) {
    __m256 a = _mm256_setzero_ps(), b = a;
    for (int64_t j = 0; j < k; j += 16) {
        a = _mm256_fmadd_ps(codes8(w + j), _mm256_loadu_ps(x + j), a);
        b = _mm256_fmadd_ps(codes8(w + j + 8), _mm256_loadu_ps(x + j + 8), b);
    }
    return hsum(_mm256_add_ps(a, b));
}

/* Returns 0, or -1 when ldw is not a multiple of 16. Rows go to threads in blocks of ROWS; the
 * tokens of a call loop inside a block, so its codes are read from memory once per call and from
 * L1 for every further token. */
int sq_int8_gemv(const int8_t *codes, int64_t n, int64_t ldw, const float *scale, const float *x, int64_t m,
                 float *y) {
    if (ldw % 16) return -1;
    int64_t blocks = n / ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r = b * ROWS;
        for (int64_t t = 0; t < m; t++) {
            float acc[ROWS];
            block4(codes + r * ldw, ldw, x + t * ldw, ldw, acc);
            for (int i = 0; i < ROWS; i++) y[t * n + r + i] = scale[r + i] * acc[i];
        }
    }
    for (int64_t r = blocks * ROWS; r < n; r++)
        for (int64_t t = 0; t < m; t++) y[t * n + r] = scale[r] * row1(codes + r * ldw, x + t * ldw, ldw);
    return 0;
}

/* The thread count this library's parallel regions get (tests: it is torch's). */
int sq_threads(void) { return omp_get_max_threads(); }
