/* The hashes the Linux kernel keeps in ext4 and erofs metadata, as it computes them.
 *
 * half_md4(name, seed) is ext4's htree name hash (fs/ext4/hash.c, DX_HASH_HALF_MD4 with
 * unsigned name bytes): (major, minor), major with its low bit clear, as the directory index
 * stores it. `seed` is s_hash_seed as four words; all zero means MD4's initial values.
 *
 * crc32c(seed, data) is the kernel's crc32c(seed, data): the reflected CRC with polynomial
 * 0x82F63B78, no inversion on input or output (the standard CRC-32C of data is
 * crc32c(0xFFFFFFFF, data) ^ 0xFFFFFFFF). ext4 chains it from s_csum_seed; erofs takes
 * crc32c(~0, superblock block).
 *
 * Our own rather than a PyPI package: the one we used read its version from package
 * metadata at import, a third of the start-up of a cached `vmimg rootfs`. The CRC itself
 * is in crc32c.h, shared with ext4/_ext4meta.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "crc32c.h"

/* -- ext4's half-MD4 name hash ----------------------------------------------------------- */

#define MD4_K2 013240474631u
#define MD4_K3 015666365641u
#define HASH_WORDS 8 /* one transform takes 32 bytes of name as 8 words */
#define DX_HASH_EOF_32BIT 0x7FFFFFFFu

static uint32_t rol32(uint32_t x, int s) { return (x << s) | (x >> (32 - s)); }

#define MD4_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define MD4_G(x, y, z) (((x) & (y)) + (((x) ^ (y)) & (z)))
#define MD4_H(x, y, z) ((x) ^ (y) ^ (z))
#define MD4_STEP(f, a, b, c, d, x, s) ((a) = rol32((a) + f((b), (c), (d)) + (x), (s)))

/* The kernel's half_md4_transform: three rounds of MD4 over 8 words. */
static void half_md4_transform(uint32_t buf[4], const uint32_t in[HASH_WORDS]) {
    uint32_t a = buf[0], b = buf[1], c = buf[2], d = buf[3];
    MD4_STEP(MD4_F, a, b, c, d, in[0], 3);
    MD4_STEP(MD4_F, d, a, b, c, in[1], 7);
    MD4_STEP(MD4_F, c, d, a, b, in[2], 11);
    MD4_STEP(MD4_F, b, c, d, a, in[3], 19);
    MD4_STEP(MD4_F, a, b, c, d, in[4], 3);
    MD4_STEP(MD4_F, d, a, b, c, in[5], 7);
    MD4_STEP(MD4_F, c, d, a, b, in[6], 11);
    MD4_STEP(MD4_F, b, c, d, a, in[7], 19);
    MD4_STEP(MD4_G, a, b, c, d, in[1] + MD4_K2, 3);
    MD4_STEP(MD4_G, d, a, b, c, in[3] + MD4_K2, 5);
    MD4_STEP(MD4_G, c, d, a, b, in[5] + MD4_K2, 9);
    MD4_STEP(MD4_G, b, c, d, a, in[7] + MD4_K2, 13);
    MD4_STEP(MD4_G, a, b, c, d, in[0] + MD4_K2, 3);
    MD4_STEP(MD4_G, d, a, b, c, in[2] + MD4_K2, 5);
    MD4_STEP(MD4_G, c, d, a, b, in[4] + MD4_K2, 9);
    MD4_STEP(MD4_G, b, c, d, a, in[6] + MD4_K2, 13);
    MD4_STEP(MD4_H, a, b, c, d, in[3] + MD4_K3, 3);
    MD4_STEP(MD4_H, d, a, b, c, in[7] + MD4_K3, 9);
    MD4_STEP(MD4_H, c, d, a, b, in[2] + MD4_K3, 11);
    MD4_STEP(MD4_H, b, c, d, a, in[6] + MD4_K3, 15);
    MD4_STEP(MD4_H, a, b, c, d, in[1] + MD4_K3, 3);
    MD4_STEP(MD4_H, d, a, b, c, in[5] + MD4_K3, 9);
    MD4_STEP(MD4_H, c, d, a, b, in[0] + MD4_K3, 11);
    MD4_STEP(MD4_H, b, c, d, a, in[4] + MD4_K3, 15);
    buf[0] += a;
    buf[1] += b;
    buf[2] += c;
    buf[3] += d;
}

/* The kernel's str2hashbuf_unsigned: up to 32 bytes of `msg` as 8 words, padded with a
 * word made of `len`, the length still to hash (so the padding encodes it). */
static void str2hashbuf_unsigned(const unsigned char *msg, size_t len, uint32_t out[HASH_WORDS]) {
    uint32_t pad = (uint32_t)len | ((uint32_t)len << 8);
    pad |= pad << 16;
    uint32_t val = pad;
    int num = HASH_WORDS;
    size_t n = len > HASH_WORDS * 4 ? HASH_WORDS * 4 : len;
    for (size_t i = 0; i < n; i++) {
        val = (uint32_t)msg[i] + (val << 8);
        if (i % 4 == 3) {
            *out++ = val;
            val = pad;
            num--;
        }
    }
    if (--num >= 0)
        *out++ = val;
    while (--num >= 0)
        *out++ = pad;
}

static PyObject *half_md4(PyObject *self, PyObject *args) {
    const unsigned char *name;
    Py_ssize_t len;
    uint32_t buf[4], in[HASH_WORDS];
    (void)self;
    if (!PyArg_ParseTuple(args, "y#(IIII)", &name, &len, &buf[0], &buf[1], &buf[2], &buf[3]))
        return NULL;
    if (!(buf[0] | buf[1] | buf[2] | buf[3])) {
        buf[0] = 0x67452301u;
        buf[1] = 0xEFCDAB89u;
        buf[2] = 0x98BADCFEu;
        buf[3] = 0x10325476u;
    }
    /* as the kernel: at least one transform, even for an empty name */
    size_t remaining = (size_t)len;
    const unsigned char *p = name;
    do {
        str2hashbuf_unsigned(p, remaining, in);
        half_md4_transform(buf, in);
        p += HASH_WORDS * 4;
        remaining = remaining > HASH_WORDS * 4 ? remaining - HASH_WORDS * 4 : 0;
    } while (remaining > 0);
    uint32_t major = buf[1] & ~1u;
    if (major == (DX_HASH_EOF_32BIT << 1))
        major = (DX_HASH_EOF_32BIT - 1) << 1;
    return Py_BuildValue("(kk)", (unsigned long)major, (unsigned long)buf[2]);
}

/* -- entry points -------------------------------------------------------------------------- */

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
    uint32_t crc = crc32c_update((uint32_t)seed, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef methods[] = {
    {"half_md4", half_md4, METH_VARARGS,
     "half_md4(name, seed) -> (major, minor): ext4's htree hash of name, bytes unsigned."},
    {"crc32c", crc32c, METH_VARARGS,
     "crc32c(seed, data) -> int: the kernel's CRC-32C of data from seed, no inversions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs.writers._kernelhash", "ext4 and erofs metadata hashes as the kernel computes them.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernelhash(void) {
    crc32c_init();
    return PyModule_Create(&module);
}
