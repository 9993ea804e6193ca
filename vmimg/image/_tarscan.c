/* The fast path of vmimg's layer tar parser (vmimg/image/tarparse.py).
 *
 * scan(buf, pos, base) reads consecutive plain tar headers (ustar, GNU or v7; no PAX,
 * no GNU long names, no sparse files) from `buf` starting at `pos`, and returns
 * (members, pos): one tuple per member, as Python's tarfile would have read it, and the
 * position of the first header it left alone. It stops, without consuming it, at any
 * header it does not take whole: one that does not fit in `buf`, an all-zero block, a bad
 * checksum, a number field in any but the plain forms (octal between blanks, base-256 that
 * fits), a member the Python parser must refuse or treat specially (meta types, negative
 * sizes, ids past 32 bits, times past 64-bit nanoseconds). The Python parser then reads
 * that header itself, so every decision about an odd header is made in one place.
 *
 * `base` is the absolute offset of buf[0] in the layer: member offsets are absolute.
 * Nothing in a header is trusted: every read is inside the 512-byte block, which is
 * inside `buf`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define NS_PER_S 1000000000LL
#define MAX_ID 0xFFFFFFFFLL
#define MAX_MTIME_S (INT64_MAX / NS_PER_S)
/* base-256 values of more than this many bits go to the Python parser */
#define MAX_BASE256_BITS 62
/* the largest offset of a buffer in its layer: offsets plus sizes stay below 2^63 */
#define MAX_BASE ((int64_t)1 << 60)

/* field offsets and lengths in a ustar header block */
#define NAME_OFF 0
#define NAME_LEN 100
#define MODE_OFF 100
#define UID_OFF 108
#define GID_OFF 116
#define ID_LEN 8
#define SIZE_OFF 124
#define MTIME_OFF 136
#define NUM12_LEN 12
#define CHKSUM_OFF 148
#define TYPE_OFF 156
#define LINK_OFF 157
#define LINK_LEN 100
#define DEVMAJOR_OFF 329
#define DEVMINOR_OFF 337
#define PREFIX_OFF 345
#define PREFIX_LEN 155

