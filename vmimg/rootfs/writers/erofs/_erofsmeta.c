/* The erofs writer's per-inode and per-entry loops, in C: a Python loop over 100,000
 * inodes or directory entries is most of the time a small-file image takes to lay out.
 *
 * first_fit(meta_sizes, block_size, slot_size, open_blocks) -> (nids, end)
 *     Places each inode (the bytes it takes in the meta area: inode, xattrs, inline data
 *     or indexes, rounded up to whole slots) first-fit into a window of the last
 *     `open_blocks` blocks opened, or at the end of the area; the first slot stays
 *     unused (no inode has nid 0). Returns the nids, in order, and the area's length in
 *     bytes. The layout rule is writer.py's; this is the loop that applies it.
 *
 * dir_blocks(names, targets, block_starts, nids, file_types, block_size) -> bytes
 *     A directory's blocks: in each, the dirents of its entries, then their names. Every
 *     block but the last is padded to `block_size`; the last ends after its last name.
 *     Entry i is names[i], naming the inode targets[i], whose nid is nids[targets[i]] and
 *     whose dirent file type is file_types[targets[i]]; block_starts[b] is the first
 *     entry of block b.
 *
 * scatter(dest, places, pieces) -> None
 *     Copies each of `pieces` (bytes) into the writable buffer `dest` at the offset
 *     places[i]: the inline tails of files, symlinks and directories, each right after
 *     its inode in the meta area.
 *
 * Every index, size and offset is checked before it is used: bad input raises
 * ValueError, IndexError, TypeError or OverflowError, never writes out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* struct erofs_dirent (format.py's DIRENT, "<QHBB"): 12 bytes, little endian. */
#define DIRENT_SIZE 12
#define DIRENT_NID 0       /* __le64 nid */
#define DIRENT_NAMEOFF 8   /* __le16 nameoff: from the start of the block */
#define DIRENT_FILE_TYPE 10 /* __u8 file_type */
#define DIRENT_RESERVED 11 /* __u8 reserved, 0 */
#define NAMEOFF_MAX 0xFFFF

/* No meta area comes near these; they keep every sum below in 64 bits. */
#define META_SIZE_MAX (UINT64_C(1) << 48)
#define META_END_MAX (UINT64_C(1) << 62)
#define OPEN_BLOCKS_MAX 4096
#define BLOCK_SIZE_MAX (1 << 16) /* a nameoff must reach the end of a directory block */

typedef struct {
    uint64_t block; /* block number within the meta area */
    uint64_t free;  /* bytes still free at its end */
} open_block;

static void put_le16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* The place of `block` among the open blocks, or -1. */
static Py_ssize_t find_open(const open_block *open, Py_ssize_t nopen, uint64_t block) {
    for (Py_ssize_t i = 0; i < nopen; i++)
        if (open[i].block == block)
            return i;
    return -1;
}

static void close_open(open_block *open, Py_ssize_t *nopen, Py_ssize_t at) {
    memmove(open + at, open + at + 1, (size_t)(*nopen - at - 1) * sizeof *open);
    (*nopen)--;
}

/* One inode of `size` bytes (whole slots): its offset in the area; updates the window. */
static uint64_t place(open_block *open, Py_ssize_t *nopen, Py_ssize_t window, uint64_t *end,
                      uint64_t size, uint64_t block_size) {
    Py_ssize_t fit = -1;
    if (size <= block_size)
        for (Py_ssize_t i = 0; i < *nopen; i++)
            if (open[i].free >= size) {
                fit = i;
                break;
            }
    uint64_t offset;
    if (fit >= 0) {
        offset = (open[fit].block + 1) * block_size - open[fit].free;
    } else {
        offset = *end;
        *end += (size + block_size - 1) / block_size * block_size;
        if (*nopen >= window)
            close_open(open, nopen, 0);
    }
    uint64_t last_block = (offset + size) / block_size, used = (offset + size) % block_size;
    if (used == 0) {
        /* the inode ends its block exactly: that block is full, no longer open */
        Py_ssize_t at = last_block > 0 ? find_open(open, *nopen, last_block - 1) : -1;
        if (at >= 0)
            close_open(open, nopen, at);
    } else {
        Py_ssize_t at = find_open(open, *nopen, last_block);
        if (at >= 0) {
            open[at].free = block_size - used;
        } else {
            /* Only an inode placed at the end gets here, and it closed the oldest block
             * first if the window was full: never more than `window` open. The guard
             * keeps that so should the rule above ever change. */
            if (*nopen > window)
                close_open(open, nopen, 0);
            open[*nopen].block = last_block;
            open[*nopen].free = block_size - used;
            (*nopen)++;
        }
    }
    return offset;
}

