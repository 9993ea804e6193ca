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
 * decide_versions(inodes, start, build_time_ns, inode_fields, node_fields, content_fields,
 *                 types, limits) -> stop
 *     From inodes[start] on, each inode's size (a file's its content's, a symlink's its
 *     target's length, a directory's as planned), whether it must be extended (an owner
 *     over 16 bits, too many links, a size over 32 bits, an mtime other than the build
 *     time) and its head size (inode and xattr ibody): writer.py's _decide_version, in C.
 *     Stops at the first inode that is not the common case (a device, an owner out of
 *     range, a value that is no plain 64-bit int, a slot unset) and returns its index, for
 *     the writer to decide in Python; len(inodes) when all are done. inode_fields: the
 *     inode class's slots node, nlink, xattr_ibody, size, extended, head_size;
 *     node_fields: Node's type, uid, gid, mtime_ns, content, target; content_fields:
 *     Content's size; types: the file, directory and symlink types, then those whose size
 *     is 0 and need nothing more; limits: the largest id, compact id, compact nlink and
 *     compact size, the compact and extended inode sizes.
 *
 * place_plain(inodes, start, next_block, block_size, inode_fields, node_fields, data_types,
 *             layouts) -> (stop, next_block, copies)
 *     From inodes[start] on, each file and symlink (a node whose type is one of
 *     data_types) stored uncompressed from block next_block on: full blocks there, the
 *     tail inline after the inode when it fits in its block, else in one more block;
 *     writer.py's _DataArea.place_plain, in C, but for the copying: `copies` lists each
 *     copy to make, in order, as (index, offset in the image, length from the data's
 *     start). Stops, as decide_versions does, at an inode that is not the common case.
 *     inode_fields: the inode class's slots node, size, head_size, datalayout, inline_len,
 *     i_u; node_fields: Node's type; layouts: the plain and inline datalayout values.
 *
 * scatter(dest, places, pieces) -> None
 *     Copies each of `pieces` (bytes) into the writable buffer `dest` at the offset
 *     places[i]: the inline tails of files, symlinks and directories, each right after
 *     its inode in the meta area.
 *
 * collect(root, fields, defaults, dir_type, name_len_max, bad_name) -> (inodes, directories)
 *     The inodes of a tree in inode order: `root` (an inode of the writer's _Inode class
 *     for the root node), then each directory's children together, then its
 *     subdirectories in name order, depth first; one inode per distinct node (a node met
 *     again is a hardlink: one more link). `fields` are the class's slot descriptors,
 *     node, name, up, ino, nlink, names, targets first; a new inode gets the slots from
 *     names on from `defaults`. A directory gets its sorted entry names with "." and ".."
 *     and the place of the inode each names; link counts are counted: names for a file,
 *     ".", ".." and each subdirectory's ".." for a directory. A name erofs cannot store
 *     (empty, over name_len_max bytes, '/' or NUL) is handed to bad_name(name,
 *     directory), which raises the writer's error. Nodes are read through their `type`
 *     and `children` attributes; a directory is a node whose type is `dir_type`.
 *
 * pack_inodes(meta, inodes, nids, base, start, shapes) -> int
 *     Packs inodes start, start+1, ... (writer.py's _Inode, at nid * 32 - base in the
 *     writable buffer `meta`): the compact or extended inode as format.py's structs pack
 *     it, its xattr ibody at the end of its head. Stops at the first inode it leaves to
 *     the writer's Python (_pack_inode), having written nothing for it, and returns its
 *     place (len(inodes) when none is left): a compressed file (its indexes), an object
 *     of another class, an unset slot, a value that is no exact int or lies past a
 *     field's limit, an inode or ibody outside `meta`. `shapes` (writer._META_SHAPES):
 *     the slot descriptors it reads, by name, the S_IFMT bits of each node type, the
 *     file and symlink types and a symlink's st_mode.
 *
 * gather_tails(inodes, nids, base, start, limit, shapes, places, pieces, read_places,
 *              ranges) -> int
 *     For inodes start, ... with an inline tail (inline_len > 0): where it goes in the
 *     meta area (nid * 32 + head_size - base), appended with what to read to read_places
 *     and ranges ((content, size - inline_len, inline_len)) for a file, or with its bytes
 *     to places and pieces for a symlink. Returns the inode to go on from: one it leaves
 *     to the writer's Python (_gather_tail: a sparse file, anything unusual as above),
 *     the one after the tail that brought `ranges` to `limit`, or len(inodes).
 *
 * survey(inodes, start, shapes, counts, file_types, with_xattrs) -> int
 *     For inodes start, ...: counts its node's mtime_ns in the dict `counts` (mtime ->
 *     count, as collections.Counter counts: a key already there keeps its object) unless
 *     it is below 0, writes its dirent file type to file_types[i] (a writable buffer of one
 *     byte per inode), and appends i to with_xattrs unless its xattrs are an empty dict.
 *     Returns the inode to go on from: the first it leaves to the writer's Python
 *     (_survey_one), having done nothing for it (an mtime that is no exact int, a type with
 *     no file type, another class, an unset slot), or len(inodes). `shapes`
 *     (writer._SURVEY_SHAPES): the inode class's slot node, Node's type, mtime_ns and
 *     xattrs (by name), and ((type, file type), ...).
 *
 * meta_sizes(inodes, fields) -> (sizes, left)
 *     The bytes each inode takes in the meta area: head_size + inline_len for an
 *     uncompressed one (compressed is None). `left` lists, in order, the places it leaves
 *     to the writer's Python, None in `sizes`: a compressed file (the size of its indexes),
 *     another class, an unset slot, a value that is no exact int or not below 2^62 in size.
 *     fields (writer._META_SIZE_SLOTS): the inode class's slots head_size, inline_len,
 *     compressed (by name).
 *
 * plan_dirents(directories, start, fields, dirent_size, block_size) -> int
 *     For directories start, ...: splits its sorted entry names into blocks as
 *     writer._plan_dirents does (an entry takes dirent_size plus its name's bytes; a block
 *     starts where the next entry would overflow block_size) and sets its block_starts (the
 *     first entry of each block) and size (full blocks, then what the last one uses).
 *     Returns the first directory it leaves to the writer's Python, having set nothing for
 *     it (names not a list of exact bytes, another class, an unset slot, over 2^40 bytes of
 *     entries), or len(directories). fields (writer._PLAN_SLOTS): the inode class's slots
 *     names, block_starts, size (by name).
 *
 * Every index, size and offset is checked before it is used: bad input raises
 * ValueError, IndexError, TypeError or OverflowError, never writes out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX, READONLY: slot descriptors */
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

/* --- decide_versions, place_plain: per-inode slots read and written in place ---------- */

/* Both walk the writer's _Inode objects (and their Node and Content) through the slot
 * descriptors they are given, read and written at the descriptors' offsets: an attribute
 * lookup per slot was most of what these loops cost. Every object is checked to be of
 * exactly the descriptors' class before a slot of it is touched. An inode whose values
 * are not the common case (an int that is no plain int or does not fit 64 bits, a slot
 * unset, a device, an owner out of range, another class) stops the loop: its index is
 * returned for the writer to decide in Python, which raises its errors naming the path;
 * the writer then calls again from the next inode. */

/* The offsets of `n` slots of one class, from their member descriptors; the class in
 * *cls. -1 with an exception set if they are not `n` object slots of one class. */
static int slot_offsets(PyObject *fields, Py_ssize_t n, const char *what, PyTypeObject **cls,
                        Py_ssize_t *offsets) {
    if (PyTuple_GET_SIZE(fields) != n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd slots expected", what, n);
        return -1;
    }
    *cls = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!Py_IS_TYPE(field, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)field)->d_member->type != T_OBJECT_EX ||
            (((PyMemberDescrObject *)field)->d_member->flags & READONLY) ||
            (*cls != NULL && PyDescr_TYPE(field) != *cls)) {
            PyErr_Format(PyExc_TypeError, "%s: fields must be writable slots of one class", what);
            return -1;
        }
        *cls = PyDescr_TYPE(field);
        offsets[i] = ((PyMemberDescrObject *)field)->d_member->offset;
    }
    return 0;
}

/* A slot's value, borrowed; NULL if unset. `obj` is of the slot's class. */
static PyObject *slot_get(PyObject *obj, Py_ssize_t offset) {
    return *(PyObject **)((char *)obj + offset);
}

/* Sets a slot, stealing `value`. The old value's release may run code: the caller holds
 * `obj` and reads nothing borrowed after. */
static void slot_set(PyObject *obj, Py_ssize_t offset, PyObject *value) {
    PyObject **at = (PyObject **)((char *)obj + offset);
    PyObject *old = *at;
    *at = value;
    Py_XDECREF(old);
}

/* 1 and *out if `v` is a plain int that fits 64 bits; 0 (no exception) otherwise. */
static int int64_of(PyObject *v, int64_t *out) {
    if (v == NULL || !PyLong_CheckExact(v))
        return 0;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = (int64_t)x;
    return 1;
}

/* Whether `type` is one of items[from:] of the tuple, by identity. */
static int is_one_of(PyObject *type, PyObject *types, Py_ssize_t from) {
    for (Py_ssize_t k = from; k < PyTuple_GET_SIZE(types); k++)
        if (PyTuple_GET_ITEM(types, k) == type)
            return 1;
    return 0;
}

