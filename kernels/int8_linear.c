/* An --int8 linear layer on CPUs with AVX512-VNNI, in one call: each row quantised to int8 (its scale max |x| /
   127), the int8 x int8 products summed exactly in int32, then scaled back to the input's dtype with the
   weights' per-output scales, and the bias added: the same bits as Int8Linear's torch operations (so built
   without -ffast-math: true divisions, no fused multiply-adds). oneDNN's int8 product, behind torch._int_mm,
   reaches ~300 GOPS on the decode step's 32-row products on 2 cores and ~25 for one row; these tiles ~800 and
   ~200, and eagerly one call replaces a dozen small torch operations a layer.

   vpdpbusd multiplies unsigned by signed bytes, four at a time into each int32 lane: the activations go in
   as unsigned (q + 128) and each output subtracts 128 x its weights' sum (the `compensation`, computed at
   packing). A row's result never depends on the other rows. Built at start-up with -march=native (see
   build.py); without AVX512-VNNI the library says so and callers keep torch._int_mm. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define LEVELS 127.0f          /* as converters/int8.py: symmetric, -127 .. 127 */
#define SMALLEST_SCALE 1e-12f  /* as converters/int8.py */

#ifdef __AVX512VNNI__
#include <immintrin.h>

#define LANES 16      /* int32 outputs of a 512-bit register */
#define GROUP 4       /* bytes of one row that vpdpbusd sums into each lane */
#define TILE_ROWS 8   /* 8 rows x 3 blocks: 24 accumulators, 3 weight registers and a broadcast of 32 */
#define TILE_BLOCKS 3
#define STRIP (TILE_BLOCKS * LANES) /* outputs a thread computes for a chunk of rows at a time */
#define CHUNK_ROWS 128 /* rows whose activations stay in cache while every strip of weights passes by */

/* gcc 12 keeps 24 accumulators of _mm512_dpbusd_epi32 on the stack, loading and storing each at every step
   (2.6x slower); the instruction written out keeps them in registers */
#define DPBUSD(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

/* a row's 4 bytes at p as one int32 (memcpy: p need not be aligned, and no pointer is cast) */
static inline int32_t four_bytes(const uint8_t *p) {
    int32_t value;
    memcpy(&value, p, sizeof value);
    return value;
}