static PyObject *first_fit(PyObject *self, PyObject *args) {
    PyObject *sizes;
    Py_ssize_t block_size, slot_size, window;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nnn", &PyList_Type, &sizes, &block_size, &slot_size, &window))
        return NULL;
    if (block_size <= 0 || slot_size <= 0 || block_size % slot_size != 0 ||
        block_size > BLOCK_SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "block_size must be a multiple of slot_size");
        return NULL;
    }
    if (window < 1 || window > OPEN_BLOCKS_MAX) {
        PyErr_SetString(PyExc_ValueError, "open_blocks out of range");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(sizes);
    /* one spare entry: a block opens after the window's oldest closes, never before */
    open_block *open = PyMem_New(open_block, (size_t)window + 1);
    PyObject *nids = PyList_New(n);
    if (open == NULL || nids == NULL) {
        PyMem_Free(open);
        Py_XDECREF(nids);
        return PyErr_NoMemory();
    }
    Py_ssize_t nopen = 1;
    open[0].block = 0;
    open[0].free = (uint64_t)(block_size - slot_size); /* slot 0: nid 0 is never used */
    uint64_t end = (uint64_t)block_size;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long raw = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(sizes, i));
        if (raw == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        if (raw > META_SIZE_MAX) {
            PyErr_SetString(PyExc_OverflowError, "an inode's meta size is too large");
            goto fail;
        }
        uint64_t size = (raw + (uint64_t)slot_size - 1) / (uint64_t)slot_size * (uint64_t)slot_size;
        uint64_t offset = place(open, &nopen, window, &end, size, (uint64_t)block_size);
        if (end > META_END_MAX) {
            PyErr_SetString(PyExc_OverflowError, "meta area too large");
            goto fail;
        }
        PyObject *nid = PyLong_FromUnsignedLongLong(offset / (uint64_t)slot_size);
        if (nid == NULL)
            goto fail;
        PyList_SET_ITEM(nids, i, nid);
    }
    PyMem_Free(open);
    return Py_BuildValue("(NK)", nids, (unsigned long long)end);
fail:
    PyMem_Free(open);
    Py_DECREF(nids);
    return NULL;
}

/* The bytes (dirents and names) of entries [start, end): -1 with an exception set if a
 * name is not bytes or the block would not hold them. */
static Py_ssize_t block_used(PyObject *names, Py_ssize_t start, Py_ssize_t end,
                             Py_ssize_t block_size) {
    Py_ssize_t used = 0;
    for (Py_ssize_t i = start; i < end; i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        if (!PyBytes_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "names must be bytes");
            return -1;
        }
        used += DIRENT_SIZE + PyBytes_GET_SIZE(name);
        if (used > block_size) {
            PyErr_SetString(PyExc_ValueError, "directory entries overflow their block");
            return -1;
        }
    }
    return used;
}

