/* Optional native CPU kernels for compact bitmask weights (llmprune/sparse/cpu.py).
 *
 * A weight W [n, k] (bf16) is held as
 *   bits     uint8 [n, kb], kb = ceil(k / 8): bit j % 8 of byte j / 8 of row r is W[r, j] kept
 *            (little-endian bit order, padding bits clear: the export's bitmask layout)
 *   values   bf16 [nnz]: the kept weights in row-major order (the vector loops load whole
 *            vectors at the cursor; only near the end of values do they load fewer elements)
 *   offsets  int64 [n + 1]: row r's kept values are values[offsets[r] : offsets[r + 1]]
 *
 * bitmask_matmul(path, x, bits, values, offsets, y, m, n, k, threads)
 *   y [m, n] fp32 = x [m, k] bf16 @ W^T, m = 1..8 (decode). Arguments are addresses
 *   (tensor.data_ptr()): sizes are the caller's contract, checked once in cpu.py.
 * bitmask_decode(bits, values, offsets, w, n, k, threads): the dense W [n, k] bf16 (prefill).
 * dense_matmul(path, x, w, y, m, n, k, threads): the same loop over a dense bf16 W, the bytes
 *   ceiling's reference.
 * paths() -> tuple of the paths this CPU runs: "avx512" (vpexpandw + vdpbf16ps), "avx2"
 *   (pshufb expand + fp32 FMA).
 *
 * The library is compiled with baseline flags; each path is a function with its own
 * __attribute__((target)) and is chosen at run time with __builtin_cpu_supports, so one build
 * runs on every x86-64 CPU. Threads (a small pool of persistent pthreads, woken per call) claim
 * chunks of rows; the GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI_VERSION 2
#define MAX_M 8    /* rows of x per call */
#define MAX_THREADS 64

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#else
#define HAVE_X86 0
#endif

/* ------------------------------------------------------------------ job description */
typedef struct {
    int kind; /* 0 bitmask matmul, 1 decode, 2 dense matmul */
    int path; /* 1 avx512, 2 avx2 */
    const uint16_t *x;      /* [m, kp] bf16, zero-padded to kp = k rounded up to 32 (avx512),
                               or fp32 [m, kp], kp = k rounded up to 8 (avx2) */
    const uint8_t *bits;    /* [n, kb] */
    const uint16_t *values; /* [nnz] */
    const uint16_t *vend;   /* values + nnz */
    const int64_t *offsets; /* [n + 1] */
    const uint16_t *w;      /* dense [n, k] (kind 2) */
    uint16_t *wout;         /* dense [n, k] (kind 1) */
    float *y;               /* [m, n] */
    int m;
    Py_ssize_t n, k, kp;
} job_t;

/* ------------------------------------------------------------------ AVX-512 path */
#if HAVE_X86
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,bmi2,popcnt")))

/* the 32 elements at p (fewer at the end of the values, the rest zero), kept in a register:
 * compilers otherwise fold the load into vpexpandw's memory form, which is microcoded on AMD
 * Zen 4 (5x slower here) */
T512 static inline __m512i load_reg(const uint16_t *p, const uint16_t *end) {
    __m512i v;
    if (__builtin_expect(end - p >= 32, 1))
        v = _mm512_loadu_si512(p);
    else /* masked: no fault past the end */
        v = _mm512_maskz_loadu_epi16((__mmask32)((1ull << (end - p)) - 1), p);
    __asm__("" : "+v"(v));
    return v;
}

/* vpexpandw of the 32 values in v to the lanes set in km, the other lanes taken from zero.
 * The merge-masking form on a zero register computes what the zero-masking form ({z}) does,
 * but on AMD Zen 4 a zero-masked vpexpandw feeding vdpbf16ps costs about 1.8 ns per 32
 * columns against about 1.0 ns for the merge-masked one (L2-resident rows, one thread). The
 * empty asm keeps the compiler from folding the zero register into the {z} form. */
T512 static inline __m512i zero_reg(void) {
    __m512i z = _mm512_setzero_si512();
    __asm__("" : "+v"(z));
    return z;
}
#define EXPAND512(zero, km, v) _mm512_mask_expand_epi16((zero), (__mmask32)(km), (v))