/* decide_versions's slots: of the inode class, of Node, of Content; its types and limits. */
enum { V_NODE, V_NLINK, V_XATTRS, V_SIZE, V_EXTENDED, V_HEAD, V_FIELDS };
enum { N_TYPE, N_UID, N_GID, N_MTIME, N_CONTENT, N_TARGET, N_FIELDS };
enum { C_SIZE, C_FIELDS };
/* types: these three, then from TYPE_SIZELESS on those of size 0 that need nothing more */
enum { TYPE_FILE, TYPE_DIR, TYPE_SYMLINK, TYPE_SIZELESS };
enum { L_ID_MAX, L_COMPACT_ID_MAX, L_COMPACT_NLINK_MAX, L_COMPACT_SIZE_MAX, L_COMPACT,
       L_EXTENDED, L_COUNT };
#define INODE_SIZE_MAX 4096 /* limits: an inode's own size, before its xattrs */

typedef struct {
    PyTypeObject *inode_cls, *node_cls, *content_cls;
    Py_ssize_t inode[V_FIELDS], node[N_FIELDS], content[C_FIELDS];
    PyObject *types;
    int64_t limits[L_COUNT];
    int64_t build_time;
    int build_time_ok; /* 0: it does not fit 64 bits, every inode goes to the writer */
} versions;

static int check_versions_args(versions *v, PyObject *fields[3], PyObject *limits,
                               PyObject *build_time) {
    if (slot_offsets(fields[0], V_FIELDS, "decide_versions", &v->inode_cls, v->inode) < 0 ||
        slot_offsets(fields[1], N_FIELDS, "decide_versions", &v->node_cls, v->node) < 0 ||
        slot_offsets(fields[2], C_FIELDS, "decide_versions", &v->content_cls, v->content) < 0)
        return -1;
    if (PyTuple_GET_SIZE(v->types) < TYPE_SIZELESS || PyTuple_GET_SIZE(limits) != L_COUNT) {
        PyErr_SetString(PyExc_ValueError, "decide_versions: types or limits short");
        return -1;
    }
    for (Py_ssize_t k = 0; k < L_COUNT; k++)
        if (!int64_of(PyTuple_GET_ITEM(limits, k), &v->limits[k]) || v->limits[k] < 0) {
            PyErr_SetString(PyExc_ValueError, "decide_versions: limits must be ints >= 0");
            return -1;
        }
    if (v->limits[L_COMPACT] > INODE_SIZE_MAX || v->limits[L_EXTENDED] > INODE_SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "decide_versions: inode sizes out of range");
        return -1;
    }
    if (!PyLong_Check(build_time)) {
        PyErr_SetString(PyExc_TypeError, "decide_versions: build_time_ns must be an int");
        return -1;
    }
    v->build_time_ok = int64_of(build_time, &v->build_time);
    return 0;
}

/* One inode decided: size (a directory's stays), extended, head_size. 1 when done, 0 when
 * it is the writer's to decide, -1 on error. */
static int decide_one(const versions *v, PyObject *inode) {
    if (!Py_IS_TYPE(inode, v->inode_cls))
        return 0;
    PyObject *node = slot_get(inode, v->inode[V_NODE]);
    if (node == NULL || !Py_IS_TYPE(node, v->node_cls))
        return 0;
    PyObject *type = slot_get(node, v->node[N_TYPE]);
    PyObject *size_obj = NULL; /* the size to store as it is (a file's, Python's object) */
    int64_t size = 0, uid, gid, nlink, mtime;
    int keep_size = 0; /* a directory's size is planned already */
    if (type == NULL) {
        return 0;
    } else if (type == PyTuple_GET_ITEM(v->types, TYPE_FILE)) {
        PyObject *content = slot_get(node, v->node[N_CONTENT]);
        if (content == NULL || !Py_IS_TYPE(content, v->content_cls))
            return 0;
        size_obj = slot_get(content, v->content[C_SIZE]);
        if (!int64_of(size_obj, &size))
            return 0;
    } else if (type == PyTuple_GET_ITEM(v->types, TYPE_DIR)) {
        keep_size = 1;
        if (!int64_of(slot_get(inode, v->inode[V_SIZE]), &size))
            return 0;
    } else if (type == PyTuple_GET_ITEM(v->types, TYPE_SYMLINK)) {
        PyObject *target = slot_get(node, v->node[N_TARGET]);
        if (target == NULL || !PyBytes_CheckExact(target))
            return 0;
        size = PyBytes_GET_SIZE(target);
    } else if (!is_one_of(type, v->types, TYPE_SIZELESS)) {
        return 0; /* a device: its number is the writer's to place */
    }
    PyObject *xattrs = slot_get(inode, v->inode[V_XATTRS]);
    if (!v->build_time_ok || !int64_of(slot_get(node, v->node[N_UID]), &uid) ||
        !int64_of(slot_get(node, v->node[N_GID]), &gid) ||
        !int64_of(slot_get(inode, v->inode[V_NLINK]), &nlink) ||
        !int64_of(slot_get(node, v->node[N_MTIME]), &mtime) || xattrs == NULL ||
        !PyBytes_CheckExact(xattrs))
        return 0;
    const int64_t *lim = v->limits;
    if (uid < 0 || uid > lim[L_ID_MAX] || gid < 0 || gid > lim[L_ID_MAX])
        return 0; /* the writer's error names the path */
    int extended = uid > lim[L_COMPACT_ID_MAX] || gid > lim[L_COMPACT_ID_MAX] ||
                   nlink > lim[L_COMPACT_NLINK_MAX] || size > lim[L_COMPACT_SIZE_MAX] ||
                   mtime != v->build_time;
    /* xattrs: under PY_SSIZE_T_MAX bytes, the inode's size small: no overflow */
    int64_t head = (extended ? lim[L_EXTENDED] : lim[L_COMPACT]) + PyBytes_GET_SIZE(xattrs);
    PyObject *new_size = keep_size ? NULL
                         : size_obj != NULL ? Py_NewRef(size_obj)
                                            : PyLong_FromLongLong(size);
    PyObject *new_head = PyLong_FromLongLong(head);
    if ((!keep_size && new_size == NULL) || new_head == NULL) {
        Py_XDECREF(new_size);
        Py_XDECREF(new_head);
        return -1;
    }
    Py_INCREF(inode); /* held while old values go */
    if (!keep_size)
        slot_set(inode, v->inode[V_SIZE], new_size);
    slot_set(inode, v->inode[V_EXTENDED], Py_NewRef(extended ? Py_True : Py_False));
    slot_set(inode, v->inode[V_HEAD], new_head);
    Py_DECREF(inode);
    return 1;
}

static PyObject *decide_versions(PyObject *self, PyObject *args) {
    PyObject *inodes, *build_time, *fields[3], *limits;
    Py_ssize_t start;
    versions v;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nOO!O!O!O!O!", &PyList_Type, &inodes, &start, &build_time,
                          &PyTuple_Type, &fields[0], &PyTuple_Type, &fields[1], &PyTuple_Type,
                          &fields[2], &PyTuple_Type, &v.types, &PyTuple_Type, &limits))
        return NULL;
    if (check_versions_args(&v, fields, limits, build_time) < 0)
        return NULL;
    if (start < 0) {
        PyErr_SetString(PyExc_IndexError, "decide_versions: start below 0");
        return NULL;
    }
    Py_ssize_t i = start;
    for (; i < PyList_GET_SIZE(inodes); i++) { /* the size read again: a release runs code */
        int rc = decide_one(&v, PyList_GET_ITEM(inodes, i));
        if (rc < 0)
            return NULL;
        if (rc == 0)
            break;
    }
    return PyLong_FromSsize_t(i);
}

/* place_plain's slots of the inode class. */
enum { P_NODE, P_SIZE, P_HEAD, P_LAYOUT, P_INLINE, P_IU, P_FIELDS };
enum { LAYOUT_PLAIN, LAYOUT_INLINE, LAYOUTS };
#define HEAD_SIZE_MAX (INT64_C(1) << 62) /* beyond it, or below minus it: the writer's */

typedef struct {
    PyTypeObject *inode_cls, *node_cls;
    Py_ssize_t inode[P_FIELDS], node_type;
    PyObject *data_types, *layouts;
    int64_t block_size;
    int64_t next_block; /* always within INT64_MAX / block_size */
    PyObject *copies;   /* (index, offset, length) of each copy, in order */
} plain;

/* One inode placed (if a file or symlink). 1 when done, 0 when it is the writer's to
 * place, -1 on error. */
