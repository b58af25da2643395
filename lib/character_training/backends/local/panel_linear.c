/* y[M, N] = x[M, K] . W[N, K]^T in fp32 on AVX2 + FMA, with W stored in "panels".
 *
 * Why this file exists: on a CPU without AVX512-BF16 the engine decodes in fp32, and at a
 * few rows a decode step is bound by reading the weights (540 MB of fp32 per step for
 * SmolLM2-135M). The bundled model's weights are bf16 values (its GGUF dequantised to bf16),
 * so they can be kept as bf16 and widened to fp32 in registers: half the bytes, the same
 * numbers. Neither MKL nor oneDNN multiplies fp32 activations by bf16 weights on AVX2.
 *
 * Layout: W is cut into panels of 16 output columns; panel p holds W[16p : 16p + 16, :]
 * transposed, K rows of 16 values (bf16 bits or fp32), so one step of the inner loop reads
 * 16 consecutive weights. The last panel is padded with zero columns.
 *
 * Order of the sums, which the Python side documents and tests: every output is a chain of
 * fused multiply-adds over k = 0, 1, ..., K - 1 starting from zero, restarted every 1,024 k
 * (KCHUNK), the chains' results added left to right. That is the order oneDNN's AVX2 fp32
 * kernels use for the engine's shapes (measured bit for bit against
 * `torch.ops.mkldnn._linear_pointwise` for K <= 2,500 and 1-200 rows), and it does not
 * depend on the number of rows or threads.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16        /* output columns per panel: two 8-lane registers */
#define MR 6         /* rows per register tile: 12 accumulators + 2 weights + 1 broadcast */
#define KCHUNK 1024  /* length of one fused multiply-add chain (see the header) */
#define MBLOCK 64    /* rows per unit of parallel work, so x stays in the core's cache */
#define WIDEN_ROWS 12 /* above this many rows a bf16 panel is widened once per unit of work */

static inline void load_bf16(const uint16_t *p, __m256 *w0, __m256 *w1) {
    __m256i packed = _mm256_loadu_si256((const __m256i *)p);
    __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(packed));
    __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(packed, 1));
    *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
    *w1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
}

/* One register tile: `rows` (1..MR) rows of x times one panel over `depth` values of k.
 * With `add`, the tile's result is added to what y holds (the next KCHUNK chain).
 * Accumulators are named variables (not an array) so the compiler keeps them in registers;
 * `rows` and `bf16` are constants in every caller, so the unused branches disappear. */
static inline __attribute__((always_inline)) void tile(
    const int rows, const int bf16, const float *x, long ldx, const void *panel, long depth,
    float *y, long ldy, int add) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    const float *x4 = x + 4 * ldx, *x5 = x + 5 * ldx;
    for (long k = 0; k < depth; k++) {
        __m256 w0, w1, b;
        if (bf16) {
            load_bf16((const uint16_t *)panel + k * NR, &w0, &w1);
        } else {
            w0 = _mm256_loadu_ps((const float *)panel + k * NR);
            w1 = _mm256_loadu_ps((const float *)panel + k * NR + 8);
        }
#define ROW(r)                                                   \
        if (rows > r) {                                          \
            b = _mm256_broadcast_ss(x##r + k);                   \
            a##r##0 = _mm256_fmadd_ps(w0, b, a##r##0);           \
            a##r##1 = _mm256_fmadd_ps(w1, b, a##r##1);           \
        }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define STORE(r)                                                                      \
    if (rows > r) {                                                                   \
        float *out = y + r * ldy;                                                     \
        if (add) {                                                                    \
            a##r##0 = _mm256_add_ps(_mm256_loadu_ps(out), a##r##0);                   \
            a##r##1 = _mm256_add_ps(_mm256_loadu_ps(out + 8), a##r##1);               \
        }                                                                             \
        _mm256_storeu_ps(out, a##r##0);                                               \
        _mm256_storeu_ps(out + 8, a##r##1);                                           \
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
}

typedef void (*tile_fn)(const float *, long, const void *, long, float *, long, int);

#define TILES(bf16, name)                                                                  \
    static void name##1(const float *x, long l, const void *w, long d, float *y, long ly,   \
                        int a) { tile(1, bf16, x, l, w, d, y, ly, a); }                      \
    static void name##2(const float *x, long l, const void *w, long d, float *y, long ly,   \
                        int a) { tile(2, bf16, x, l, w, d, y, ly, a); }                      \
    static void name##3(const float *x, long l, const void *w, long d, float *y, long ly,   \
                        int a) { tile(3, bf16, x, l, w, d, y, ly, a); }                      \
    static void name##4(const float *x, long l, const void *w, long d, float *y, long ly,   \
                        int a) { tile(4, bf16, x, l, w, d, y, ly, a); }                      \
    static void name##5(const float *x, long l, const void *w, long d, float *y, long ly,   \
                        int a) { tile(5, bf16, x, l, w, d, y, ly, a); }                      \
    static void name##6(const float *x, long l, const void *w, long d, float *y, long ly,   \
                        int a) { tile(6, bf16, x, l, w, d, y, ly, a); }