/* The values the expand of mask km reads at p, as load_reg does, for loads that stay within
 * the values: 64 bytes, or with `narrow` 32 bytes where km keeps at most 16 (the expand reads
 * only the first popcount(km) elements). A 64-byte load at a 2-byte aligned cursor nearly
 * always spans two cache lines, a 32-byte one half the time; for sparse enough rows the branch
 * is almost never taken the other way (about 5% faster per chunk at 70% sparsity). */
T512 static inline __m512i load_inbounds(const uint16_t *p, uint32_t km, const int narrow) {
    __m512i v;
    if (narrow && __builtin_expect(_mm_popcnt_u32(km) <= 16, 1))
        v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p));
    else
        v = _mm512_loadu_si512(p);
    __asm__("" : "+v"(v));
    return v;
}

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* the mask bits of columns [32c, 32c + 32) of a row (tail chunk: only the bytes that exist) */
static inline uint32_t chunk_mask(const uint8_t *b, Py_ssize_t c, Py_ssize_t kb) {
    Py_ssize_t at = 4 * c, left = kb - at;
    if (left >= 4) {
        uint32_t v;
        memcpy(&v, b + at, 4);
        return v;
    }
    uint32_t v = 0;
    for (Py_ssize_t i = 0; i < left; i++) v |= (uint32_t)b[at + i] << (8 * i);
    return v;
}

/* Software prefetch (prefetcht0) PF_VALUES bytes ahead of each value cursor and PF_BITS bytes
 * ahead of each mask-bits cursor: the hardware prefetchers stop at 4 KiB page boundaries
 * (torch's tensors are not on huge pages). Longer distances (1-4 KiB) and prefetcht1 measured
 * slower here. __builtin_prefetch(.., 0, 3) is prefetcht0: GCC 12 drops _mm_prefetch inside
 * these target("avx512...") functions. */
#define PF_VALUES 512
#define PF_BITS 128
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)

/* Rows r + q * stride, q < R, of the bitmask weight, interleaved, M rows of x: per 32-column
 * chunk, each weight row's mask bits (4 bytes), a 64-byte load at its value cursor, vpexpandw
 * to the columns whose bit is set (zeros elsewhere, from the register zero), the cursor
 * advanced by the popcount, one vdpbf16ps per row of x. The R rows share each load of x and
 * give R * M independent accumulator chains. They are `stride` rows apart (not adjacent) so
 * that the 2 R streams (mask bits, values) lie in different pages, where the hardware
 * prefetchers follow each one. load_mode 0: load_reg (bounds-checked loads); 1: every 64-byte
 * load of these rows ends within the values (load_inbounds); 2: the same, narrow. */
T512 static inline __attribute__((always_inline)) void bm512_group(
    const job_t *j, Py_ssize_t r, Py_ssize_t stride, const int R, const int M,
    const int load_mode, __m512i zero) {
    const Py_ssize_t kb = (j->k + 7) / 8, nc = j->kp / 32, full = kb / 4;
    const uint8_t *b[8];
    const uint16_t *v[8];
    __m512 acc[8][MAX_M];
    _Pragma("GCC unroll 8") for (int q = 0; q < R; q++) {
        b[q] = j->bits + (r + q * stride) * kb;
        v[q] = j->values + j->offsets[r + q * stride];
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) acc[q][i] = _mm512_setzero_ps();
    }
#define BM512_CHUNK(c, km_expr, prefetch)                                                        \
    do {                                                                                         \
        __m512bh xv[MAX_M];                                                                      \
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)                                      \
            xv[i] = (__m512bh)_mm512_loadu_si512(j->x + i * j->kp + 32 * (c));                  \
        _Pragma("GCC unroll 8") for (int q = 0; q < R; q++) {                                    \
            const uint32_t km = (km_expr);                                                       \
            if (prefetch) PREFETCH((const char *)v[q] + PF_VALUES);                              \
            __m512i w = EXPAND512(zero, km,                                                      \
                                  load_mode ? load_inbounds(v[q], km, load_mode == 2)            \
                                            : load_reg(v[q], j->vend));                          \
            v[q] += _mm_popcnt_u32(km);                                                          \
            _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)                                  \
                acc[q][i] = _mm512_dpbf16_ps(acc[q][i], (__m512bh)w, xv[i]);                     \
        }                                                                                        \
    } while (0)
    Py_ssize_t c = 0;
    for (; c + 2 <= full; c += 2) { /* values prefetched every other chunk, bits every 16 */
        if ((c & 15) == 0)
            _Pragma("GCC unroll 8") for (int q = 0; q < R; q++) PREFETCH(b[q] + 4 * c + PF_BITS);
        BM512_CHUNK(c, load_u32(b[q] + 4 * c), 1);
        BM512_CHUNK(c + 1, load_u32(b[q] + 4 * c + 4), 0);
    }
    for (; c < nc; c++) BM512_CHUNK(c, chunk_mask(b[q], c, kb), 0);