static int place_one(plain *p, PyObject *inode, Py_ssize_t index) {
    if (!Py_IS_TYPE(inode, p->inode_cls))
        return 0;
    PyObject *node = slot_get(inode, p->inode[P_NODE]);
    if (node == NULL || !Py_IS_TYPE(node, p->node_cls))
        return 0;
    PyObject *type = slot_get(node, p->node_type);
    if (type == NULL)
        return 0;
    if (!is_one_of(type, p->data_types, 0))
        return 1; /* no data */
    int64_t size, head, bs = p->block_size;
    if (!int64_of(slot_get(inode, p->inode[P_SIZE]), &size) || size < 0 ||
        !int64_of(slot_get(inode, p->inode[P_HEAD]), &head) || head > HEAD_SIZE_MAX ||
        head < -HEAD_SIZE_MAX)
        return 0;
    int64_t full = size / bs, tail = size % bs;
    int inline_ = 0 < tail && tail <= bs - head;
    int64_t nblocks = inline_ || !tail ? full : full + 1;
    if (nblocks > INT64_MAX / bs - p->next_block)
        return 0; /* the writer's: past 64-bit offsets */
    int64_t written = nblocks > full ? size : full * bs;
    PyObject *i_u = PyLong_FromLongLong(nblocks ? p->next_block : 0);
    PyObject *inline_len = PyLong_FromLongLong(inline_ ? tail : 0);
    if (i_u == NULL || inline_len == NULL)
        goto fail;
    if (written) {
        PyObject *copy = Py_BuildValue("(nLL)", index, (long long)(p->next_block * bs),
                                       (long long)written);
        if (copy == NULL || PyList_Append(p->copies, copy) < 0) {
            Py_XDECREF(copy);
            goto fail;
        }
        Py_DECREF(copy);
    }
    p->next_block += nblocks;
    PyObject *layout = PyTuple_GET_ITEM(p->layouts, inline_ ? LAYOUT_INLINE : LAYOUT_PLAIN);
    Py_INCREF(inode); /* held while old values go */
    slot_set(inode, p->inode[P_LAYOUT], Py_NewRef(layout));
    slot_set(inode, p->inode[P_INLINE], inline_len);
    slot_set(inode, p->inode[P_IU], i_u);
    Py_DECREF(inode);
    return 1;
fail:
    Py_XDECREF(i_u);
    Py_XDECREF(inline_len);
    return -1;
}

static PyObject *place_plain(PyObject *self, PyObject *args) {
    PyObject *inodes, *next_block, *fields, *node_fields;
    Py_ssize_t start, block_size;
    plain p;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nOnO!O!O!O!", &PyList_Type, &inodes, &start, &next_block,
                          &block_size, &PyTuple_Type, &fields, &PyTuple_Type, &node_fields,
                          &PyTuple_Type, &p.data_types, &PyTuple_Type, &p.layouts))
        return NULL;
    if (slot_offsets(fields, P_FIELDS, "place_plain", &p.inode_cls, p.inode) < 0 ||
        slot_offsets(node_fields, 1, "place_plain", &p.node_cls, &p.node_type) < 0)
        return NULL;
    if (block_size <= 0 || block_size > BLOCK_SIZE_MAX || PyTuple_GET_SIZE(p.layouts) != LAYOUTS ||
        start < 0) {
        PyErr_SetString(PyExc_ValueError, "place_plain: bad block size, layouts or start");
        return NULL;
    }
    if (!PyLong_Check(next_block)) {
        PyErr_SetString(PyExc_TypeError, "place_plain: next_block must be an int");
        return NULL;
    }
    p.block_size = block_size;
    if ((p.copies = PyList_New(0)) == NULL)
        return NULL;
    Py_ssize_t i = start;
    /* a block number past 64-bit offsets: every inode is the writer's */
    if (int64_of(next_block, &p.next_block) && p.next_block >= 0 &&
        p.next_block <= INT64_MAX / p.block_size) {
        for (; i < PyList_GET_SIZE(inodes); i++) { /* the size read again: see decide_versions */
            int rc = place_one(&p, PyList_GET_ITEM(inodes, i), i);
            if (rc < 0) {
                Py_DECREF(p.copies);
                return NULL;
            }
            if (rc == 0)
                break;
        }
        return Py_BuildValue("(nLN)", i, (long long)p.next_block, p.copies);
    }
    return Py_BuildValue("(nON)", i, next_block, p.copies);
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

/* --- collect: the inodes of a tree, in inode order ---------------------------------- */

/* The first slots of `fields` (writer.py's _COLLECT_FIELDS), the ones the walk fills;
 * every slot after them starts at its value in `defaults`. */
enum { F_NODE, F_NAME, F_UP, F_INO, F_NLINK, F_NAMES, F_TARGETS, F_WALKED };

typedef struct {
    PyObject *fields;   /* tuple of the inode class's slot descriptors */
    PyObject *defaults; /* tuple: values of fields[F_NAMES:] */
    PyObject *dir_type; /* NodeType.DIR, compared by identity */
    Py_ssize_t name_len_max;
    PyObject *bad_name;  /* bad_name(name, directory) raises the writer's error */
    PyObject *inodes;    /* list, in inode order */
    PyObject *dirs;      /* list: the directories among them, in the same order */
    PyObject *index_of;  /* dict: id(node) -> its place in inodes (hardlinks) */
    PyObject *numbers;   /* list: numbers[k] is k, made once (see number) */
    Py_ssize_t *nlinks;  /* link count of each inode, written to them at the end */
    Py_ssize_t nlinks_cap;
    Py_ssize_t *stack;   /* pairs (directory's place, its parent's place) still to walk */
    Py_ssize_t stack_len, stack_cap;
} walk;

static PyObject *str_children, *str_type; /* interned attribute names */

static int set_field(const walk *w, PyObject *obj, int field, PyObject *value) {
    PyObject *descr = PyTuple_GET_ITEM(w->fields, field);
    return Py_TYPE(descr)->tp_descr_set(descr, obj, value);
}

/* A slot of a new inode (add_inode's, all unset) set to `value`: stored straight into it, as
 * the member descriptor would (the class and its slots are checked once, by
 * check_collect_args); the descriptor's call per slot was a fifth of the walk. */
static void init_field(const walk *w, PyObject *obj, int field, PyObject *value) {
    PyMemberDef *m = ((PyMemberDescrObject *)PyTuple_GET_ITEM(w->fields, field))->d_member;
    slot_set(obj, m->offset, Py_NewRef(value)); /* no old value: nothing released */
}

/* Grows a C array of Py_ssize_t to hold `need` items. */
static int grow(Py_ssize_t **items, Py_ssize_t *cap, Py_ssize_t need) {
    if (need <= *cap)
        return 0;
    Py_ssize_t cap2 = *cap ? *cap : 64;
    while (cap2 < need) {
        if (cap2 > PY_SSIZE_T_MAX / 2 / (Py_ssize_t)sizeof(Py_ssize_t)) {
            PyErr_NoMemory();
            return -1;
        }
        cap2 *= 2;
    }
    Py_ssize_t *grown = PyMem_Realloc(*items, (size_t)cap2 * sizeof(Py_ssize_t));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = grown;
    *cap = cap2;
    return 0;
}

/* The int k, borrowed from w->numbers. An inode's ino (its place + 1) and the targets
 * naming it (its place) are the same few ints: one object each instead of one per use
 * (100,000 small files: 3.5 MiB less). */
static PyObject *number(walk *w, Py_ssize_t k) {
    while (PyList_GET_SIZE(w->numbers) <= k) {
        PyObject *next = PyLong_FromSsize_t(PyList_GET_SIZE(w->numbers));
        int rc = next == NULL ? -1 : PyList_Append(w->numbers, next);
        Py_XDECREF(next);
        if (rc < 0)
            return NULL;
    }
    return PyList_GET_ITEM(w->numbers, k);
}

/* A new inode for `node`, appended to the inodes; returns a borrowed reference. */
static PyObject *add_inode(walk *w, PyObject *node, PyObject *name, PyObject *up) {
    Py_ssize_t at = PyList_GET_SIZE(w->inodes);
    if (grow(&w->nlinks, &w->nlinks_cap, at + 1) < 0)
        return NULL;
    PyObject *descr = PyTuple_GET_ITEM(w->fields, F_NODE);
    PyTypeObject *cls = PyDescr_TYPE(descr);
    PyObject *inode = cls->tp_alloc(cls, 0);
    if (inode == NULL)
        return NULL;
    PyObject *ino = number(w, at + 1); /* borrowed */
    if (ino != NULL) {
        init_field(w, inode, F_NODE, node);
        init_field(w, inode, F_NAME, name);
        init_field(w, inode, F_UP, up);
        init_field(w, inode, F_INO, ino);
        for (Py_ssize_t f = F_NAMES; f < PyTuple_GET_SIZE(w->fields); f++)
            init_field(w, inode, (int)f, PyTuple_GET_ITEM(w->defaults, f - F_NAMES));
    }
    if (ino == NULL || PyList_Append(w->inodes, inode) < 0) {
        Py_DECREF(inode);
        return NULL;
    }
    Py_DECREF(inode); /* the list holds it */
    w->nlinks[at] = 1;
    return inode;
}

/* Whether erofs can store `name`: 1 to 255 bytes, neither '/' nor NUL. */
static int name_ok(const walk *w, PyObject *name) {
    Py_ssize_t len = PyBytes_GET_SIZE(name);
    const char *s = PyBytes_AS_STRING(name);
    return len > 0 && len <= w->name_len_max && memchr(s, '/', (size_t)len) == NULL &&
           memchr(s, '\0', (size_t)len) == NULL;
}

/* The sorted names of a directory's children, each checked. New reference. */
static PyObject *sorted_names(const walk *w, PyObject *children, PyObject *directory) {
    PyObject *names = PyDict_Keys(children);
    if (names == NULL)
        return NULL;
    /* sorted first: the first bad name in name order is the one named, as in Python */
    if (PyList_Sort(names) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(names); i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        if (!PyBytes_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "collect: names must be bytes");
            goto fail;
        }
        if (!name_ok(w, name)) {
            PyObject *r = PyObject_CallFunctionObjArgs(w->bad_name, name, directory, NULL);
            if (r != NULL) {
                Py_DECREF(r);
                PyErr_SetString(PyExc_ValueError, "collect: bad_name did not raise");
            }
            goto fail;
        }
    }
    return names;
