/* Vector macros shared by the CPU kernels (qgemv.c, rows.c): one set for AVX-512F + BW (built so
 * where torch reports the CPU as AVX512), one for AVX2 + FMA. fp32 lanes throughout. */
#ifndef SQ_SIMD_H
#define SQ_SIMD_H
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* AVX-512: sixteen lanes, 32 registers. */
#define ISA 512
#define VL 16
typedef __m512 vec;
#define ZERO() _mm512_setzero_ps()
#define LOADX(p) _mm512_loadu_ps(p)
#define CODES(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
/* int4 codes: VL bytes as int32 lanes, their low and high nibbles, and a nibble u as u - 8 */
typedef __m512i ivec;
#define BYTES(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define LO4(b) _mm512_and_si512(b, _mm512_set1_epi32(15))
#define HI4(b) _mm512_srli_epi32(b, 4)
#define U4F(u) _mm512_permutexvar_ps(u, _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7))
/* out[0, 2 VL) = e0, o0, e1, o1, ...: even and odd columns back in column order */
static inline void INTERLEAVE(__m512 e, __m512 o, float *out) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(e, lo, o));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(e, hi, o));
}
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define MUL(a, b) _mm512_mul_ps(a, b)
#define ADD(a, b) _mm512_add_ps(a, b)
#define SET1(v) _mm512_set1_ps(v)
#define STORE(p, v) _mm512_storeu_ps(p, v)
#define ABS(v) _mm512_abs_ps(v)
#define GT(a, b) ((unsigned)_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ)) /* lane i's a > b as bit i */
/* v rounded to the nearest bf16 (ties to even), kept in fp32 lanes */
static inline __m512 round_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xffff0000u)));
}
/* sixteen floats -> bf16, rounded to nearest even (AVX-512F has no bf16 convert of its own) */
static inline void store_bf16(uint16_t *p, __m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(b));
}
#else
/* AVX2 + FMA: eight lanes, 16 registers. */
#define ISA 256
#define VL 8
typedef __m256 vec;
#define ZERO() _mm256_setzero_ps()
#define LOADX(p) _mm256_loadu_ps(p)
#define CODES(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
typedef __m256i ivec;
#define BYTES(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define LO4(b) _mm256_and_si256(b, _mm256_set1_epi32(15))
#define HI4(b) _mm256_srli_epi32(b, 4)
#define U4F(u) _mm256_cvtepi32_ps(_mm256_sub_epi32(u, _mm256_set1_epi32(8)))
static inline void INTERLEAVE(__m256 e, __m256 o, float *out) {
    __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);  /* e0 o0 e1 o1 | e4 o4 e5 o5, ... */
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float HSUM(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}
#define MUL(a, b) _mm256_mul_ps(a, b)
#define ADD(a, b) _mm256_add_ps(a, b)
#define SET1(v) _mm256_set1_ps(v)
#define STORE(p, v) _mm256_storeu_ps(p, v)
#define ABS(v) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)
#define GT(a, b) ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)))
static inline __m256 round_bf16(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline void store_bf16(uint16_t *p, __m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
#endif
#endif