#undef BM512_CHUNK
    _Pragma("GCC unroll 8") for (int q = 0; q < R; q++)
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)
            j->y[i * j->n + r + q * stride] = _mm512_reduce_add_ps(acc[q][i]);
}

/* weight rows interleaved per pass: 4 for 1 or 2 rows of x, 2 for 3 or 4, else 1 (registers) */
#define GROUP_ROWS(M) ((M) <= 2 ? 4 : (M) <= 4 ? 2 : 1)

/* Rows [r0, r1): R = GROUP_ROWS(M) runs of s = (r1 - r0) / R rows, read together (rows
 * r0 + i, r0 + s + i, ..., i < s); the rows left over one at a time. */
#define AVX512_ROWS(M)                                                                           \
    T512 static void bm512_m##M(const job_t *j, Py_ssize_t r0, Py_ssize_t r1) {                  \
        const int R = GROUP_ROWS(M);                                                             \
        const Py_ssize_t s = (r1 - r0) / R, nnz = j->vend - j->values;                          \
        const __m512i zero = zero_reg();                                                         \
        for (Py_ssize_t i = 0; i < s; i++) {                                                     \
            Py_ssize_t kept = 0;                                                                 \
            for (int q = 0; q < R; q++)                                                          \
                kept += j->offsets[r0 + i + q * s + 1] - j->offsets[r0 + i + q * s];             \
            if (j->offsets[r0 + i + (R - 1) * s + 1] + 32 > nnz)                                 \
                bm512_group(j, r0 + i, s, R, M, 0, zero);                                        \
            else if (3 * kept <= R * j->k) /* at most a third kept: narrow loads */              \
                bm512_group(j, r0 + i, s, R, M, 2, zero);                                        \
            else                                                                                 \
                bm512_group(j, r0 + i, s, R, M, 1, zero);                                        \
        }                                                                                        \
        for (Py_ssize_t r = r0 + R * s; r < r1; r++) bm512_group(j, r, 0, 1, M, 0, zero);        \
    }

AVX512_ROWS(1)
AVX512_ROWS(2)
AVX512_ROWS(3)
AVX512_ROWS(4)
AVX512_ROWS(5)
AVX512_ROWS(6)
AVX512_ROWS(7)
AVX512_ROWS(8)

typedef void (*rows_fn)(const job_t *, Py_ssize_t, Py_ssize_t);
static const rows_fn BM512[MAX_M + 1] = {NULL, bm512_m1, bm512_m2, bm512_m3, bm512_m4,
                                         bm512_m5, bm512_m6, bm512_m7, bm512_m8};

/* The dense reference (k % 32 == 0): the loop of bm512_group -- the same runs of rows, shared
 * loads of x and threading -- without the mask and the expand. No software prefetch: one
 * 64-byte line per row and chunk, which the hardware prefetchers follow (prefetching 0.5-8 KiB
 * ahead measured within 3% of this, inside the run-to-run noise of this machine). */
T512 static inline __attribute__((always_inline)) void dense512_group(
    const job_t *j, Py_ssize_t r, Py_ssize_t stride, const int R, const int M) {
    const Py_ssize_t nc = j->k / 32;
    const uint16_t *w[4];
    __m512 acc[4][MAX_M];
    _Pragma("GCC unroll 8") for (int q = 0; q < R; q++) {
        w[q] = j->w + (r + q * stride) * j->k;
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) acc[q][i] = _mm512_setzero_ps();
    }
    for (Py_ssize_t c = 0; c < nc; c++) {
        __m512bh xv[MAX_M];
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)
            xv[i] = (__m512bh)_mm512_loadu_si512(j->x + i * j->kp + 32 * c);
        _Pragma("GCC unroll 8") for (int q = 0; q < R; q++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w[q] + 32 * c);
            _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)
                acc[q][i] = _mm512_dpbf16_ps(acc[q][i], wv, xv[i]);
        }
    }
    _Pragma("GCC unroll 8") for (int q = 0; q < R; q++)
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)
            j->y[i * j->n + r + q * stride] = _mm512_reduce_add_ps(acc[q][i]);
}