#define ACCUMULATORS(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0;
#define MULTIPLY_ROW(i)                                                   \
    if (rows > i) {                                                       \
        __m512i x = _mm512_set1_epi32(four_bytes(a + i * K + k)); \
        DPBUSD(c##i##0, x, w0);                                           \
        if (blocks > 1) DPBUSD(c##i##1, x, w1);                           \
        if (blocks > 2) DPBUSD(c##i##2, x, w2);                           \
    }
#define STORE_ROW(i, j) \
    if (rows > i) _mm512_store_si512(c + i * STRIP + j * LANES, _mm512_sub_epi32(c##i##j, compensate));
#define STORE_BLOCK(j)                                                                       \
    if (blocks > j) {                                                                        \
        __m512i compensate = _mm512_loadu_si512(compensation + j * LANES);                   \
        STORE_ROW(0, j) STORE_ROW(1, j) STORE_ROW(2, j) STORE_ROW(3, j)                      \
        STORE_ROW(4, j) STORE_ROW(5, j) STORE_ROW(6, j) STORE_ROW(7, j)                      \
    }

/* the int32 sums of `rows` rows of a (K bytes apart) by `blocks` blocks of 16 packed outputs (w: the first
   block, the others block_bytes apart), into c (STRIP apart) */
static inline __attribute__((always_inline)) void tile(const uint8_t *a, int64_t K, const int8_t *w,
                                                       int64_t block_bytes, const int32_t *compensation,
                                                       int32_t *c, const int rows, const int blocks) {
    ACCUMULATORS(0) ACCUMULATORS(1) ACCUMULATORS(2) ACCUMULATORS(3)
    ACCUMULATORS(4) ACCUMULATORS(5) ACCUMULATORS(6) ACCUMULATORS(7)
    for (int64_t k = 0; k < K; k += GROUP, w += LANES * GROUP) {
        /* the next strip's weights into L2 while this one's are in use: the first tile of each strip then
           rarely waits on memory (measured: 8 rows 1.4x faster over a model's cold weights) */
        const char *next_strip = (const char *)w + TILE_BLOCKS * block_bytes;
        _mm_prefetch(next_strip, _MM_HINT_T1);
        _mm_prefetch(next_strip + block_bytes, _MM_HINT_T1);
        _mm_prefetch(next_strip + 2 * block_bytes, _MM_HINT_T1);
        __m512i w0 = _mm512_load_si512(w), w1 = w0, w2 = w0;
        if (blocks > 1) w1 = _mm512_load_si512(w + block_bytes);
        if (blocks > 2) w2 = _mm512_load_si512(w + 2 * block_bytes);
        MULTIPLY_ROW(0) MULTIPLY_ROW(1) MULTIPLY_ROW(2) MULTIPLY_ROW(3)
        MULTIPLY_ROW(4) MULTIPLY_ROW(5) MULTIPLY_ROW(6) MULTIPLY_ROW(7)
    }
    STORE_BLOCK(0) STORE_BLOCK(1) STORE_BLOCK(2)
}

typedef void (*tile_function)(const uint8_t *, int64_t, const int8_t *, int64_t, const int32_t *, int32_t *);
#define TILE(r, b)                                                                                \
    static void tile_##r##_##b(const uint8_t *a, int64_t K, const int8_t *w, int64_t block_bytes, \
                               const int32_t *compensation, int32_t *c) {                         \
        tile(a, K, w, block_bytes, compensation, c, r, b);                                        \
    }
#define TILES(r) TILE(r, 1) TILE(r, 2) TILE(r, 3)
TILES(1) TILES(2) TILES(3) TILES(4) TILES(5) TILES(6) TILES(7) TILES(8)
#define ROW_OF_TILES(r) {NULL, tile_##r##_1, tile_##r##_2, tile_##r##_3}
static const tile_function TILE_FOR[TILE_ROWS + 1][TILE_BLOCKS + 1] = {
    {NULL}, ROW_OF_TILES(1), ROW_OF_TILES(2), ROW_OF_TILES(3), ROW_OF_TILES(4),
    ROW_OF_TILES(5), ROW_OF_TILES(6), ROW_OF_TILES(7), ROW_OF_TILES(8)};

/* |x|'s bits order as |x| does (for numbers), so the largest magnitude is an integer maximum, which vectorises
   without -ffast-math */
static float largest_magnitude(const void *x, int bf16, int64_t K) {
    uint32_t largest = 0;
    if (bf16) {
        const uint16_t *h = x;
        for (int64_t k = 0; k < K; k++) largest = (h[k] & 0x7fffu) > largest ? h[k] & 0x7fffu : largest;
        return bf16_to_float((uint16_t)largest);
    }
    const uint32_t *f = x;
    for (int64_t k = 0; k < K; k++) largest = (f[k] & 0x7fffffffu) > largest ? f[k] & 0x7fffffffu : largest;
    float value;
    memcpy(&value, &largest, sizeof value);
    return value;
}

/* round(x / scale) + 128, rounding half to even as torch.round does */
static void quantise_row(const void *x, int bf16, int64_t K, float scale, uint8_t *q) {
    if (bf16) {
        const uint16_t *h = x;
        for (int64_t k = 0; k < K; k++) q[k] = (uint8_t)((int32_t)nearbyintf(bf16_to_float(h[k]) / scale) + 128);
    } else {
        const float *f = x;
        for (int64_t k = 0; k < K; k++) q[k] = (uint8_t)((int32_t)nearbyintf(f[k] / scale) + 128);
    }
}

/* y = sums x row scale x output scale, in y's dtype, + bias (added in y's dtype, as torch adds); one loop per
   case, each of which vectorises */
static void scale_back(const int32_t *sums, int64_t rows, int64_t columns, const float *row_scale,
                       const float *scale, const void *bias, int bf16, void *y, int64_t N) {
    for (int64_t i = 0; i < rows; i++) {
        const int32_t *s = sums + i * STRIP;
        const float r = row_scale[i];
        if (bf16) {
            uint16_t *out = (uint16_t *)y + i * N;
            const uint16_t *b = bias;
            if (b)
                for (int64_t j = 0; j < columns; j++)
                    out[j] = to_bf16(bf16_to_float(to_bf16((float)s[j] * r * scale[j])) + bf16_to_float(b[j]));
            else
                for (int64_t j = 0; j < columns; j++) out[j] = to_bf16((float)s[j] * r * scale[j]);
        } else {
            float *out = (float *)y + i * N;
            const float *b = bias;
            if (b)
                for (int64_t j = 0; j < columns; j++) out[j] = (float)s[j] * r * scale[j] + b[j];
            else
                for (int64_t j = 0; j < columns; j++) out[j] = (float)s[j] * r * scale[j];
        }
    }
}

int int8_linear_available(void) { return 1; }

/* y[M, N] = Int8Linear(x[M, K]): x and y float32 (bf16 = 0) or bfloat16 (bf16 = 1); w packed as
   [ceil(N / 16)][K / 4][16][4] (zero outputs pad the last block), compensation[n] = 128 x sum_k w[n, k] (padded
   alike); scale: N float32 values; bias: N values of y's dtype, or NULL; K a multiple of 4 */
void int8_linear(const void *x, int bf16, int64_t M, int64_t K, const int8_t *packed, const int32_t *compensation,
                 const float *scale, const void *bias, int64_t N, void *y, int threads) {
    const int64_t element = bf16 ? 2 : 4, block_bytes = K * LANES, blocks = (N + LANES - 1) / LANES;
    const int64_t strips = (blocks + TILE_BLOCKS - 1) / TILE_BLOCKS;
    uint8_t *quantised = aligned_alloc(64, (M * K + 63) / 64 * 64);
    float *row_scale = malloc(M * sizeof(float));
    #pragma omp parallel num_threads(threads)
    {
        int32_t *sums = aligned_alloc(64, CHUNK_ROWS * STRIP * sizeof(int32_t));
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < M; i++) {
            const char *row = (const char *)x + i * K * element;
            row_scale[i] = fmaxf(largest_magnitude(row, bf16, K), SMALLEST_SCALE) / LEVELS;
            quantise_row(row, bf16, K, row_scale[i], quantised + i * K);
        }
        for (int64_t chunk = 0; chunk < M; chunk += CHUNK_ROWS) {
            const int64_t chunk_rows = M - chunk < CHUNK_ROWS ? M - chunk : CHUNK_ROWS;
            #pragma omp for schedule(static)
            for (int64_t strip = 0; strip < strips; strip++) {
                const int64_t first = strip * TILE_BLOCKS, n = first * LANES;
                const int width = blocks - first < TILE_BLOCKS ? (int)(blocks - first) : TILE_BLOCKS;
                for (int64_t m = 0; m < chunk_rows; m += TILE_ROWS) {
                    const int rows = chunk_rows - m < TILE_ROWS ? (int)(chunk_rows - m) : TILE_ROWS;
                    TILE_FOR[rows][width](quantised + (chunk + m) * K, K, packed + first * block_bytes, block_bytes,
                                          compensation + n, sums + m * STRIP);
                }
                scale_back(sums, chunk_rows, (N - n < STRIP ? N - n : STRIP), row_scale + chunk, scale + n,
                           bias ? (const char *)bias + n * element : NULL, bf16,
                           (char *)y + (chunk * N + n) * element, N);
            }
        }
        free(sums);
    }
    free(row_scale);
    free(quantised);
}

#else

int int8_linear_available(void) { return 0; }

void int8_linear(const void *x, int bf16, int64_t M, int64_t K, const int8_t *packed, const int32_t *compensation,
                 const float *scale, const void *bias, int64_t N, void *y, int threads) {
    abort(); /* never called: int8_linear_available() said no */
}

#endif