fail:
    Py_DECREF(names);
    return NULL;
}

/* Inserts `name` naming `target` where it sorts among the sorted names, after any equal
 * one (bisect.insort_right): a name may sort before "." (b"-", b"+"). */
static int insert_sorted(PyObject *names, PyObject *targets, const char *name, Py_ssize_t target) {
    PyObject *key = PyBytes_FromString(name), *index = PyLong_FromSsize_t(target);
    int rc = -1;
    if (key == NULL || index == NULL)
        goto done;
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(names);
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        int lt = PyObject_RichCompareBool(key, PyList_GET_ITEM(names, mid), Py_LT);
        if (lt < 0)
            goto done;
        if (lt)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (PyList_Insert(names, lo, key) == 0 && PyList_Insert(targets, lo, index) == 0)
        rc = 0;
done:
    Py_XDECREF(key);
    Py_XDECREF(index);
    return rc;
}

/* References to a child that one name alone accounts for: its directory's children dict,
 * and the one walk_child holds while it places the child. A node with no more than these
 * is named nowhere else, so it can be no hardlink: it gets its inode without an entry in
 * index_of. Every other name would be another dict's reference, and a node already placed
 * is held by its inode, so a hardlink always has more; a reference held for some other
 * reason only sends a node through index_of as well (100,000 small files: 11 MiB less at
 * the writer's peak). */
#define REFS_OF_ONE_NAME 2

/* The place of `child` among the inodes, a new one for it if it has none yet (else it is
 * a hardlink: one more link). Sets *fresh when new. -1 on error. The caller holds a
 * reference to `child` (REFS_OF_ONE_NAME). */
static Py_ssize_t place_of(walk *w, PyObject *child, PyObject *name, PyObject *directory,
                           int *fresh) {
    if (Py_REFCNT(child) <= REFS_OF_ONE_NAME) {
        *fresh = 1;
        return add_inode(w, child, name, directory) == NULL ? -1
                                                            : PyList_GET_SIZE(w->inodes) - 1;
    }
    PyObject *key = PyLong_FromVoidPtr(child);
    if (key == NULL)
        return -1;
    Py_ssize_t at = -1;
    PyObject *known = PyDict_GetItemWithError(w->index_of, key); /* borrowed */
    *fresh = known == NULL;
    if (known != NULL) {
        at = PyLong_AsSsize_t(known);
        if (at >= 0) /* always inside: the dict holds only places of inodes made */
            w->nlinks[at]++;
    } else if (!PyErr_Occurred()) {
        PyObject *value = PyLong_FromSsize_t(PyList_GET_SIZE(w->inodes));
        if (value != NULL && PyDict_SetItem(w->index_of, key, value) == 0 &&
            add_inode(w, child, name, directory) != NULL)
            at = PyList_GET_SIZE(w->inodes) - 1;
        Py_XDECREF(value);
    }
    Py_DECREF(key);
    return at;
}

static PyObject *get_field(const walk *w, PyObject *obj, int field) {
    PyObject *descr = PyTuple_GET_ITEM(w->fields, field);
    return Py_TYPE(descr)->tp_descr_get(descr, obj, (PyObject *)Py_TYPE(obj));
}

/* Pushes (directory, parent) onto the stack of directories still to walk. */
static int push(walk *w, Py_ssize_t directory, Py_ssize_t parent) {
    if (grow(&w->stack, &w->stack_cap, w->stack_len + 2) < 0)
        return -1;
    w->stack[w->stack_len++] = directory;
    w->stack[w->stack_len++] = parent;
    return 0;
}

/* Reverses the pairs pushed since `from`: the first subdirectory is walked first. */
static void reverse_pushed(walk *w, Py_ssize_t from) {
    for (Py_ssize_t lo = from, hi = w->stack_len - 2; lo < hi; lo += 2, hi -= 2) {
        Py_ssize_t d = w->stack[lo], p = w->stack[lo + 1];
        w->stack[lo] = w->stack[hi];
        w->stack[lo + 1] = w->stack[hi + 1];
        w->stack[hi] = d;
        w->stack[hi + 1] = p;
    }
}

/* One child of a directory: its inode (new, or one more link to a known one), its place
 * in `targets`; a new subdirectory is pushed. Counts subdirectories in *child_dirs. */
static int walk_child(walk *w, PyObject *children, PyObject *name, PyObject *directory,
                      Py_ssize_t here, PyObject *targets, Py_ssize_t *child_dirs) {
    PyObject *child = PyDict_GetItemWithError(children, name); /* borrowed */
    if (child == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "collect: a directory changed while walked");
        return -1;
    }
    Py_INCREF(child); /* held while attribute lookups could run code */
    PyObject *type = PyObject_GetAttr(child, str_type);
    int is_dir = type != NULL && type == w->dir_type, fresh = 0;
    Py_XDECREF(type);
    Py_ssize_t at = type == NULL ? -1 : place_of(w, child, name, directory, &fresh);
    Py_DECREF(child);
    if (at < 0)
        return -1;
    *child_dirs += is_dir;
    if (fresh && is_dir &&
        (PyList_Append(w->dirs, PyList_GET_ITEM(w->inodes, at)) < 0 || push(w, at, here) < 0))
        return -1;
    PyObject *index = number(w, at); /* borrowed */
    return index == NULL ? -1 : PyList_Append(targets, index);
}

/* Walks one directory: an inode for each new child, its entries (with "." and "..") and
 * link count; pushes its subdirectories so that the first is walked next. */
static int walk_directory(walk *w, Py_ssize_t here, Py_ssize_t parent) {
    PyObject *directory = PyList_GET_ITEM(w->inodes, here); /* borrowed: the list keeps it */
    PyObject *node = NULL, *children = NULL, *names = NULL, *targets = NULL;
    Py_ssize_t pushed_from = w->stack_len, child_dirs = 0;
    int rc = -1;
    if ((node = get_field(w, directory, F_NODE)) == NULL ||
        (children = PyObject_GetAttr(node, str_children)) == NULL)
        goto done;
    if (!PyDict_Check(children)) {
        PyErr_SetString(PyExc_TypeError, "collect: a directory's children must be a dict");
        goto done;
    }
    if ((names = sorted_names(w, children, directory)) == NULL ||
        (targets = PyList_New(0)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(names); i++)
        if (walk_child(w, children, PyList_GET_ITEM(names, i), directory, here, targets,
                       &child_dirs) < 0)
            goto done;
    reverse_pushed(w, pushed_from);
    if (insert_sorted(names, targets, ".", here) < 0 ||
        insert_sorted(names, targets, "..", parent) < 0 ||
        set_field(w, directory, F_NAMES, names) < 0 ||
        set_field(w, directory, F_TARGETS, targets) < 0)
        goto done;
    w->nlinks[here] += 1 + child_dirs;
    rc = 0;
done:
    Py_XDECREF(node);
    Py_XDECREF(children);
    Py_XDECREF(names);
    Py_XDECREF(targets);
    return rc;
}

/* Writes each inode's link count, counted during the walk. */
static int store_nlinks(const walk *w) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(w->inodes); i++) {
        PyObject *nlink = PyLong_FromSsize_t(w->nlinks[i]);
        int rc = nlink == NULL ? -1 : set_field(w, PyList_GET_ITEM(w->inodes, i), F_NLINK, nlink);
        Py_XDECREF(nlink);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* Checks collect's arguments: descriptors of one class, one default per slot after
 * F_NAMES, the root an instance of that class. */
static int check_collect_args(PyObject *root, PyObject *fields, PyObject *defaults) {
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    if (n < F_WALKED || PyTuple_GET_SIZE(defaults) != n - F_NAMES) {
        PyErr_SetString(PyExc_ValueError, "collect: one default per field from names on");
        return -1;
    }
    PyTypeObject *cls = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        /* init_field stores into these slots directly: each must be a writable object slot
         * of the one class, named once */
        int bad = !Py_IS_TYPE(field, &PyMemberDescr_Type) ||
                  (cls != NULL && PyDescr_TYPE(field) != cls);
        PyMemberDef *m = bad ? NULL : ((PyMemberDescrObject *)field)->d_member;
        bad = bad || m->type != T_OBJECT_EX || (m->flags & READONLY);
        for (Py_ssize_t j = 0; !bad && j < i; j++)
            bad = PyTuple_GET_ITEM(fields, j) == field;
        if (bad) {
            PyErr_SetString(PyExc_TypeError, "collect: fields must be slots of one class");
            return -1;
        }
        cls = PyDescr_TYPE(field);
    }
    if (!Py_IS_TYPE(root, cls)) {
        PyErr_SetString(PyExc_TypeError, "collect: root must be of the fields' class");
        return -1;
    }
    return 0;
}