#define DENSE512_ROWS(M)                                                                         \
    T512 static void dense512_m##M(const job_t *j, Py_ssize_t r0, Py_ssize_t r1) {               \
        const int R = GROUP_ROWS(M);                                                             \
        const Py_ssize_t s = (r1 - r0) / R;                                                      \
        for (Py_ssize_t i = 0; i < s; i++) dense512_group(j, r0 + i, s, R, M);                   \
        for (Py_ssize_t r = r0 + R * s; r < r1; r++) dense512_group(j, r, 0, 1, M);              \
    }

DENSE512_ROWS(1)
DENSE512_ROWS(2)
DENSE512_ROWS(3)
DENSE512_ROWS(4)
DENSE512_ROWS(5)
DENSE512_ROWS(6)
DENSE512_ROWS(7)
DENSE512_ROWS(8)

static const rows_fn DENSE512[MAX_M + 1] = {NULL,        dense512_m1, dense512_m2,
                                            dense512_m3, dense512_m4, dense512_m5,
                                            dense512_m6, dense512_m7, dense512_m8};

/* rows [r0, r1) of the dense weight, 32 columns per vpexpandw (the tail chunk stored in part) */
T512 static void decode512(const job_t *j, Py_ssize_t r0, Py_ssize_t r1) {
    const Py_ssize_t kb = (j->k + 7) / 8, nc = (j->k + 31) / 32;
    const __m512i zero = zero_reg();
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *b = j->bits + r * kb;
        const uint16_t *v = j->values + j->offsets[r];
        uint16_t *out = j->wout + r * j->k;
        for (Py_ssize_t c = 0; c < nc; c++) {
            uint32_t km = chunk_mask(b, c, kb);
            __m512i w = EXPAND512(zero, km, load_reg(v, j->vend));
            v += _mm_popcnt_u32(km);
            Py_ssize_t left = j->k - 32 * c;
            __mmask32 st = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1);
            _mm512_mask_storeu_epi16(out + 32 * c, st, w);
        }
    }
}

/* ------------------------------------------------------------------ AVX2 path */
#define T256 __attribute__((target("avx2,fma,popcnt")))
/* vpshufb control per mask byte, for the 16 bytes at the value cursor broadcast to both halves
 * of a ymm: the 32-bit lane of column i gets the kept value of rank(i) in its upper 16 bits
 * (bf16 -> fp32 in the shuffle itself), zero where column i is not kept (0x80) */
static uint8_t SHUF32[256][32];

/* Rows [r0, r1), M rows of x (held as fp32, xf [M, kp]): 8 columns per mask byte, a 16-byte
 * load at the value cursor broadcast to a ymm, one vpshufb to fp32 lanes, one FMA per row of x.
 * Up to 4 rows of x, even and odd bytes go to two accumulators (the FMA latency chain). */
T256 static inline __attribute__((always_inline)) void bm256_rows(const job_t *j, Py_ssize_t r0,
                                                                  Py_ssize_t r1, const int M) {
    const Py_ssize_t kb = (j->k + 7) / 8;
    const float *xf = (const float *)j->x;
    const int two = M <= 4;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *b = j->bits + r * kb;
        const uint16_t *v = j->values + j->offsets[r];
        __m256 a0[MAX_M], a1[MAX_M];
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) a0[i] = a1[i] = _mm256_setzero_ps();
#define BM256_BYTE(c, acc)                                                                       \
    do {                                                                                         \
        const unsigned km = b[c];                                                                \
        __m128i raw;                                                                             \
        if (__builtin_expect(j->vend - v >= 8, 1)) {                                             \
            raw = _mm_loadu_si128((const __m128i *)v);                                           \
        } else { /* the last few values: no read past the end */                                 \
            uint16_t tail[8] = {0};                                                              \
            memcpy(tail, v, (size_t)(j->vend - v) * 2);                                          \
            raw = _mm_loadu_si128((const __m128i *)tail);                                        \
        }                                                                                        \
        const __m256 wf = _mm256_castsi256_ps(_mm256_shuffle_epi8(                               \
            _mm256_broadcastsi128_si256(raw), _mm256_loadu_si256((const __m256i *)SHUF32[km]))); \
        v += _mm_popcnt_u32(km);                                                                 \
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++)                                      \
            acc[i] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xf + i * j->kp + 8 * (c)), acc[i]);    \
    } while (0)
        Py_ssize_t c = 0;
        if (two)
            for (; c + 2 <= kb; c += 2) {
                BM256_BYTE(c, a0);
                BM256_BYTE(c + 1, a1);
            }
        for (; c < kb; c++) BM256_BYTE(c, a0);