/* Python's str.isspace() on an ASCII character (str.strip() strips these). */
static int is_blank(unsigned char c) {
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

/* A number field in the forms tarfile's nti() reads the same way we do here; 0 and *out
 * set, or -1 for anything else (the Python parser decides about it). */
static int number(const unsigned char *f, size_t len, int64_t *out) {
    size_t i, start, end;
    int64_t n = 0;
    if (f[0] == 0x80) { /* base-256, positive */
        for (i = 1; i < len; i++) {
            if (n >> (MAX_BASE256_BITS - 8))
                return -1;
            n = (n << 8) | f[i];
        }
        *out = n;
        return 0;
    }
    if (f[0] == 0xff)
        return -1; /* base-256, negative: never valid where the fast path goes */
    const unsigned char *nul = memchr(f, 0, len);
    end = nul ? (size_t)(nul - f) : len;
    start = 0;
    while (start < end && is_blank(f[start]))
        start++;
    while (end > start && is_blank(f[end - 1]))
        end--;
    for (i = start; i < end; i++) {
        if (f[i] < '0' || f[i] > '7')
            return -1;
        n = (n << 3) | (f[i] - '0'); /* at most 12 digits: 36 bits */
    }
    *out = n;
    return 0;
}

static size_t field_len(const unsigned char *f, size_t len) {
    const unsigned char *nul = memchr(f, 0, len);
    return nul ? (size_t)(nul - f) : len;
}

static int all_zero(const unsigned char *b) {
    for (size_t i = 0; i < BLOCK; i++)
        if (b[i])
            return 0;
    return 1;
}

static int checksum_ok(const unsigned char *b, int64_t stored) {
    int64_t u = 0, s = 0;
    for (size_t i = 0; i < BLOCK; i++) {
        unsigned char c = (i >= CHKSUM_OFF && i < CHKSUM_OFF + 8) ? ' ' : b[i];
        u += c;
        s += (signed char)c;
    }
    return stored == u || stored == s;
}

/* Types whose members tarfile skips the data of: regular files, and types it does not know.
 * The ones it knows and does not skip: hardlink, symlink, char, block, directory, fifo.
 * The meta types (L, K, S, x, g, X) never reach here. */
static int skips_data(unsigned char t) {
    return !(t == '1' || t == '2' || t == '3' || t == '4' || t == '5' || t == '6');
}

static int is_meta(unsigned char t) {
    return t == 'L' || t == 'K' || t == 'S' || t == 'x' || t == 'g' || t == 'X';
}

/* One member from the header at b (absolute offset hdr), or NULL with no error set: the
 * Python parser takes this header. NULL with an error set: out of memory. */
static PyObject *member(const unsigned char *b, int64_t hdr, int64_t *next) {
    int64_t chk, mode, uid, gid, size, mtime, major, minor;
    unsigned char type = b[TYPE_OFF];
    if (is_meta(type))
        return NULL;
    if (number(b + CHKSUM_OFF, 8, &chk) || !checksum_ok(b, chk))
        return NULL;
    if (number(b + MODE_OFF, ID_LEN, &mode) || number(b + UID_OFF, ID_LEN, &uid) ||
        number(b + GID_OFF, ID_LEN, &gid) || number(b + SIZE_OFF, NUM12_LEN, &size) ||
        number(b + MTIME_OFF, NUM12_LEN, &mtime) || number(b + DEVMAJOR_OFF, ID_LEN, &major) ||
        number(b + DEVMINOR_OFF, ID_LEN, &minor))
        return NULL;
    if (uid > MAX_ID || gid > MAX_ID || mtime > MAX_MTIME_S)
        return NULL;
    size_t name_len = field_len(b + NAME_OFF, NAME_LEN);
    size_t link_len = field_len(b + LINK_OFF, LINK_LEN);
    size_t prefix_len = field_len(b + PREFIX_OFF, PREFIX_LEN);
    /* v7: a directory is a regular file whose name ends in a slash */
    if (type == 0 && name_len > 0 && b[NAME_OFF + name_len - 1] == '/')
        type = '5';
    if (type == '5')
        while (name_len > 0 && b[NAME_OFF + name_len - 1] == '/')
            name_len--;
    unsigned char name[PREFIX_LEN + 1 + NAME_LEN];
    size_t n = 0;
    if (prefix_len) {
        memcpy(name, b + PREFIX_OFF, prefix_len);
        n = prefix_len;
        name[n++] = '/';
    }
    memcpy(name + n, b + NAME_OFF, name_len);
    n += name_len;
    if (type == '5') /* and again once the prefix is on (tarfile's _proc_builtin) */
        while (n > 0 && name[n - 1] == '/')
            n--;
    int64_t data = hdr + BLOCK;
    *next = skips_data(type) ? data + ((size + BLOCK - 1) & ~(int64_t)(BLOCK - 1)) : data;
    char type_byte = (char)type;
    return Py_BuildValue("(y#y#LLLLLy#LLL)", (const char *)name, (Py_ssize_t)n, &type_byte,
                         (Py_ssize_t)1, (long long)mode, (long long)uid, (long long)gid,
                         (long long)(mtime * NS_PER_S), (long long)size,
                         (const char *)(b + LINK_OFF), (Py_ssize_t)link_len, (long long)major,
                         (long long)minor, (long long)data);
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    long long base;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nL", &view, &pos, &base))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto fail;
    if (pos < 0 || base < 0 || base > MAX_BASE) {
        PyErr_SetString(PyExc_ValueError, "scan: negative position or base");
        goto fail;
    }
    const unsigned char *buf = view.buf;
    Py_ssize_t len = view.len;
    while (pos <= len - BLOCK) {
        const unsigned char *b = buf + pos;
        if (all_zero(b))
            break;
        int64_t next;
        PyObject *m = member(b, (int64_t)base + pos, &next);
        if (m == NULL) {
            if (PyErr_Occurred())
                goto fail;
            break;
        }
        int err = PyList_Append(out, m);
        Py_DECREF(m);
        if (err)
            goto fail;
        pos = (Py_ssize_t)(next - base);
        if (next - base > len)
            break;
    }
    PyBuffer_Release(&view);
    PyObject *result = Py_BuildValue("(Nn)", out, pos);
    return result;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(buf, pos, base) -> (members, pos): the plain tar headers at buf[pos:]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.image._tarscan", "Fast path of the layer tar parser.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarscan(void) { return PyModule_Create(&module); }