/* Entry `i`'s dirent at `dirent`; its name at `block + nameoff`. */
static int put_entry(unsigned char *block, unsigned char *dirent, Py_ssize_t nameoff,
                     PyObject *name, PyObject *target, PyObject *nids, const Py_buffer *types) {
    Py_ssize_t t = PyLong_AsSsize_t(target);
    if (t == -1 && PyErr_Occurred())
        return -1;
    if (t < 0 || t >= PyList_GET_SIZE(nids) || t >= types->len) {
        PyErr_SetString(PyExc_IndexError, "directory entry names no inode");
        return -1;
    }
    unsigned long long nid = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(nids, t));
    if (nid == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (nameoff > NAMEOFF_MAX) {
        PyErr_SetString(PyExc_OverflowError, "nameoff too large");
        return -1;
    }
    put_le64(dirent + DIRENT_NID, nid);
    put_le16(dirent + DIRENT_NAMEOFF, (uint16_t)nameoff);
    dirent[DIRENT_FILE_TYPE] = ((const unsigned char *)types->buf)[t];
    dirent[DIRENT_RESERVED] = 0;
    memcpy(block + nameoff, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
    return 0;
}

/* block_starts[b], checked to rise strictly from 0 and stay below `n`; -1 on error. */
static Py_ssize_t block_start(PyObject *starts, Py_ssize_t b, Py_ssize_t prev, Py_ssize_t n) {
    Py_ssize_t s = PyLong_AsSsize_t(PyList_GET_ITEM(starts, b));
    if (s == -1 && PyErr_Occurred())
        return -1;
    if ((b == 0 && s != 0) || (b > 0 && s <= prev) || s >= n) {
        PyErr_SetString(PyExc_ValueError, "block_starts must rise from 0 within the entries");
        return -1;
    }
    return s;
}

static PyObject *dir_blocks(PyObject *self, PyObject *args) {
    PyObject *names, *targets, *starts, *nids;
    Py_buffer types;
    Py_ssize_t block_size;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!O!O!y*n", &PyList_Type, &names, &PyList_Type, &targets,
                          &PyList_Type, &starts, &PyList_Type, &nids, &types, &block_size))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t n = PyList_GET_SIZE(names), nblocks = PyList_GET_SIZE(starts);
    Py_ssize_t *bounds = NULL; /* entry bounds of each block: bounds[b] .. bounds[b + 1] */
    if (PyList_GET_SIZE(targets) != n || n == 0 || nblocks == 0 || block_size <= 0 ||
        block_size > BLOCK_SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad directory: entries, targets or block size");
        goto done;
    }
    bounds = PyMem_New(Py_ssize_t, (size_t)nblocks + 1);
    if (bounds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t last_used = 0;
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        bounds[b] = block_start(starts, b, b ? bounds[b - 1] : 0, n);
        if (bounds[b] < 0)
            goto done;
    }
    bounds[nblocks] = n;
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        last_used = block_used(names, bounds[b], bounds[b + 1], block_size);
        if (last_used < 0)
            goto done;
    }
    if (nblocks - 1 > (PY_SSIZE_T_MAX - last_used) / block_size) {
        PyErr_SetString(PyExc_OverflowError, "directory too large");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (nblocks - 1) * block_size + last_used);
    if (out == NULL)
        goto done;
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out);
    memset(base, 0, (size_t)PyBytes_GET_SIZE(out));
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        unsigned char *block = base + b * block_size;
        Py_ssize_t nameoff = (bounds[b + 1] - bounds[b]) * DIRENT_SIZE;
        for (Py_ssize_t i = bounds[b]; i < bounds[b + 1]; i++) {
            PyObject *name = PyList_GET_ITEM(names, i);
            unsigned char *dirent = block + (i - bounds[b]) * DIRENT_SIZE;
            if (put_entry(block, dirent, nameoff, name, PyList_GET_ITEM(targets, i), nids,
                          &types) < 0) {
                Py_CLEAR(out);
                goto done;
            }
            nameoff += PyBytes_GET_SIZE(name);
        }
    }
done:
    PyMem_Free(bounds);
    PyBuffer_Release(&types);
    return out;
}

/* scatter: every place is checked against `dest` before anything is copied, so bad
 * input leaves `dest` as it was. */
static int scatter_checked(const Py_buffer *dest, PyObject *places, PyObject *pieces,
                           Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *piece = PyList_GET_ITEM(pieces, i);
        if (!PyBytes_Check(piece)) {
            PyErr_SetString(PyExc_TypeError, "pieces must be bytes");
            return -1;
        }
        Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(places, i));
        if (at == -1 && PyErr_Occurred())
            return -1;
        if (at < 0 || PyBytes_GET_SIZE(piece) > dest->len - at) {
            PyErr_SetString(PyExc_IndexError, "a piece falls outside the buffer");
            return -1;
        }
    }
    return 0;
}

static PyObject *scatter(PyObject *self, PyObject *args) {
    Py_buffer dest;
    PyObject *places, *pieces;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*O!O!", &dest, &PyList_Type, &places, &PyList_Type, &pieces))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(pieces);
    if (PyList_GET_SIZE(places) != n) {
        PyErr_SetString(PyExc_ValueError, "one place per piece");
        PyBuffer_Release(&dest);
        return NULL;
    }
    if (scatter_checked(&dest, places, pieces, n) < 0) {
        PyBuffer_Release(&dest);
        return NULL;
    }
    /* The lists cannot change in between: no Python code runs, the GIL is held. */
    unsigned char *base = (unsigned char *)dest.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *piece = PyList_GET_ITEM(pieces, i);
        Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(places, i));
        memcpy(base + at, PyBytes_AS_STRING(piece), (size_t)PyBytes_GET_SIZE(piece));
    }
    PyBuffer_Release(&dest);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"first_fit", first_fit, METH_VARARGS,
     "first_fit(meta_sizes, block_size, slot_size, open_blocks) -> (nids, end)"},
    {"dir_blocks", dir_blocks, METH_VARARGS,
     "dir_blocks(names, targets, block_starts, nids, file_types, block_size) -> bytes"},
    {"scatter", scatter, METH_VARARGS, "scatter(dest, places, pieces) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs.writers.erofs._erofsmeta",
    "The erofs writer's per-inode and per-entry loops.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__erofsmeta(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "DIRENT_SIZE", DIRENT_SIZE) < 0)
        Py_CLEAR(m);
    return m;
}