#undef BM256_BYTE
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) {
            const __m256 t = two ? _mm256_add_ps(a0[i], a1[i]) : a0[i];
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            j->y[i * j->n + r] = _mm_cvtss_f32(s);
        }
    }
}

#define AVX2_ROWS(M)                                                                             \
    T256 static void bm256_m##M(const job_t *j, Py_ssize_t r0, Py_ssize_t r1) {                  \
        bm256_rows(j, r0, r1, M);                                                                \
    }
AVX2_ROWS(1)
AVX2_ROWS(2)
AVX2_ROWS(3)
AVX2_ROWS(4)
AVX2_ROWS(5)
AVX2_ROWS(6)
AVX2_ROWS(7)
AVX2_ROWS(8)
static const rows_fn BM256[MAX_M + 1] = {NULL, bm256_m1, bm256_m2, bm256_m3, bm256_m4,
                                         bm256_m5, bm256_m6, bm256_m7, bm256_m8};
#endif /* HAVE_X86 */

/* portable decode (no AVX-512 or not x86) */
static void decode_scalar(const job_t *j, Py_ssize_t r0, Py_ssize_t r1) {
    const Py_ssize_t kb = (j->k + 7) / 8;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *b = j->bits + r * kb;
        const uint16_t *v = j->values + j->offsets[r];
        uint16_t *out = j->wout + r * j->k;
        for (Py_ssize_t c = 0; c < j->k; c++) out[c] = (b[c / 8] >> (c % 8) & 1) ? *v++ : 0;
    }
}

static void run_rows(const job_t *j, Py_ssize_t r0, Py_ssize_t r1) {
    if (r0 >= r1) return;
#if HAVE_X86
    if (j->kind == 0 && j->path == 1) BM512[j->m](j, r0, r1);
    else if (j->kind == 0) BM256[j->m](j, r0, r1);
    else if (j->kind == 1 && j->path == 1) decode512(j, r0, r1);
    else if (j->kind == 1) decode_scalar(j, r0, r1);
    else DENSE512[j->m](j, r0, r1);
#else
    decode_scalar(j, r0, r1);
#endif
}

/* ------------------------------------------------------------------ thread pool */
/* A call cuts the rows into chunks that threads claim one at a time from a shared counter
 * (generation << 32 | next chunk). The caller claims chunks too, so a worker the OS has not
 * scheduled yet (a busy machine) costs nothing: the caller takes its chunks, and waits only for
 * chunks a worker has claimed and is running. A worker that wakes after the call sees another
 * generation in the counter and claims nothing. Workers spin a short while before sleeping on a
 * condition variable: decode calls come back to back. Calls are serialised by call_lock. */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static int pool_size = 1;           /* threads including the caller */
static uint64_t pool_claim = 0;     /* generation << 32 | next chunk to claim */
static uint64_t pool_done = 0;      /* chunks finished in the current call */
static job_t pool_job;              /* the current call's job */
static Py_ssize_t pool_chunk_rows;  /* rows per chunk */
static uint64_t pool_chunks;        /* chunks in the current call */