static PyObject *collect(PyObject *self, PyObject *args) {
    PyObject *root;
    walk w = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!O!OnO", &root, &PyTuple_Type, &w.fields, &PyTuple_Type,
                          &w.defaults, &w.dir_type, &w.name_len_max, &w.bad_name))
        return NULL;
    if (check_collect_args(root, w.fields, w.defaults) < 0)
        return NULL;
    PyObject *result = NULL, *root_node = NULL, *root_key = NULL, *zero = NULL;
    if ((w.inodes = PyList_New(0)) == NULL || (w.dirs = PyList_New(0)) == NULL ||
        (w.index_of = PyDict_New()) == NULL || (w.numbers = PyList_New(0)) == NULL ||
        (root_node = get_field(&w, root, F_NODE)) == NULL ||
        (root_key = PyLong_FromVoidPtr(root_node)) == NULL || (zero = PyLong_FromLong(0)) == NULL ||
        PyDict_SetItem(w.index_of, root_key, zero) < 0 || PyList_Append(w.inodes, root) < 0 ||
        PyList_Append(w.dirs, root) < 0 || grow(&w.nlinks, &w.nlinks_cap, 1) < 0 ||
        push(&w, 0, 0) < 0)
        goto done;
    w.nlinks[0] = 1;
    while (w.stack_len > 0) {
        w.stack_len -= 2;
        if (walk_directory(&w, w.stack[w.stack_len], w.stack[w.stack_len + 1]) < 0)
            goto done;
    }
    if (store_nlinks(&w) == 0)
        result = PyTuple_Pack(2, w.inodes, w.dirs);
done:
    Py_XDECREF(root_node);
    Py_XDECREF(root_key);
    Py_XDECREF(zero);
    Py_XDECREF(w.inodes);
    Py_XDECREF(w.dirs);
    Py_XDECREF(w.index_of);
    Py_XDECREF(w.numbers);
    PyMem_Free(w.nlinks);
    PyMem_Free(w.stack);
    return result;
}

/* --- pack_inodes, gather_tails: the meta area's inodes and inline tails ------------- */

/* The slots they read, as writer.py's _META_SHAPES passes them (checked by name). */
static const char *const INODE_NAMES[] = {"node",       "ino",        "nlink", "extended",
                                          "xattr_ibody", "head_size", "datalayout", "size",
                                          "i_u",        "inline_len", "compressed"};
enum { I_NODE, I_INO, I_NLINK, I_EXTENDED, I_XATTR_IBODY, I_HEAD_SIZE, I_DATALAYOUT, I_SIZE,
       I_I_U, I_INLINE_LEN, I_COMPRESSED, INODE_FIELDS };
static const char *const NODE_NAMES[] = {"type", "mode", "uid", "gid", "mtime_ns", "target",
                                         "content"};
enum { NODE_TYPE, NODE_MODE, NODE_UID, NODE_GID, NODE_MTIME_NS, NODE_TARGET, NODE_CONTENT,
       NODE_FIELDS };
static const char *const CONTENT_NAMES[] = {"extents"};
enum { C_EXTENTS, CONTENT_FIELDS };
/* shapes: (inode fields, node fields, content fields, ((type, S_IFMT bits), ...),
 *          file type, symlink type, a symlink's st_mode) */
enum { S_INODE_FIELDS, S_NODE_FIELDS, S_CONTENT_FIELDS, S_TYPE_BITS, S_FILE, S_SYMLINK,
       S_SYMLINK_MODE, SHAPES };
#define NODE_TYPES_MAX 16

/* struct erofs_inode_compact ("<HHHHI4xIIHH4x") and erofs_inode_extended
 * ("<HHHHQIIIIqII16x"): the offsets of their fields. */
#define COMPACT_SIZE 32
#define EXTENDED_SIZE 64
#define I_FORMAT_AT 0
#define I_XATTR_ICOUNT_AT 2
#define I_MODE_AT 4
#define I_I_U_AT 16 /* i_u and ino: the same place in both */
#define I_INO_AT 20
#define C_NLINK_AT 6
#define C_SIZE_AT 8
#define C_UID_AT 24
#define C_GID_AT 26
#define E_SIZE_AT 8
#define E_UID_AT 24
#define E_GID_AT 28
#define E_MTIME_AT 32
#define E_MTIME_NSEC_AT 40
#define E_NLINK_AT 44
#define XATTR_IBODY_HEADER 12 /* an ibody's header; its entries are 4-byte units after it */
#define DATALAYOUT_MAX 2      /* FLAT_PLAIN, COMPRESSED_FULL, FLAT_INLINE: what writer.py uses */
#define NID_MAX (UINT64_C(1) << 48)
#define BASE_MAX (INT64_C(1) << 62)
#define U16_MAX 0xFFFFLL
#define U32_MAX 0xFFFFFFFFLL
#define NS_PER_S 1000000000LL

typedef struct {
    PyTypeObject *inode, *node, *content;
    PyObject *const *inode_f, *const *node_f, *const *content_f;
    PyObject *types[NODE_TYPES_MAX]; /* each node type and its S_IFMT bits */
    long long type_bits[NODE_TYPES_MAX];
    Py_ssize_t ntypes;
    PyObject *file, *symlink;
    long long symlink_mode;
} meta_shapes;

/* `fields` is a tuple of the n slot descriptors named `names` of one class: *cls. */
static int check_slots(PyObject *fields, const char *const *names, Py_ssize_t n,
                       PyTypeObject **cls, PyObject *const **out) {
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != n)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!Py_IS_TYPE(field, &PyMemberDescr_Type) ||
            PyDescr_TYPE(field) != PyDescr_TYPE(PyTuple_GET_ITEM(fields, 0)) ||
            ((PyMemberDescrObject *)field)->d_member->type != T_OBJECT_EX ||
            strcmp(((PyMemberDescrObject *)field)->d_member->name, names[i]) != 0)
            return -1;
    }
    *cls = PyDescr_TYPE(PyTuple_GET_ITEM(fields, 0));
    *out = &PyTuple_GET_ITEM(fields, 0);
    return 0;
}

/* An exact int within [lo, hi] into *out: 1; anything else (no exception set): 0. */
static int int_in(PyObject *v, long long lo, long long hi, long long *out) {
    int64_t x;
    if (!int64_of(v, &x) || x < lo || x > hi)
        return 0;
    *out = x;
    return 1;
}

/* A table ((node type, value), ...) of at most NODE_TYPES_MAX pairs, each value an exact
 * int in [0, hi], into types, values and *n: 0, or -1 (no exception set) if it is not. */
static int read_type_table(PyObject *pairs, long long hi, PyObject **types, long long *values,
                           Py_ssize_t *n) {
    if (!PyTuple_Check(pairs) || PyTuple_GET_SIZE(pairs) > NODE_TYPES_MAX)
        return -1;
    *n = PyTuple_GET_SIZE(pairs);
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !int_in(PyTuple_GET_ITEM(pair, 1), 0, hi, &values[i]))
            return -1;
        types[i] = PyTuple_GET_ITEM(pair, 0);
    }
    return 0;
}

static int read_meta_shapes(PyObject *t, meta_shapes *s) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != SHAPES ||
        check_slots(PyTuple_GET_ITEM(t, S_INODE_FIELDS), INODE_NAMES, INODE_FIELDS, &s->inode,
                    &s->inode_f) < 0 ||
        check_slots(PyTuple_GET_ITEM(t, S_NODE_FIELDS), NODE_NAMES, NODE_FIELDS, &s->node,
                    &s->node_f) < 0 ||
        check_slots(PyTuple_GET_ITEM(t, S_CONTENT_FIELDS), CONTENT_NAMES, CONTENT_FIELDS,
                    &s->content, &s->content_f) < 0)
        goto bad;
    if (read_type_table(PyTuple_GET_ITEM(t, S_TYPE_BITS), U16_MAX, s->types, s->type_bits,
                        &s->ntypes) < 0)
        goto bad;
    s->file = PyTuple_GET_ITEM(t, S_FILE);
    s->symlink = PyTuple_GET_ITEM(t, S_SYMLINK);
    if (!int_in(PyTuple_GET_ITEM(t, S_SYMLINK_MODE), 0, U16_MAX, &s->symlink_mode))
        goto bad;
    return 0;
bad:
    PyErr_SetString(PyExc_TypeError, "shapes are not writer.py's _META_SHAPES");
    return -1;
}

/* A slot's value, borrowed (the object holds it); NULL if unset. */
static PyObject *slot_of(PyObject *obj, PyObject *field) {
    return *(PyObject **)((char *)obj + ((PyMemberDescrObject *)field)->d_member->offset);
}

/* The slots `names` of `obj` (of class `cls`) into v: 1, or 0 if obj is not of `cls` or a
 * slot is unset. */
