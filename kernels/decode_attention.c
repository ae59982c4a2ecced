/* Decode attention on CPU: a few queries per row (the query heads that share one KV head) over that row's
   cached keys and values, for many rows in one call. Each (row, KV head) is one work item, computed start to
   end by one thread in a fixed order, so a row's result never depends on the other rows of the batch; only
   the row's own `length` keys are read, however long its slot. Products, softmax and sums in float32, on
   16-float vectors (GCC vector extensions: AVX-512 registers where the CPU has them, pairs of AVX2 ones
   otherwise). Built at start-up with -march=native -ffast-math (vectorised expf): see build.py. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#include "bf16.h"

#define LANES 16
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef uint32_t words __attribute__((vector_size(4 * LANES)));
typedef uint16_t halves __attribute__((vector_size(2 * LANES)));

static inline floats load_bf16(const uint16_t *p) {
#ifdef __AVX512F__ /* one widening load and a shift: GCC makes six instructions of the generic version's */
    __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (floats)_mm512_castsi512_ps(bits);
#else
    halves half;
    memcpy(&half, p, sizeof half);
    words bits = __builtin_convertvector(half, words) << 16;
    floats value;
    memcpy(&value, &bits, sizeof value);
    return value;
#endif
}

static inline floats load_f32(const float *p) {
    floats value;
    memcpy(&value, p, sizeof value);
    return value;
}

static inline float to_f32(float value) { return value; }

/* LANES vectors in, one out: lane j holds the sum of vector j's lanes (a tree of pairwise shuffles, instead of
   one horizontal sum per vector). Overwrites `vectors`. */
static inline floats sum_each(floats *vectors) {
    const words even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, odd = even + 1;
    for (int width = LANES; width > 1; width /= 2)
        for (int j = 0; j < width / 2; j++)
            vectors[j] = __builtin_shuffle(vectors[2 * j], vectors[2 * j + 1], even) +
                         __builtin_shuffle(vectors[2 * j], vectors[2 * j + 1], odd);
    return vectors[0];
}

static void softmax_rows(float *scores, int64_t group, int64_t length) {
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * length, largest = s[0], total = 0.0f;
        for (int64_t t = 0; t < length; t++) largest = s[t] > largest ? s[t] : largest;
        for (int64_t t = 0; t < length; t++) {
            s[t] = expf(s[t] - largest);
            total += s[t];
        }
        const float inverse = 1.0f / total;
        for (int64_t t = 0; t < length; t++) s[t] *= inverse;
    }
}

/* Ask for `bytes` from `start` on to be brought into cache: a row's keys (values) span several pages, and the
   hardware's prefetch stops at each page's end. */
static inline void prefetch(const void *start, size_t bytes) {
    for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch((const char *)start + offset);
}

/* floats of work one item needs: its scaled queries, one block of keys as floats, its scores; a multiple of
   LANES, as aligned_alloc wants a multiple of the alignment; allocated once per thread for the longest row */
static inline size_t work_floats(int64_t group, int64_t dim, int64_t length) {
    return (size_t)(group * dim + LANES * dim + group * (length + LANES - length % LANES));
}

/* One work item: `group` queries [group, dim] over `length` keys and values [length, dim]. Keys go by blocks
   of LANES, converted once for the whole group (a short last block padded with zero keys), and each query's
   products with a block's 16 keys are 16 independent sums, chunk by chunk, so that the FMAs overlap instead of
   waiting on one another; `dim` is a constant where the caller names one, so that the loops over it unroll
   and the group's sums stay in registers. */