TILES(1, tile_bf16_)
TILES(0, tile_f32_)
static const tile_fn BF16_TILES[MR + 1] = {0, tile_bf16_1, tile_bf16_2, tile_bf16_3,
                                           tile_bf16_4, tile_bf16_5, tile_bf16_6};
static const tile_fn F32_TILES[MR + 1] = {0, tile_f32_1, tile_f32_2, tile_f32_3,
                                          tile_f32_4, tile_f32_5, tile_f32_6};

/* Rows [m0, m0 + rows) times panel p, every KCHUNK chain, into y (or into a 16-wide scratch
 * tile for a padded last panel, whose valid columns are then copied out). */
static void panel_rows(const float *x, const void *panel, int bf16, float *y, long rows,
                       long m0, long p, long N, long K) {
    const tile_fn *tiles = bf16 ? BF16_TILES : F32_TILES;
    long width = N - p * NR < NR ? N - p * NR : NR;
    long tiles_left = (rows + MR - 1) / MR, m = 0;
    size_t element = bf16 ? sizeof(uint16_t) : sizeof(float);
    while (m < rows) {
        /* rows split as evenly as possible over the tiles: 8 rows run as 4 + 4, not 6 + 2 */
        long left = rows - m;
        long count = left / tiles_left + (left % tiles_left != 0);
        const float *xs = x + (m0 + m) * K;
        float scratch[MR * NR];
        float *out = width == NR ? y + (m0 + m) * N + p * NR : scratch;
        long ldy = width == NR ? N : NR;
        for (long k0 = 0; k0 < K; k0 += KCHUNK) {
            long depth = K - k0 < KCHUNK ? K - k0 : KCHUNK;
            const char *w = (const char *)panel + (size_t)k0 * NR * element;
            tiles[count](xs + k0, K, w, depth, out, ldy, k0 > 0);
        }
        if (width != NR)
            for (long r = 0; r < count; r++)
                memcpy(y + (m0 + m + r) * N + p * NR, scratch + r * NR, width * sizeof(float));
        m += count;
        tiles_left--;
    }
}

/* The product. `bf16` says whether `weights` holds bf16 bits or fp32 values; `threads` is
 * the caller's intra-op thread count (torch's), passed in because OpenMP's own setting is
 * per calling thread. Work is split over (block of MBLOCK rows, panel) pairs. */
void panel_linear(const float *x, const void *weights, int bf16, float *y, long M, long N,
                  long K, int threads) {
    long panels = (N + NR - 1) / NR;
    long blocks = (M + MBLOCK - 1) / MBLOCK;
    size_t element = bf16 ? sizeof(uint16_t) : sizeof(float);
    int widen = bf16 && M > WIDEN_ROWS;
#pragma omp parallel num_threads(threads)
    {
        /* many rows: widen each bf16 panel to fp32 once, not once per register tile */
        size_t bytes = ((size_t)K * NR * sizeof(float) + 63) / 64 * 64;
        float *wide = widen ? aligned_alloc(64, bytes) : NULL;
#pragma omp for schedule(static) collapse(2)
        for (long block = 0; block < blocks; block++) {
            for (long p = 0; p < panels; p++) {
                const void *panel = (const char *)weights + (size_t)p * K * NR * element;
                long m0 = block * MBLOCK;
                long rows = M - m0 < MBLOCK ? M - m0 : MBLOCK;
                if (wide) {
                    for (long k = 0; k < K; k++) {
                        __m256 w0, w1;
                        load_bf16((const uint16_t *)panel + k * NR, &w0, &w1);
                        _mm256_store_ps(wide + k * NR, w0);
                        _mm256_store_ps(wide + k * NR + 8, w1);
                    }
                    panel_rows(x, wide, 0, y, rows, m0, p, N, K);
                } else {
                    panel_rows(x, panel, bf16, y, rows, m0, p, N, K);
                }
            }
        }
        free(wide);
    }
}