static int slots_of(PyObject *obj, PyTypeObject *cls, PyObject *const *fields, const int *which,
                    int n, PyObject **v) {
    if (!Py_IS_TYPE(obj, cls))
        return 0;
    for (int i = 0; i < n; i++)
        if ((v[which[i]] = slot_of(obj, fields[which[i]])) == NULL)
            return 0;
    return 1;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* Node.st_mode as writer._pack_inode takes it: 1, or 0 if it is not the common case. */
static int st_mode(const meta_shapes *s, PyObject *const *nv, long long *mode) {
    PyObject *type = nv[NODE_TYPE];
    if (type == s->symlink) {
        *mode = s->symlink_mode;
        return 1;
    }
    long long permissions;
    for (Py_ssize_t i = 0; i < s->ntypes; i++)
        if (s->types[i] == type) {
            if (!int_in(nv[NODE_MODE], LLONG_MIN, LLONG_MAX, &permissions))
                return 0;
            /* Python's `mode & 0o7777`: the low bits of the two's complement */
            *mode = s->type_bits[i] | (long long)((unsigned long long)permissions & 07777);
            return *mode <= U16_MAX;
        }
    return 0;
}

/* The fields of one inode, each checked to be what struct would pack. */
typedef struct {
    int extended;
    long long offset, xattr_at, icount, datalayout, mode, nlink, size, i_u, ino, uid, gid;
    long long mtime, mtime_nsec;
    PyObject *xattrs;
} packed_inode;

/* Reads and checks one inode for packing at nid*32 - base in a buffer of `len` bytes: 1,
 * or 0 if it is one writer._pack_inode must pack (anything unusual, a compressed file). */
static int read_inode(const meta_shapes *s, PyObject *inode, PyObject *nid_obj, long long base,
                      Py_ssize_t len, packed_inode *p) {
    static const int inode_slots[] = {I_NODE,       I_INO,  I_NLINK, I_EXTENDED,
                                      I_XATTR_IBODY, I_HEAD_SIZE, I_DATALAYOUT, I_SIZE,
                                      I_I_U,        I_COMPRESSED};
    static const int node_slots[] = {NODE_TYPE, NODE_MODE, NODE_UID, NODE_GID, NODE_MTIME_NS};
    PyObject *v[INODE_FIELDS], *nv[NODE_FIELDS];
    long long nid, head_size;
    if (!slots_of(inode, s->inode, s->inode_f, inode_slots, 10, v) ||
        v[I_COMPRESSED] != Py_None ||
        !slots_of(v[I_NODE], s->node, s->node_f, node_slots, 5, nv) ||
        (v[I_EXTENDED] != Py_True && v[I_EXTENDED] != Py_False) ||
        !PyBytes_CheckExact(v[I_XATTR_IBODY]) || !int_in(nid_obj, 0, NID_MAX, &nid) ||
        !int_in(v[I_HEAD_SIZE], 0, NID_MAX, &head_size) ||
        !int_in(v[I_DATALAYOUT], 0, DATALAYOUT_MAX, &p->datalayout) || !st_mode(s, nv, &p->mode))
        return 0;
    p->extended = v[I_EXTENDED] == Py_True;
    long long id_max = p->extended ? U32_MAX : U16_MAX;
    if (!int_in(v[I_NLINK], 0, p->extended ? U32_MAX : U16_MAX, &p->nlink) ||
        !int_in(v[I_SIZE], 0, p->extended ? LLONG_MAX : U32_MAX, &p->size) ||
        !int_in(v[I_I_U], 0, U32_MAX, &p->i_u) || !int_in(v[I_INO], 0, U32_MAX, &p->ino) ||
        !int_in(nv[NODE_UID], 0, id_max, &p->uid) || !int_in(nv[NODE_GID], 0, id_max, &p->gid))
        return 0;
    if (p->extended) {
        long long ns;
        if (!int_in(nv[NODE_MTIME_NS], LLONG_MIN, LLONG_MAX, &ns))
            return 0;
        p->mtime = ns / NS_PER_S; /* floored, as divmod */
        p->mtime_nsec = ns % NS_PER_S;
        if (p->mtime_nsec < 0) {
            p->mtime_nsec += NS_PER_S;
            p->mtime--;
        }
    }
    p->offset = nid * 32 - base; /* no overflow: nid <= 2^48, 0 <= base <= 2^62 */
    if (p->offset < 0 || p->offset > len - (p->extended ? EXTENDED_SIZE : COMPACT_SIZE))
        return 0;
    p->xattrs = v[I_XATTR_IBODY];
    Py_ssize_t xlen = PyBytes_GET_SIZE(p->xattrs);
    p->icount = 0;
    if (xlen) {
        /* fmt.xattr_icount; a body shorter than its header is writer._pack_inode's */
        p->icount = (xlen - XATTR_IBODY_HEADER) / 4 + 1;
        p->xattr_at = head_size - xlen + p->offset;
        if (xlen < XATTR_IBODY_HEADER || p->icount > U16_MAX || p->xattr_at < 0 ||
            p->xattr_at > len - xlen)
            return 0;
    }
    return 1;
}

static void put_inode(unsigned char *meta, const packed_inode *p) {
    unsigned char *at = meta + p->offset;
    memset(at, 0, p->extended ? EXTENDED_SIZE : COMPACT_SIZE);
    put_le16(at + I_FORMAT_AT, (uint16_t)(p->extended | p->datalayout << 1));
    put_le16(at + I_XATTR_ICOUNT_AT, (uint16_t)p->icount);
    put_le16(at + I_MODE_AT, (uint16_t)p->mode);
    put_le32(at + I_I_U_AT, (uint32_t)p->i_u);
    put_le32(at + I_INO_AT, (uint32_t)p->ino);
    if (p->extended) {
        put_le64(at + E_SIZE_AT, (uint64_t)p->size);
        put_le32(at + E_UID_AT, (uint32_t)p->uid);
        put_le32(at + E_GID_AT, (uint32_t)p->gid);
        put_le64(at + E_MTIME_AT, (uint64_t)p->mtime);
        put_le32(at + E_MTIME_NSEC_AT, (uint32_t)p->mtime_nsec);
        put_le32(at + E_NLINK_AT, (uint32_t)p->nlink);
    } else {
        put_le16(at + C_NLINK_AT, (uint16_t)p->nlink);
        put_le32(at + C_SIZE_AT, (uint32_t)p->size);
        put_le16(at + C_UID_AT, (uint16_t)p->uid);
        put_le16(at + C_GID_AT, (uint16_t)p->gid);
    }
    Py_ssize_t xlen = PyBytes_GET_SIZE(p->xattrs);
    if (xlen)
        memcpy(meta + p->xattr_at, PyBytes_AS_STRING(p->xattrs), (size_t)xlen);
}

/* The arguments both take first: inodes, nids (one each), base, start. */
static int check_group(PyObject *inodes, PyObject *nids, long long base, Py_ssize_t start) {
    if (PyList_GET_SIZE(nids) != PyList_GET_SIZE(inodes)) {
        PyErr_SetString(PyExc_ValueError, "one nid per inode");
        return -1;
    }
    if (base < 0 || base > BASE_MAX || start < 0 || start > PyList_GET_SIZE(inodes)) {
        PyErr_SetString(PyExc_ValueError, "base or start out of range");
        return -1;
    }
    return 0;
}

static PyObject *pack_inodes(PyObject *self, PyObject *args) {
    Py_buffer meta;
    PyObject *inodes, *nids, *shapes;
    long long base;
    Py_ssize_t start;
    meta_shapes s;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*O!O!LnO", &meta, &PyList_Type, &inodes, &PyList_Type, &nids,
                          &base, &start, &shapes))
        return NULL;
    if (check_group(inodes, nids, base, start) < 0 || read_meta_shapes(shapes, &s) < 0) {
        PyBuffer_Release(&meta);
        return NULL;
    }
    Py_ssize_t i = start;
    for (; i < PyList_GET_SIZE(inodes); i++) {
        packed_inode p;
        if (!read_inode(&s, PyList_GET_ITEM(inodes, i), PyList_GET_ITEM(nids, i), base, meta.len,
                        &p))
            break;
        put_inode((unsigned char *)meta.buf, &p);
    }
    PyBuffer_Release(&meta);
    return PyLong_FromSsize_t(i);
}

/* Appends a new reference to `list`, giving it up: 0, or -1 with an exception set. */
static int append_new(PyObject *list, PyObject *item) {
    int rc = item == NULL ? -1 : PyList_Append(list, item);
    Py_XDECREF(item);
    return rc;
}

/* The lists gather_tails fills, as writer._write_tails keeps them. */
typedef struct {
    PyObject *places, *pieces, *read_places, *ranges;
} tail_lists;

/* One inode's inline tail gathered: 1; 0 if writer._gather_tail must (a sparse file,
 * anything unusual); -1 with an exception set. */
static int gather_one(const meta_shapes *s, PyObject *inode, PyObject *nid_obj, long long base,
                      const tail_lists *out) {
    static const int inode_slots[] = {I_NODE, I_HEAD_SIZE, I_SIZE, I_INLINE_LEN};
    static const int node_slots[] = {NODE_TYPE, NODE_TARGET, NODE_CONTENT};
    PyObject *v[INODE_FIELDS], *nv[NODE_FIELDS], *cv[CONTENT_FIELDS];
    static const int content_slots[] = {C_EXTENTS};
    long long inline_len, nid, head_size, size;
    if (!slots_of(inode, s->inode, s->inode_f, inode_slots, 4, v) ||
        !int_in(v[I_INLINE_LEN], 0, LLONG_MAX, &inline_len))
        return 0;
    if (inline_len == 0)
        return 1; /* no tail */
    if (!slots_of(v[I_NODE], s->node, s->node_f, node_slots, 3, nv) ||
        !int_in(nid_obj, 0, NID_MAX, &nid) || !int_in(v[I_HEAD_SIZE], 0, NID_MAX, &head_size) ||
        !int_in(v[I_SIZE], 0, LLONG_MAX, &size))
        return 0;
    long long at = nid * 32 + head_size - base, start = size - inline_len;
    if (nv[NODE_TYPE] == s->file) {
        if (!slots_of(nv[NODE_CONTENT], s->content, s->content_f, content_slots, 1, cv) ||
            cv[C_EXTENTS] != Py_None)
            return 0;
        PyObject *start_obj = PyLong_FromLongLong(start);
        PyObject *range = start_obj == NULL ? NULL
                                            : PyTuple_Pack(3, nv[NODE_CONTENT], start_obj,
                                                           v[I_INLINE_LEN]);
        Py_XDECREF(start_obj);
        if (append_new(out->read_places, PyLong_FromLongLong(at)) < 0 ||
            append_new(out->ranges, range) < 0)
            return -1;
    } else if (nv[NODE_TYPE] == s->symlink) {
        PyObject *target = nv[NODE_TARGET];
        if (!PyBytes_CheckExact(target) || start < 0 || start > PyBytes_GET_SIZE(target))
            return 0;
        if (append_new(out->places, PyLong_FromLongLong(at)) < 0 ||
            append_new(out->pieces,
                       PyBytes_FromStringAndSize(PyBytes_AS_STRING(target) + start,
                                                 PyBytes_GET_SIZE(target) - start)) < 0)
            return -1;
    }
    return 1;
}