#define ATTEND_ITEM(NAME, T, LOAD, STORE)                                                                       \
    static inline __attribute__((always_inline)) void NAME(                                                    \
        const T *restrict query, const T *restrict keys, const T *restrict values, int64_t length,            \
        int64_t group, const int64_t dim, float scale, T *restrict out, float *restrict work) {               \
        const int64_t chunks = dim / LANES;                                                                     \
        float *restrict q = work, *restrict block = q + group * dim, *restrict scores = block + LANES * dim;   \
        for (int64_t i = 0; i < group * dim; i += LANES) *(floats *)(q + i) = LOAD(query + i) * scale;         \
        for (int64_t first = 0; first < length; first += LANES) {                                               \
            const int64_t count = length - first < LANES ? length - first : LANES;                              \
            prefetch(keys + (first + LANES) * dim, sizeof(T) * LANES * dim);                                    \
            prefetch(values + first * dim, sizeof(T) * LANES * dim);                                            \
            for (int64_t j = 0; j < count * chunks; j++)                                                        \
                *(floats *)(block + j * LANES) = LOAD(keys + first * dim + j * LANES);                          \
            for (int64_t j = count * chunks; j < LANES * chunks; j++) *(floats *)(block + j * LANES) = (floats){0}; \
            for (int64_t g = 0; g < group; g++) {                                                               \
                floats products[LANES];                                                                         \
                for (int64_t j = 0; j < LANES; j++) products[j] = (floats){0};                                  \
                for (int64_t c = 0; c < chunks; c++) {                                                          \
                    const floats part = *(floats *)(q + g * dim + c * LANES);                                   \
                    for (int64_t j = 0; j < LANES; j++) products[j] += part * *(floats *)(block + j * dim + c * LANES); \
                }                                                                                               \
                floats sums = sum_each(products);                                                               \
                memcpy(scores + g * length + first, &sums, sizeof(float) * (size_t)count);                      \
            }                                                                                                   \
        }                                                                                                       \
        softmax_rows(scores, group, length);                                                                    \
        for (int64_t g = 0; g < group; g++) {                                                                   \
            floats sums[chunks];                                                                                \
            for (int64_t c = 0; c < chunks; c++) sums[c] = (floats){0};                                         \
            for (int64_t t = 0; t < length; t++) {                                                              \
                const float p = scores[g * length + t];                                                         \
                for (int64_t c = 0; c < chunks; c++) sums[c] += p * LOAD(values + t * dim + c * LANES);         \
            }                                                                                                   \
            for (int64_t c = 0; c < chunks; c++)                                                                \
                for (int64_t lane = 0; lane < LANES; lane++) out[g * dim + c * LANES + lane] = STORE(sums[c][lane]); \
        }                                                                                                       \
    }

/* query, out: [rows, heads, dim], dim a multiple of LANES; row i's keys (values) for KV head h start at element
   h * head_stride + starts[i] * dim of `keys` (`values`), one key every `dim` elements, of the `tokens` a head
   holds. Returns 0, or -1 without reading anything when a row's keys do not lie within those tokens or it has
   none (its softmax needs one). */
#define ATTEND_ROWS(NAME, ITEM, T)                                                                              \
    int NAME(const T *query, const T *keys, const T *values, const int64_t *starts, const int64_t *lengths,      \
             int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t head_stride, int64_t tokens,   \
             float scale, T *out, int threads) {                                                                \
        const int64_t group = heads / kv_heads;                                                                 \
        int64_t longest = 0;                                                                                    \
        for (int64_t row = 0; row < rows; row++) {                                                              \
            if (starts[row] < 0 || lengths[row] < 1 || starts[row] + lengths[row] > tokens) return -1;          \
            longest = lengths[row] > longest ? lengths[row] : longest;                                          \
        }                                                                                                       \
        _Pragma("omp parallel num_threads(threads)")                                                           \
        {                                                                                                       \
        float *work = aligned_alloc(4 * LANES, sizeof(float) * work_floats(group, dim, longest));              \
        _Pragma("omp for schedule(static)")                                                                    \
        for (int64_t item = 0; item < rows * kv_heads; item++) {                                                \
            const int64_t row = item / kv_heads, kv_head = item % kv_heads, length = lengths[row];              \
            const int64_t kv = kv_head * head_stride + starts[row] * dim;                                       \
            const int64_t q = (row * heads + kv_head * group) * dim;                                            \
            if (item + 1 < rows * kv_heads) { /* the next item's first keys and values, while this one runs */  \
                const int64_t next = ((item + 1) % kv_heads) * head_stride + starts[(item + 1) / kv_heads] * dim; \
                prefetch(keys + next, sizeof(T) * LANES * dim);                                                 \
                prefetch(values + next, sizeof(T) * LANES * dim);                                               \
            }                                                                                                   \
            if (dim == 64)                                                                                      \
                ITEM(query + q, keys + kv, values + kv, length, group, 64, scale, out + q, work);               \
            else if (dim == 128)                                                                                \
                ITEM(query + q, keys + kv, values + kv, length, group, 128, scale, out + q, work);              \
            else                                                                                                \
                ITEM(query + q, keys + kv, values + kv, length, group, dim, scale, out + q, work);              \
        }                                                                                                       \
        free(work);                                                                                             \
        }                                                                                                       \
        return 0;                                                                                               \
    }

ATTEND_ITEM(attend_item_bf16, uint16_t, load_bf16, to_bf16)
ATTEND_ITEM(attend_item_f32, float, load_f32, to_f32)
ATTEND_ROWS(attend_rows_bf16, attend_item_bf16, uint16_t)
ATTEND_ROWS(attend_rows_f32, attend_item_f32, float)
