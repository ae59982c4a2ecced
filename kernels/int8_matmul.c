/* int8 x int8 -> int32 products for --int8 on CPUs with AVX512-VNNI, exactly torch._int_mm's result. oneDNN's
   int8 product, behind torch._int_mm, reaches ~300 GOPS on the decode step's 32-row products on 2 cores and ~25
   for one row; this one ~800 and ~200, as a plain register-tiled loop over weights packed once at load.

   vpdpbusd multiplies unsigned by signed bytes, four at a time into each int32 lane: the activations go in
   as unsigned (a + 128, a byte's top bit flipped) and each output column subtracts 128 x its weights' sum
   (the `compensation`, computed at packing). Each output is an exact integer sum, so a row's result never
   depends on the other rows. Built at start-up with -march=native (see build.py); without AVX512-VNNI the
   library says so and callers keep torch._int_mm. */

#include <stdint.h>
#include <stdlib.h>

#ifdef __AVX512VNNI__
#include <immintrin.h>

#define LANES 16      /* int32 outputs of a 512-bit register */
#define GROUP 4       /* bytes of one row that vpdpbusd sums into each lane */
#define TILE_ROWS 8   /* 8 rows x 3 blocks: 24 accumulators, 3 weight registers and a broadcast of 32 */
#define TILE_BLOCKS 3
#define CHUNK_ROWS 128 /* rows whose activations stay in cache while every strip of weights passes by */

/* gcc 12 keeps 24 accumulators of _mm512_dpbusd_epi32 on the stack, loading and storing each at every step
   (2.6x slower); the instruction written out keeps them in registers */
#define DPBUSD(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

#define ACCUMULATORS(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0;
#define MULTIPLY_ROW(i)                                                                   \
    if (rows > i) {                                                                       \
        __m512i x = _mm512_set1_epi32(*(const int32_t *)(a + i * K + k));                 \
        DPBUSD(c##i##0, x, w0);                                                           \
        if (blocks > 1) DPBUSD(c##i##1, x, w1);                                           \
        if (blocks > 2) DPBUSD(c##i##2, x, w2);                                           \
    }
#define STORE_ROW(i, j) \
    if (rows > i) _mm512_mask_storeu_epi32(c + i * N + j * LANES, mask, _mm512_sub_epi32(c##i##j, compensate));
#define STORE_BLOCK(j)                                                                                        \
    if (blocks > j) {                                                                                         \
        __mmask16 mask = N - n - j * LANES >= LANES ? 0xFFFF : (__mmask16)((1u << (N - n - j * LANES)) - 1); \
        __m512i compensate = _mm512_loadu_si512(compensation + n + j * LANES);                                \
        STORE_ROW(0, j) STORE_ROW(1, j) STORE_ROW(2, j) STORE_ROW(3, j)                                       \
        STORE_ROW(4, j) STORE_ROW(5, j) STORE_ROW(6, j) STORE_ROW(7, j)                                       \
    }

/* rows x (blocks x 16) outputs at c (row stride N), starting at column n; w: the first block's packed
   weights, blocks `block_bytes` apart; compensation padded to whole blocks */
static inline __attribute__((always_inline)) void tile(const uint8_t *a, int64_t K, const int8_t *w,
                                                       int64_t block_bytes, const int32_t *compensation,
                                                       int32_t *c, int64_t N, int64_t n, const int rows,
                                                       const int blocks) {
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
    c += n;
    STORE_BLOCK(0) STORE_BLOCK(1) STORE_BLOCK(2)
}

typedef void (*tile_function)(const uint8_t *, int64_t, const int8_t *, int64_t, const int32_t *, int32_t *,
                              int64_t, int64_t);
#define TILE(r, b)                                                                                          \
    static void tile_##r##_##b(const uint8_t *a, int64_t K, const int8_t *w, int64_t block_bytes,           \
                               const int32_t *compensation, int32_t *c, int64_t N, int64_t n) {             \
        tile(a, K, w, block_bytes, compensation, c, N, n, r, b);                                            \
    }
#define TILES(r) TILE(r, 1) TILE(r, 2) TILE(r, 3)
TILES(1) TILES(2) TILES(3) TILES(4) TILES(5) TILES(6) TILES(7) TILES(8)
#define ROW_OF_TILES(r) {NULL, tile_##r##_1, tile_##r##_2, tile_##r##_3}
static const tile_function TILE_FOR[TILE_ROWS + 1][TILE_BLOCKS + 1] = {
    {NULL}, ROW_OF_TILES(1), ROW_OF_TILES(2), ROW_OF_TILES(3), ROW_OF_TILES(4),
    ROW_OF_TILES(5), ROW_OF_TILES(6), ROW_OF_TILES(7), ROW_OF_TILES(8)};

int int8_matmul_available(void) { return 1; }

/* c[M, N] = a[M, K] . w[N, K]^T, with w packed as [ceil(N / 16)][K / 4][16][4] (zero columns pad the last
   block) and compensation[n] = 128 x sum_k w[n, k] (padded alike); K a multiple of 4 */
void int8_matmul(const int8_t *a, int64_t M, int64_t K, const int8_t *packed, const int32_t *compensation,
                 int64_t N, int32_t *c, int threads) {
    uint8_t *shifted = aligned_alloc(64, (M * K + 63) / 64 * 64);
    for (int64_t i = 0; i < M * K; i++) shifted[i] = (uint8_t)a[i] ^ 0x80;
    int64_t block_bytes = K * LANES, blocks = (N + LANES - 1) / LANES;
    int64_t strips = (blocks + TILE_BLOCKS - 1) / TILE_BLOCKS;
    #pragma omp parallel num_threads(threads)
    for (int64_t chunk = 0; chunk < M; chunk += CHUNK_ROWS) {
        int64_t chunk_end = chunk + CHUNK_ROWS < M ? chunk + CHUNK_ROWS : M;
        #pragma omp for schedule(static)
        for (int64_t strip = 0; strip < strips; strip++) {
            int64_t first = strip * TILE_BLOCKS;
            int width = blocks - first < TILE_BLOCKS ? (int)(blocks - first) : TILE_BLOCKS;
            for (int64_t m = chunk; m < chunk_end; m += TILE_ROWS) {
                int rows = chunk_end - m < TILE_ROWS ? (int)(chunk_end - m) : TILE_ROWS;
                TILE_FOR[rows][width](shifted + m * K, K, packed + first * block_bytes, block_bytes, compensation,
                                      c + m * N, N, first * LANES);
            }
        }
    }
    free(shifted);
}

#else

int int8_matmul_available(void) { return 0; }

void int8_matmul(const int8_t *a, int64_t M, int64_t K, const int8_t *packed, const int32_t *compensation,
                 int64_t N, int32_t *c, int threads) {
    abort(); /* never called: int8_matmul_available() said no */
}

#endif