static PyObject *gather_tails(PyObject *self, PyObject *args) {
    PyObject *inodes, *nids, *shapes;
    long long base;
    Py_ssize_t start, limit;
    tail_lists out;
    meta_shapes s;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!LnnOO!O!O!O!", &PyList_Type, &inodes, &PyList_Type, &nids,
                          &base, &start, &limit, &shapes, &PyList_Type, &out.places,
                          &PyList_Type, &out.pieces, &PyList_Type, &out.read_places,
                          &PyList_Type, &out.ranges))
        return NULL;
    if (check_group(inodes, nids, base, start) < 0 || read_meta_shapes(shapes, &s) < 0)
        return NULL;
    if (limit < 1) {
        PyErr_SetString(PyExc_ValueError, "limit must be at least 1");
        return NULL;
    }
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(inodes); i++) {
        int rc = gather_one(&s, PyList_GET_ITEM(inodes, i), PyList_GET_ITEM(nids, i), base, &out);
        if (rc < 0)
            return NULL;
        if (rc == 0)
            return PyLong_FromSsize_t(i);
        if (PyList_GET_SIZE(out.ranges) >= limit)
            return PyLong_FromSsize_t(i + 1);
    }
    return PyLong_FromSsize_t(PyList_GET_SIZE(inodes));
}

/* --- survey, meta_sizes, plan_dirents: the writer's other passes over every inode ---- */

/* survey's shapes (writer._SURVEY_SHAPES): the inode class's slot node; Node's type,
 * mtime_ns, xattrs (checked by name); each node type with its dirent file type. */
static const char *const SURVEY_INODE_NAMES[] = {"node"};
static const char *const SURVEY_NODE_NAMES[] = {"type", "mtime_ns", "xattrs"};
enum { SV_TYPE, SV_MTIME_NS, SV_XATTRS, SV_NODE_FIELDS };
enum { SV_SHAPE_INODE, SV_SHAPE_NODE, SV_SHAPE_FILE_TYPES, SV_SHAPES };
#define FILE_TYPE_MAX 0xFF /* a dirent's file_type is one byte */

typedef struct {
    PyTypeObject *inode, *node;
    PyObject *const *inode_f, *const *node_f;
    PyObject *types[NODE_TYPES_MAX]; /* each node type and its dirent file type (0..0xFF) */
    long long file_types[NODE_TYPES_MAX];
    Py_ssize_t ntypes;
} survey_shapes;

static int read_survey_shapes(PyObject *t, survey_shapes *s) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != SV_SHAPES ||
        check_slots(PyTuple_GET_ITEM(t, SV_SHAPE_INODE), SURVEY_INODE_NAMES, 1, &s->inode,
                    &s->inode_f) < 0 ||
        check_slots(PyTuple_GET_ITEM(t, SV_SHAPE_NODE), SURVEY_NODE_NAMES, SV_NODE_FIELDS,
                    &s->node, &s->node_f) < 0)
        goto bad;
    if (read_type_table(PyTuple_GET_ITEM(t, SV_SHAPE_FILE_TYPES), FILE_TYPE_MAX, s->types,
                        s->file_types, &s->ntypes) < 0)
        goto bad;
    return 0;
bad:
    PyErr_SetString(PyExc_TypeError, "shapes are not writer.py's _SURVEY_SHAPES");
    return -1;
}

/* The mtimes counted so far: consecutive equal ones (most inodes of a layer share one)
 * are counted in C and added to the dict once, when another comes. */
typedef struct {
    PyObject *counts; /* dict: mtime -> count */
    PyObject *key;    /* the current run's mtime, a reference held; NULL: no run */
    int64_t value;    /* ... its value, when it fits 64 bits (fits) */
    int fits;
    Py_ssize_t count; /* ... and how many inodes have it */
} mtime_runs;

/* Adds the current run to the dict as Counter does (the key first given stays): 0, or -1
 * with an exception set. A key already there (a Python-counted one) may run code. */
static int flush_run(mtime_runs *r) {
    PyObject *key = r->key, *count = NULL, *sum = NULL;
    int rc = -1;
    if (key == NULL)
        return 0;
    r->key = NULL;
    if ((count = PyLong_FromSsize_t(r->count)) == NULL)
        goto done;
    PyObject *had = PyDict_GetItemWithError(r->counts, key); /* borrowed */
    if (had == NULL && PyErr_Occurred())
        goto done;
    if (had == NULL) {
        sum = Py_NewRef(count);
    } else {
        Py_INCREF(had); /* the addition may run code */
        sum = PyNumber_Add(had, count);
        Py_DECREF(had);
    }
    if (sum != NULL)
        rc = PyDict_SetItem(r->counts, key, sum);
done:
    Py_DECREF(key);
    Py_XDECREF(count);
    Py_XDECREF(sum);
    return rc;
}

/* Counts one mtime (an exact int) if it is not before 1970: 0, or -1 with an exception set. */
static int count_mtime(mtime_runs *r, PyObject *mtime) {
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(mtime, &overflow);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (!overflow && value < 0))
        return 0; /* before 1970: no build time (the superblock's is unsigned) */
    if (r->key != NULL) {
        int same = 0;
        if (!overflow && r->fits)
            same = value == r->value;
        else if (overflow && !r->fits) /* both past 64 bits: exact ints, no code runs */
            same = PyObject_RichCompareBool(mtime, r->key, Py_EQ);
        if (same < 0)
            return -1;
        if (same) {
            r->count++;
            return 0;
        }
    }
    Py_INCREF(mtime); /* the flush may run code that lets the node's go */
    if (flush_run(r) < 0) {
        Py_DECREF(mtime);
        return -1;
    }
    r->key = mtime;
    r->value = value;
    r->fits = !overflow;
    r->count = 1;
    return 0;
}

/* One inode surveyed: its file type, its place in with_xattrs if its xattrs are anything
 * but an empty dict, its mtime counted. 1; 0 if it is the writer's (_survey_one), nothing
 * done for it; -1 with an exception set. */
static int survey_one(const survey_shapes *s, PyObject *inode, Py_ssize_t i,
                      unsigned char *file_types, PyObject *with_xattrs, mtime_runs *runs) {
    if (!Py_IS_TYPE(inode, s->inode))
        return 0;
    PyObject *node = slot_of(inode, s->inode_f[0]);
    if (node == NULL || !Py_IS_TYPE(node, s->node))
        return 0;
    PyObject *type = slot_of(node, s->node_f[SV_TYPE]);
    PyObject *mtime = slot_of(node, s->node_f[SV_MTIME_NS]);
    PyObject *xattrs = slot_of(node, s->node_f[SV_XATTRS]);
    if (type == NULL || mtime == NULL || xattrs == NULL || !PyLong_CheckExact(mtime))
        return 0; /* a bool, a float, an int subclass: Python compares and counts it */
    Py_ssize_t t = 0;
    while (t < s->ntypes && s->types[t] != type)
        t++;
    if (t == s->ntypes)
        return 0; /* no file type: the writer's lookup raises */
    file_types[i] = (unsigned char)s->file_types[t];
    if ((!PyDict_CheckExact(xattrs) || PyDict_GET_SIZE(xattrs) != 0) &&
        append_new(with_xattrs, PyLong_FromSsize_t(i)) < 0)
        return -1;
    return count_mtime(runs, mtime) < 0 ? -1 : 1;
}

static PyObject *survey(PyObject *self, PyObject *args) {
    PyObject *inodes, *shapes, *counts, *with_xattrs;
    Py_ssize_t start;
    Py_buffer file_types;
    survey_shapes s;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nOO!w*O!", &PyList_Type, &inodes, &start, &shapes,
                          &PyDict_Type, &counts, &file_types, &PyList_Type, &with_xattrs))
        return NULL;
    PyObject *result = NULL;
    mtime_runs runs = {counts, NULL, 0, 0, 0};
    if (read_survey_shapes(shapes, &s) < 0)
        goto done;
    if (file_types.len != PyList_GET_SIZE(inodes) || start < 0 ||
        start > PyList_GET_SIZE(inodes)) {
        PyErr_SetString(PyExc_ValueError, "survey: one file type per inode, start within them");
        goto done;
    }
    Py_ssize_t i = start;
    /* both bounds read again: a flush may run code (a Python-counted key's __eq__) */
    for (; i < PyList_GET_SIZE(inodes) && i < file_types.len; i++) {
        int rc = survey_one(&s, PyList_GET_ITEM(inodes, i), i, (unsigned char *)file_types.buf,
                            with_xattrs, &runs);
        if (rc < 0)
            goto done;
        if (rc == 0)
            break;
    }
    if (flush_run(&runs) == 0)
        result = PyLong_FromSsize_t(i);
