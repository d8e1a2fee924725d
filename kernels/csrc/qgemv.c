/* Weight-only int8 matrix-vector products for decode on x86 CPUs with AVX2 + FMA, or AVX-512.
 *
 * y[m, n] = scale[n] * sum_k codes[n, k] * x[m, k]   (fp32 accumulation, fp32 output)
 *
 * codes int8 [N, ldw] row-major (K padded with zero codes to a multiple of 16), x fp32 [M, ldw]
 * (padded with zeros), scale fp32 [N], y fp32 [M, N]. Each output row is summed by one thread in a
 * fixed order, so the result does not depend on the thread count (the order is the build's: an
 * AVX2 and an AVX-512 build differ in the last bits).
 *
 * Why not torch's _weight_int8pack_mm: on x86 it runs fp32 / fp16 activations through a scalar
 * loop, 5-10x slower than dense, and in bf16 it converts eight codes per instruction even on
 * AVX-512. Here a block of rows shares every load of x, two independent FMA chains run per row,
 * and the codes a few cache lines ahead are prefetched. The AVX2 build is bound by its
 * convert-and-FMA work (~4-6 GB/s of codes a core, in cache and from memory alike); the AVX-512
 * build converts sixteen codes per instruction and streams ~7 GB/s a core, the rate dense bf16
 * weights stream at on the same core
 * (python -c "import squeeze.kernels.cpu_native as m; m._bench_report()"; kernels/README.md).
 *
 * Threads: OpenMP. The library is linked against libgomp.so.1 by soname; torch's CPU wheels load
 * their own libgomp.so.1 first, so the loader hands this library the same runtime, and its
 * parallel regions run on torch's threads at torch.get_num_threads().
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define PREFETCH 512  /* bytes ahead of the codes being read */

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* AVX-512 (built so where torch reports the CPU as AVX512): sixteen codes per convert and FMA,
 * eight rows share each load of x (16 accumulators + 2 of x fit the 32 registers). */
#define ISA 512
#define ROWS 8

static inline __m512 codes16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static void block(const int8_t *w, int64_t ldw, const float *x, int64_t k, float *acc) {
    __m512 a[ROWS], b[ROWS];
    for (int i = 0; i < ROWS; i++) a[i] = b[i] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
        for (int i = 0; i < ROWS; i++) {
            const int8_t *wi = w + i * ldw + j;
            _mm_prefetch((const char *)(wi + PREFETCH), _MM_HINT_T0);
            a[i] = _mm512_fmadd_ps(codes16(wi), x0, a[i]);
            b[i] = _mm512_fmadd_ps(codes16(wi + 16), x1, b[i]);
        }
    }
    if (j < k) { /* k % 32 == 16 */
        __m512 x0 = _mm512_loadu_ps(x + j);
        for (int i = 0; i < ROWS; i++) a[i] = _mm512_fmadd_ps(codes16(w + i * ldw + j), x0, a[i]);
    }
    for (int i = 0; i < ROWS; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(a[i], b[i]));
}

static float row1(const int8_t *w, const float *x, int64_t k) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) a = _mm512_fmadd_ps(codes16(w + j), _mm512_loadu_ps(x + j), a);
    return _mm512_reduce_add_ps(a);
}
#else
/* AVX2 + FMA: eight codes per convert and FMA, four rows share each load of x, two FMA chains a
 * row. */
#define ISA 256
#define ROWS 4

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

static void block(const int8_t *w, int64_t ldw, const float *x, int64_t k, float *acc) {
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
#endif

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
            block(codes + r * ldw, ldw, x + t * ldw, ldw, acc);
            for (int i = 0; i < ROWS; i++) y[t * n + r + i] = scale[r + i] * acc[i];
        }
    }
    for (int64_t r = blocks * ROWS; r < n; r++)
        for (int64_t t = 0; t < m; t++) y[t * n + r] = scale[r] * row1(codes + r * ldw, x + t * ldw, ldw);
    return 0;
}

/* The vector width it was built for, in bits (256: AVX2, 512: AVX-512). */
int sq_isa(void) { return ISA; }

/* The thread count this library's parallel regions get (tests: it is torch's). */
int sq_threads(void) { return omp_get_max_threads(); }