/* claim and run chunks of generation gen until none is left */
static void drain(uint64_t gen) {
    for (;;) {
        uint64_t v = __atomic_load_n(&pool_claim, __ATOMIC_ACQUIRE);
        if ((v >> 32) != gen || (v & 0xFFFFFFFFu) >= pool_chunks) return;
        if (!__atomic_compare_exchange_n(&pool_claim, &v, v + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        Py_ssize_t r0 = (Py_ssize_t)(v & 0xFFFFFFFFu) * pool_chunk_rows;
        Py_ssize_t r1 = r0 + pool_chunk_rows < pool_job.n ? r0 + pool_chunk_rows : pool_job.n;
        run_rows(&pool_job, r0, r1);
        __atomic_add_fetch(&pool_done, 1, __ATOMIC_ACQ_REL);
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint64_t seen = __atomic_load_n(&pool_claim, __ATOMIC_ACQUIRE) >> 32;
    for (;;) {
        uint64_t gen;
        int spins = 0;
        while ((gen = __atomic_load_n(&pool_claim, __ATOMIC_ACQUIRE) >> 32) == seen &&
               spins < 4000) {
            spins++;
#if HAVE_X86
            _mm_pause();
#endif
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool_lock);
            while ((gen = __atomic_load_n(&pool_claim, __ATOMIC_ACQUIRE) >> 32) == seen)
                pthread_cond_wait(&pool_wake, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
        }
        seen = gen;
        drain(gen);
    }
    return NULL;
}

static void grow_pool(int threads) {
    while (pool_size < threads) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &at, worker, NULL) != 0;
        pthread_attr_destroy(&at);
        if (failed) break;
        pool_size++;
    }
}

/* rows [0, n) of job j on up to `threads` threads, in about 8 chunks per thread (at least 16
 * rows each, so that a chunk's work dwarfs its claim) */
static void run_parallel(const job_t *j, int threads) {
    pthread_mutex_lock(&call_lock);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1) grow_pool(threads);
    if (threads < 2 || pool_size < 2 || j->n < 32) {
        run_rows(j, 0, j->n);
        pthread_mutex_unlock(&call_lock);
        return;
    }
    Py_ssize_t rows = (j->n + 8 * threads - 1) / (8 * threads);
    pool_chunk_rows = rows < 16 ? 16 : rows;
    pool_chunks = (uint64_t)((j->n + pool_chunk_rows - 1) / pool_chunk_rows);
    pool_job = *j;
    __atomic_store_n(&pool_done, 0, __ATOMIC_RELEASE);
    uint64_t gen = (__atomic_load_n(&pool_claim, __ATOMIC_ACQUIRE) >> 32) + 1;
    pthread_mutex_lock(&pool_lock);
    __atomic_store_n(&pool_claim, gen << 32, __ATOMIC_RELEASE); /* publishes the job */
    pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    drain(gen);
    for (int spins = 0; __atomic_load_n(&pool_done, __ATOMIC_ACQUIRE) < pool_chunks; spins++) {
        if (spins > 4000) sched_yield(); /* a worker is mid-chunk but descheduled */
#if HAVE_X86
        else _mm_pause();
#endif
    }
    /* close the generation before the next call rewrites the job: a worker that read this
     * generation late finds no chunk left, whatever the next call's chunk count */
    __atomic_store_n(&pool_claim, gen << 32 | 0xFFFFFFFFu, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&call_lock);
}

