/* Optional native helper for compact exports (llmprune/compact.py).
 *
 * gather_bits(src, bits, out, rows, cols, esize, four=False) -> (written, stray)
 *
 *   src   C-contiguous rows x cols elements of esize bytes (1, 2, 4 or 8): a weight's raw bits
 *   bits  rows x ceil(cols / 8) bytes: a packed keep mask, little-endian bit order (bit j % 8 of
 *         byte j / 8 of a row is column j), every row padded to a whole byte
 *   out   writable, room for at least popcount(bits) elements of esize bytes
 *
 * Copies the elements whose bit is set into out, in row-major order (numpy's
 * compress(unpackbits(bits), src)), and counts the elements whose bit is clear and whose raw bits
 * are not all zero ("stray": a pruned position that does not hold +0.0). Returns the number of
 * elements written and that count. One pass over src, no temporary; the GIL is released.
 * four: a hint that most mask bytes have exactly 4 bits set (2:4 masks): those bytes then copy
 * 4 elements, not 8; on random masks the test would be mispredicted, so it is off by default.
 *
 * numpy's compress builds an int64 index array first and does not release the GIL: on
 * smollm2-135m it took ~0.1 s of a ~0.3 s export (eval/bench_export.py). The Python fallback
 * (no compiler at install time) is that numpy path, with the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* the set bits of every byte value, ascending; the unused tail repeats position 0 */
static unsigned char POS[256][8];
static unsigned char CNT[256];

/* Elements whose raw bits are not all zero, counted in blocks of 256 into a 16-bit counter
 * (which compilers vectorise at the element width: 3.5x faster than one Py_ssize_t counter). */
#define COUNT_KERNEL(T)                                                                         \
    static Py_ssize_t count_##T(const T *restrict x, Py_ssize_t n) {                            \
        Py_ssize_t c = 0;                                                                       \
        for (Py_ssize_t i = 0; i < n; i += 256) {                                               \
            Py_ssize_t end = n - i < 256 ? n : i + 256;                                         \
            uint16_t block = 0;                                                                 \
            for (Py_ssize_t j = i; j < end; j++) block += x[j] != 0;                            \
            c += block;                                                                         \
        }                                                                                       \
        return c;                                                                               \
    }

/* The copy: per mask byte, the 8 positions of its set bits (POS) are copied unconditionally
 * while out has room for 8 more, and the write position advances by the byte's popcount, so
 * there is no branch on the mask. stray = nonzero elements of src - nonzero kept elements. */
#define GATHER_KERNEL(T)                                                                        \
    COUNT_KERNEL(T)                                                                             \
    static void gather_##T(const T *restrict src, const unsigned char *restrict bits,          \
                           T *restrict out, Py_ssize_t rows,                                     \
                           Py_ssize_t cols, Py_ssize_t cap, int four, Py_ssize_t *written,      \
                           Py_ssize_t *stray) {                                                 \
        Py_ssize_t w = 0, row_bytes = (cols + 7) / 8, full = cols / 8;                          \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                 \
            const T *restrict x = src + r * cols;                                                    \
            const unsigned char *b = bits + r * row_bytes;                                      \
            for (Py_ssize_t k = 0; k < full; k++) {                                             \
                const T *e = x + 8 * k;                                                         \
                const unsigned char *p = POS[b[k]];                                             \
                if (four && CNT[b[k]] == 4) { /* 2:4: every byte, a predictable branch */     \
                    out[w] = e[p[0]]; out[w + 1] = e[p[1]]; out[w + 2] = e[p[2]];               \
                    out[w + 3] = e[p[3]];                                                       \
                } else if (w + 8 <= cap) {                                                      \
                    out[w] = e[p[0]]; out[w + 1] = e[p[1]]; out[w + 2] = e[p[2]];               \
                    out[w + 3] = e[p[3]]; out[w + 4] = e[p[4]]; out[w + 5] = e[p[5]];           \
                    out[w + 6] = e[p[6]]; out[w + 7] = e[p[7]];                                 \
                } else {                                                                        \
                    for (int i = 0; i < CNT[b[k]]; i++) out[w + i] = e[p[i]];                   \
                }                                                                               \
                w += CNT[b[k]];                                                                 \
            }                                                                                   \
            for (Py_ssize_t j = 8 * full; j < cols; j++) /* the row's last partial byte */      \
                if (b[j / 8] >> (j % 8) & 1) out[w++] = x[j];                                   \
        }                                                                                       \
        *written = w;                                                                           \
        *stray = count_##T(src, rows * cols) - count_##T(out, w);                               \
    }

GATHER_KERNEL(uint8_t)
GATHER_KERNEL(uint16_t)
GATHER_KERNEL(uint32_t)
GATHER_KERNEL(uint64_t)

static Py_ssize_t popcount_bytes(const unsigned char *b, Py_ssize_t n) {
    Py_ssize_t c = 0;
    for (Py_ssize_t i = 0; i < n; i++) c += CNT[b[i]];
    return c;
}

static PyObject *gather_bits(PyObject *self, PyObject *args) {
    Py_buffer src, bits, out;
    Py_ssize_t rows, cols, esize, written = 0, stray = 0;
    int four = 0;
    if (!PyArg_ParseTuple(args, "y*y*w*nnn|p", &src, &bits, &out, &rows, &cols, &esize, &four))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t row_bytes = (cols + 7) / 8;
    if (rows < 0 || cols < 0 || (esize != 1 && esize != 2 && esize != 4 && esize != 8)) {
        PyErr_SetString(PyExc_ValueError, "gather_bits: bad shape or element size");
        goto done;
    }
    if (src.len != rows * cols * esize || bits.len != rows * row_bytes) {
        PyErr_SetString(PyExc_ValueError, "gather_bits: buffer sizes do not match the shape");
        goto done;
    }
    /* every set bit must have room in out, padding bits included: check before writing */
    if (popcount_bytes((const unsigned char *)bits.buf, bits.len) * esize > out.len) {
        PyErr_SetString(PyExc_ValueError, "gather_bits: out is smaller than the kept elements");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    switch (esize) {
    case 1: gather_uint8_t(src.buf, bits.buf, out.buf, rows, cols, out.len / esize, four, &written, &stray); break;
    case 2: gather_uint16_t(src.buf, bits.buf, out.buf, rows, cols, out.len / esize, four, &written, &stray); break;
    case 4: gather_uint32_t(src.buf, bits.buf, out.buf, rows, cols, out.len / esize, four, &written, &stray); break;
    default: gather_uint64_t(src.buf, bits.buf, out.buf, rows, cols, out.len / esize, four, &written, &stray); break;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", written, stray);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&bits);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"gather_bits", gather_bits, METH_VARARGS,
     "gather_bits(src, bits, out, rows, cols, esize, four=False) -> (written, stray): copy the elements of "
     "src whose bit is set in the packed row-padded mask bits into out, and count the elements "
     "whose bit is clear and whose raw bits are nonzero."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "Optional native helpers for llmprune's compact exports.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
    for (int v = 0; v < 256; v++) {
        int c = 0;
        for (int j = 0; j < 8; j++)
            if (v >> j & 1) POS[v][c++] = (unsigned char)j;
        CNT[v] = (unsigned char)c;
    }
    PyObject *m = PyModule_Create(&module);
    /* compact.py uses this module only when ABI matches what it expects, so a stale build (an
     * editable install not rebuilt after an update) falls back to numpy instead of failing */
    if (m && PyModule_AddIntConstant(m, "ABI", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