done:
    Py_CLEAR(runs.key);
    PyBuffer_Release(&file_types);
    return result;
}

/* meta_sizes's slots of the inode class, by name. */
static const char *const META_SIZE_NAMES[] = {"head_size", "inline_len", "compressed"};
enum { MS_HEAD_SIZE, MS_INLINE_LEN, MS_COMPRESSED, MS_FIELDS };
#define META_PART_MAX (INT64_C(1) << 62) /* head_size, inline_len below it in size: a sum fits */

/* An uncompressed inode's head_size + inline_len into *size: 1; 0 if it is the writer's. */
static int meta_size_of(PyTypeObject *cls, PyObject *const *f, PyObject *inode, int64_t *size) {
    int64_t head, inline_len;
    if (!Py_IS_TYPE(inode, cls))
        return 0;
    PyObject *compressed = slot_of(inode, f[MS_COMPRESSED]);
    if (compressed != Py_None || !int64_of(slot_of(inode, f[MS_HEAD_SIZE]), &head) ||
        !int64_of(slot_of(inode, f[MS_INLINE_LEN]), &inline_len) || head >= META_PART_MAX ||
        head <= -META_PART_MAX || inline_len >= META_PART_MAX || inline_len <= -META_PART_MAX)
        return 0;
    *size = head + inline_len;
    return 1;
}

static PyObject *meta_sizes(PyObject *self, PyObject *args) {
    PyObject *inodes, *fields;
    PyTypeObject *cls;
    PyObject *const *f;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &inodes, &PyTuple_Type, &fields))
        return NULL;
    if (check_slots(fields, META_SIZE_NAMES, MS_FIELDS, &cls, &f) < 0) {
        PyErr_SetString(PyExc_TypeError, "meta_sizes: fields are not writer.py's _META_SIZE_SLOTS");
        return NULL;
    }
    /* no Python code runs below: the list keeps its length */
    Py_ssize_t n = PyList_GET_SIZE(inodes);
    PyObject *sizes = PyList_New(n), *left = PyList_New(0);
    if (sizes == NULL || left == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t size;
        PyObject *item;
        if (meta_size_of(cls, f, PyList_GET_ITEM(inodes, i), &size)) {
            item = PyLong_FromLongLong(size);
        } else {
            item = Py_NewRef(Py_None);
            if (append_new(left, PyLong_FromSsize_t(i)) < 0) {
                Py_DECREF(item);
                goto fail;
            }
        }
        if (item == NULL)
            goto fail;
        PyList_SET_ITEM(sizes, i, item);
    }
    return Py_BuildValue("(NN)", sizes, left);
fail:
    Py_XDECREF(sizes);
    Py_XDECREF(left);
    return NULL;
}

/* plan_dirents's slots of the inode class, by name. */
static const char *const PLAN_NAMES[] = {"names", "block_starts", "size"};
enum { PD_NAMES, PD_BLOCK_STARTS, PD_SIZE, PD_FIELDS };
#define DIR_BYTES_MAX (INT64_C(1) << 40) /* dirents and names: past it, the writer's */

static Py_ssize_t offset_of(PyObject *field) {
    return ((PyMemberDescrObject *)field)->d_member->offset;
}

/* One directory planned: its block_starts and size. 1; 0 if it is the writer's
 * (_plan_dirents), nothing done for it; -1 with an exception set. */
static int plan_one(PyTypeObject *cls, PyObject *const *f, PyObject *directory,
                    int64_t dirent_size, int64_t block_size) {
    if (!Py_IS_TYPE(directory, cls))
        return 0;
    PyObject *names = slot_of(directory, f[PD_NAMES]);
    if (names == NULL || !PyList_CheckExact(names))
        return 0;
    Py_ssize_t n = PyList_GET_SIZE(names);
    int64_t used = 0; /* all entries' bytes, or those of the last block */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *name = PyList_GET_ITEM(names, k);
        if (!PyBytes_CheckExact(name) || PyBytes_GET_SIZE(name) > DIR_BYTES_MAX - dirent_size ||
            used > DIR_BYTES_MAX - dirent_size - PyBytes_GET_SIZE(name))
            return 0; /* a str, a bytes subclass (its own len), a directory past 1 TiB */
        used += dirent_size + PyBytes_GET_SIZE(name);
    }
    PyObject *starts = PyList_New(0), *size = NULL;
    if (starts == NULL || append_new(starts, PyLong_FromLong(0)) < 0)
        goto fail;
    if (used > block_size) { /* most directories fit in one block: no walk */
        used = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            int64_t need = dirent_size + PyBytes_GET_SIZE(PyList_GET_ITEM(names, k));
            if (used + need > block_size) {
                if (append_new(starts, PyLong_FromSsize_t(k)) < 0)
                    goto fail;
                used = 0;
            }
            used += need;
        }
    }
    /* blocks <= n + 1 <= 2^40, block_size <= 2^16: no overflow */
    if ((size = PyLong_FromLongLong((PyList_GET_SIZE(starts) - 1) * block_size + used)) == NULL)
        goto fail;
    Py_INCREF(directory); /* held while old values go */
    slot_set(directory, offset_of(f[PD_BLOCK_STARTS]), starts);
    slot_set(directory, offset_of(f[PD_SIZE]), size);
    Py_DECREF(directory);
    return 1;
fail:
    Py_XDECREF(starts);
    return -1;
}

static PyObject *plan_dirents(PyObject *self, PyObject *args) {
    PyObject *directories, *fields;
    Py_ssize_t start, dirent_size, block_size;
    PyTypeObject *cls;
    PyObject *const *f;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nO!nn", &PyList_Type, &directories, &start, &PyTuple_Type,
                          &fields, &dirent_size, &block_size))
        return NULL;
    if (check_slots(fields, PLAN_NAMES, PD_FIELDS, &cls, &f) < 0) {
        PyErr_SetString(PyExc_TypeError, "plan_dirents: fields are not writer.py's _PLAN_SLOTS");
        return NULL;
    }
    if (block_size <= 0 || block_size > BLOCK_SIZE_MAX || dirent_size <= 0 ||
        dirent_size > block_size || start < 0 || start > PyList_GET_SIZE(directories)) {
        PyErr_SetString(PyExc_ValueError, "plan_dirents: bad dirent size, block size or start");
        return NULL;
    }
    Py_ssize_t i = start;
    for (; i < PyList_GET_SIZE(directories); i++) { /* read again: a release runs code */
        int rc = plan_one(cls, f, PyList_GET_ITEM(directories, i), dirent_size, block_size);
        if (rc < 0)
            return NULL;
        if (rc == 0)
            break;
    }
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"first_fit", first_fit, METH_VARARGS,
     "first_fit(meta_sizes, block_size, slot_size, open_blocks) -> (nids, end)"},
    {"dir_blocks", dir_blocks, METH_VARARGS,
     "dir_blocks(names, targets, block_starts, nids, file_types, block_size) -> bytes"},
    {"decide_versions", decide_versions, METH_VARARGS,
     "decide_versions(inodes, start, build_time_ns, inode_fields, node_fields, content_fields, "
     "types, limits) -> stop"},
    {"place_plain", place_plain, METH_VARARGS,
     "place_plain(inodes, start, next_block, block_size, inode_fields, node_fields, data_types, "
     "layouts) -> (stop, next_block, copies)"},
    {"scatter", scatter, METH_VARARGS, "scatter(dest, places, pieces) -> None"},
    {"collect", collect, METH_VARARGS,
     "collect(root, fields, defaults, dir_type, name_len_max, bad_name) -> (inodes, directories)"},
    {"pack_inodes", pack_inodes, METH_VARARGS,
     "pack_inodes(meta, inodes, nids, base, start, shapes) -> the first inode not packed"},
    {"gather_tails", gather_tails, METH_VARARGS,
     "gather_tails(inodes, nids, base, start, limit, shapes, places, pieces, read_places, "
     "ranges) -> the inode to go on from"},
    {"survey", survey, METH_VARARGS,
     "survey(inodes, start, shapes, counts, file_types, with_xattrs) -> the inode to go on from"},
    {"meta_sizes", meta_sizes, METH_VARARGS, "meta_sizes(inodes, fields) -> (sizes, left)"},
    {"plan_dirents", plan_dirents, METH_VARARGS,
     "plan_dirents(directories, start, fields, dirent_size, block_size) -> the first not planned"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs.writers.erofs._erofsmeta",
    "The erofs writer's per-inode and per-entry loops.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__erofsmeta(void) {
    str_children = PyUnicode_InternFromString("children");
    str_type = PyUnicode_InternFromString("type");
    if (str_children == NULL || str_type == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "DIRENT_SIZE", DIRENT_SIZE) < 0)
        Py_CLEAR(m);
    return m;
}