/* ------------------------------------------------------------------ Python interface */
static int path_supported(int path) {
#if HAVE_X86
    __builtin_cpu_init();
    if (path == 1)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
               __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2");
    if (path == 2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    (void)path;
    return 0;
}

static int parse_path(const char *name) {
    if (strcmp(name, "avx512") == 0) return 1;
    if (strcmp(name, "avx2") == 0) return 2;
    return 0;
}

/* x [m, k] bf16 -> a zero-padded copy [m, kp] (avx512: bf16; avx2: fp32) */
static void *pad_x(const uint16_t *x, int m, Py_ssize_t k, Py_ssize_t kp, int path) {
    if (path == 2) {
        float *out = calloc((size_t)m * kp, sizeof(float));
        if (!out) return NULL;
        for (int i = 0; i < m; i++)
            for (Py_ssize_t c = 0; c < k; c++) {
                uint32_t u = (uint32_t)x[i * k + c] << 16;
                memcpy(out + i * kp + c, &u, 4);
            }
        return out;
    }
    uint16_t *out = calloc((size_t)m * kp, sizeof(uint16_t));
    if (!out) return NULL;
    for (int i = 0; i < m; i++) memcpy(out + i * kp, x + i * k, k * sizeof(uint16_t));
    return out;
}

static PyObject *matmul_common(PyObject *args, int kind) {
    const char *pname;
    unsigned long long xa, ba, va, oa, ya;
    Py_ssize_t m, n, k;
    int threads;
    if (kind == 0) {
        if (!PyArg_ParseTuple(args, "sKKKKKnnni", &pname, &xa, &ba, &va, &oa, &ya, &m, &n, &k,
                              &threads))
            return NULL;
    } else {
        if (!PyArg_ParseTuple(args, "sKKKnnni", &pname, &xa, &va, &ya, &m, &n, &k, &threads))
            return NULL;
        ba = oa = 0;
    }
    int path = parse_path(pname);
    if (path == 0 || !path_supported(path) || (kind == 2 && path != 1)) {
        PyErr_Format(PyExc_ValueError, "kernel path %s is not available on this CPU", pname);
        return NULL;
    }
    if (m < 1 || m > MAX_M || n < 0 || k < 1 || (kind == 2 && k % 32)) {
        PyErr_SetString(PyExc_ValueError, "bad shape (1 <= m <= 8 rows of x)");
        return NULL;
    }
    job_t j = {0};
    j.kind = kind;
    j.path = path;
    j.m = (int)m;
    j.n = n;
    j.k = k;
    j.kp = path == 2 ? (k + 7) / 8 * 8 : (k + 31) / 32 * 32;
    j.bits = (const uint8_t *)(uintptr_t)ba;
    j.offsets = (const int64_t *)(uintptr_t)oa;
    j.values = (const uint16_t *)(uintptr_t)va;
    j.w = (const uint16_t *)(uintptr_t)va;
    if (kind == 0) j.vend = j.values + j.offsets[n];
    j.y = (float *)(uintptr_t)ya;
    void *xp = NULL;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    if (path == 1 && k == j.kp) { /* bf16 rows already whole chunks: read x in place */
        j.x = (const uint16_t *)(uintptr_t)xa;
        run_parallel(&j, threads);
    } else if ((xp = pad_x((const uint16_t *)(uintptr_t)xa, (int)m, k, j.kp, path))) {
        j.x = xp;
        run_parallel(&j, threads);
        free(xp);
    } else {
        ok = 0;
    }
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *bitmask_matmul(PyObject *self, PyObject *args) { return matmul_common(args, 0); }
static PyObject *dense_matmul(PyObject *self, PyObject *args) { return matmul_common(args, 2); }

static PyObject *bitmask_decode(PyObject *self, PyObject *args) {
    unsigned long long ba, va, oa, wa;
    Py_ssize_t n, k;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKnni", &ba, &va, &oa, &wa, &n, &k, &threads)) return NULL;
    job_t j = {0};
    j.kind = 1;
    j.path = path_supported(1) ? 1 : 0;
    j.n = n;
    j.k = k;
    j.bits = (const uint8_t *)(uintptr_t)ba;
    j.values = (const uint16_t *)(uintptr_t)va;
    j.offsets = (const int64_t *)(uintptr_t)oa;
    j.vend = j.values + j.offsets[n];
    j.wout = (uint16_t *)(uintptr_t)wa;
    Py_BEGIN_ALLOW_THREADS
    run_parallel(&j, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *paths(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    if (path_supported(1) && PyList_Append(out, PyUnicode_FromString("avx512")) < 0) goto fail;
    if (path_supported(2) && PyList_Append(out, PyUnicode_FromString("avx2")) < 0) goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bitmask_matmul", bitmask_matmul, METH_VARARGS,
     "bitmask_matmul(path, x, bits, values, offsets, y, m, n, k, threads): y[m, n] fp32 = "
     "x[m, k] bf16 @ W^T for a bitmask weight (arguments are data addresses)."},
    {"bitmask_decode", bitmask_decode, METH_VARARGS,
     "bitmask_decode(bits, values, offsets, w, n, k, threads): the dense bf16 weight w[n, k]."},
    {"dense_matmul", dense_matmul, METH_VARARGS,
     "dense_matmul(path, x, w, y, m, n, k, threads): y = x @ w^T for a dense bf16 w (avx512, "
     "k % 32 == 0): the bytes ceiling's reference loop."},
    {"paths", paths, METH_NOARGS, "paths() -> the kernel paths this CPU runs, fastest first."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "cpu_kernels",
                                    "Optional native CPU kernels for bitmask sparse weights.", -1,
                                    methods};

PyMODINIT_FUNC PyInit_cpu_kernels(void) {
#if HAVE_X86
    for (int byte = 0; byte < 256; byte++) {
        int rank = 0;
        for (int i = 0; i < 8; i++) {
            uint8_t *lane = SHUF32[byte] + 4 * i; /* the lanes of columns 4..7 index the copy */
            lane[0] = lane[1] = 0x80;             /* of the 16 bytes in the upper half */
            if (byte >> i & 1) {
                lane[2] = (uint8_t)(2 * rank);
                lane[3] = (uint8_t)(2 * rank + 1);
                rank++;
            } else {
                lane[2] = lane[3] = 0x80;
            }
        }
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI", ABI_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
