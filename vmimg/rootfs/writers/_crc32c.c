/* CRC-32C (Castagnoli) as the Linux kernel computes it for ext4 and erofs metadata.
 *
 * crc32c(seed, data) is the kernel's crc32c(seed, data): the reflected CRC with polynomial
 * 0x82F63B78, no inversion on input or output (the standard CRC-32C of data is
 * crc32c(0xFFFFFFFF, data) ^ 0xFFFFFFFF). ext4 chains it from s_csum_seed; erofs takes
 * crc32c(~0, superblock block).
 *
 * Our own rather than a PyPI package: the one we used read its version from package
 * metadata at import, a third of the start-up of a cached `vmimg rootfs`. x86-64 CPUs
 * with SSE4.2 have the instruction; elsewhere a table, eight bytes a step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define POLY 0x82F63B78u /* Castagnoli, bit-reflected */
#define SLICES 8

static uint32_t table[SLICES][256];

static void make_tables(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int s = 1; s < SLICES; s++)
            table[s][n] = (table[s - 1][n] >> 8) ^ table[0][table[s - 1][n] & 0xff];
}

static uint32_t crc_table(uint32_t crc, const unsigned char *p, size_t len) {
    while (len >= SLICES) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4); /* little-endian layout assumed below: fixed up on big-endian */
        memcpy(&hi, p + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        lo = __builtin_bswap32(lo);
        hi = __builtin_bswap32(hi);
#endif
        lo ^= crc;
        crc = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
              table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
              table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += SLICES;
        len -= SLICES;
    }
    while (len--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_SSE42_PATH 1
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t crc, const unsigned char *p,
                                                             size_t len) {
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c;
    while (len--)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}
#endif

static int use_sse42;

static PyObject *crc32c(PyObject *self, PyObject *args) {
    PyObject *seed_obj;
    Py_buffer view;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!y*", &PyLong_Type, &seed_obj, &view))
        return NULL;
    /* OverflowError for a negative seed or one past 64 bits; ValueError past 32 */
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_obj);
    if (PyErr_Occurred() || seed > 0xFFFFFFFFull) {
        PyBuffer_Release(&view);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "crc32c: seed is not a 32-bit value");
        return NULL;
    }
    uint32_t crc = (uint32_t)seed;
    const unsigned char *p = view.buf;
    size_t len = (size_t)view.len;
#ifdef HAVE_SSE42_PATH
    if (use_sse42)
        crc = crc_sse42(crc, p, len);
    else
#endif
        crc = crc_table(crc, p, len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef methods[] = {
    {"crc32c", crc32c, METH_VARARGS,
     "crc32c(seed, data) -> int: the kernel's CRC-32C of data from seed, no inversions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs.writers._crc32c", "CRC-32C as the kernel computes it.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crc32c(void) {
    make_tables();
#ifdef HAVE_SSE42_PATH
    /* VMIMG_CRC32C_TABLE=1 forces the table, so that the tests check both ways. */
    const char *force = getenv("VMIMG_CRC32C_TABLE");
    use_sse42 = __builtin_cpu_supports("sse4.2") && !(force && force[0] == '1');
#endif
    return PyModule_Create(&module);
}
