/* The ext4 writer's per-inode and per-directory loop bodies, in C: packing 100,000 inodes
 * one struct.pack and three checksum calls at a time, or their directory entries one
 * pack_into each, is a good part of the time a small-file image takes.
 *
 * pack_inode(table, offset, fs_seed, ino, mode, uid, gid, size, links, blocks_512, flags,
 *            i_block, sec, extra, file_acl, xattr_ibody) -> None
 *     Writes the 256-byte struct ext4_inode of inode `ino` at table[offset:], with its
 *     metadata_csum checksum (seeded from s_csum_seed `fs_seed`, the inode number and a
 *     zero i_generation). The same bytes as format.py's pack_inode_into writes over
 *     zeros, which is its reference: the fields it names, atime = ctime = mtime = crtime
 *     (`sec`, `extra` as encode_time gives them), i_extra_isize 32, the in-inode xattr
 *     area `xattr_ibody` (at most 96 bytes) after the large inode's fields, zeros
 *     elsewhere. All 256 bytes are written, whatever the table held there.
 *
 * dir_leaf(inos, names, file_types, inode_seed) -> bytes
 *     One directory leaf block (4096 bytes): an ext4_dir_entry_2 for each name, in order
 *     (names[i] naming inode inos[i], of dirent file type file_types[i]), each taking
 *     its 4-byte-aligned size but the last, which reaches the ext4_dir_entry_tail; then
 *     the tail, holding crc32c from `inode_seed` over the block before it. No entries
 *     make one unused entry spanning the block. What writer.py's _pack_leaves made of
 *     one leaf (tests/ext4meta_ref.py keeps it as the reference).
 *
 * Every value, size and offset is checked before it is used: bad input raises
 * ValueError, TypeError or OverflowError, never writes out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../crc32c.h"

/* struct ext4_inode (format.py's INODE): field offsets, as fs/ext4/ext4.h names them. */
#define INODE_SIZE 256
#define I_MODE 0x00
#define I_UID 0x02
#define I_SIZE_LO 0x04
#define I_ATIME 0x08
#define I_CTIME 0x0C
#define I_MTIME 0x10
#define I_GID 0x18
#define I_LINKS_COUNT 0x1A
#define I_BLOCKS_LO 0x1C
#define I_FLAGS 0x20
#define I_BLOCK 0x28
#define N_BLOCKS_BYTES 60
#define I_FILE_ACL_LO 0x68
#define I_SIZE_HIGH 0x6C
#define L_I_BLOCKS_HIGH 0x74
#define L_I_FILE_ACL_HIGH 0x76
#define L_I_UID_HIGH 0x78
#define L_I_GID_HIGH 0x7A
#define L_I_CHECKSUM_LO 0x7C
#define I_EXTRA_ISIZE 0x80
#define I_CHECKSUM_HI 0x82
#define I_CTIME_EXTRA 0x84
#define I_MTIME_EXTRA 0x88
#define I_ATIME_EXTRA 0x8C
#define I_CRTIME 0x90
#define I_CRTIME_EXTRA 0x94
#define GOOD_OLD_INODE_SIZE 128
#define EXTRA_ISIZE 32 /* the fields up to and including i_projid */
#define XATTR_IBODY_OFFSET (GOOD_OLD_INODE_SIZE + EXTRA_ISIZE)
#define XATTR_IBODY_SPACE (INODE_SIZE - XATTR_IBODY_OFFSET)

/* Widths the split fields allow: a 32-bit id is a 16-bit low half plus a 16-bit high
 * half; i_blocks and i_file_acl are 48 bits (32 + 16). */
#define U16_MAX UINT64_C(0xFFFF)
#define U32_MAX UINT64_C(0xFFFFFFFF)
#define U48_MAX UINT64_C(0xFFFFFFFFFFFF)
#define U64_MAX UINT64_MAX

static void put_le16(unsigned char *p, uint64_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put_le32(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* `obj` as an unsigned integer of at most `max`: OverflowError (negative, or past 64
 * bits) or ValueError (past `max`) naming the field, TypeError if it is no int. */
static int get_uint(PyObject *obj, uint64_t max, const char *name, uint64_t *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > max) {
        PyErr_Format(PyExc_ValueError, "%s does not fit its field", name);
        return -1;
    }
    *out = v;
    return 0;
}

/* The integer arguments after (table, offset), in order, with the largest each field
 * holds. */
enum { FS_SEED, INO, MODE, UID, GID, SIZE, LINKS, BLOCKS_512, FLAGS, N_HEAD };
enum { SEC, EXTRA, FILE_ACL, N_TAIL };
static const struct {
    const char *name;
    uint64_t max;
} head_args[N_HEAD] = {
    {"fs_seed", U32_MAX}, {"ino", U32_MAX},     {"mode", U16_MAX},
    {"uid", U32_MAX},     {"gid", U32_MAX},     {"size", U64_MAX},
    {"links", U16_MAX},   {"blocks_512", U48_MAX}, {"flags", U32_MAX},
};
static const struct {
    const char *name;
    uint64_t max;
} tail_args[N_TAIL] = {{"sec", U32_MAX}, {"extra", U32_MAX}, {"file_acl", U48_MAX}};

#define TABLE_ARG 0
#define OFFSET_ARG 1
#define HEAD_ARG 2
#define I_BLOCK_ARG (HEAD_ARG + N_HEAD)
#define TAIL_ARG (I_BLOCK_ARG + 1)
#define XATTR_ARG (TAIL_ARG + N_TAIL)
#define N_ARGS (XATTR_ARG + 1)

/* The inode's bytes, checksum fields zero (as the checksum is computed over them). */
static void fill_inode(unsigned char *p, const uint64_t *h, const uint64_t *t,
                       const unsigned char *i_block, const unsigned char *xattr,
                       size_t xattr_len) {
    memset(p, 0, INODE_SIZE);
    put_le16(p + I_MODE, h[MODE]);
    put_le16(p + I_UID, h[UID] & U16_MAX);
    put_le32(p + I_SIZE_LO, h[SIZE] & U32_MAX);
    put_le32(p + I_ATIME, t[SEC]);
    put_le32(p + I_CTIME, t[SEC]);
    put_le32(p + I_MTIME, t[SEC]);
    put_le16(p + I_GID, h[GID] & U16_MAX);
    put_le16(p + I_LINKS_COUNT, h[LINKS]);
    put_le32(p + I_BLOCKS_LO, h[BLOCKS_512] & U32_MAX);
    put_le32(p + I_FLAGS, h[FLAGS]);
    memcpy(p + I_BLOCK, i_block, N_BLOCKS_BYTES);
    put_le32(p + I_FILE_ACL_LO, t[FILE_ACL] & U32_MAX);
    put_le32(p + I_SIZE_HIGH, h[SIZE] >> 32);
    put_le16(p + L_I_BLOCKS_HIGH, h[BLOCKS_512] >> 32);
    put_le16(p + L_I_FILE_ACL_HIGH, t[FILE_ACL] >> 32);
    put_le16(p + L_I_UID_HIGH, h[UID] >> 16);
    put_le16(p + L_I_GID_HIGH, h[GID] >> 16);
    put_le16(p + I_EXTRA_ISIZE, EXTRA_ISIZE);
    put_le32(p + I_CTIME_EXTRA, t[EXTRA]);
    put_le32(p + I_MTIME_EXTRA, t[EXTRA]);
    put_le32(p + I_ATIME_EXTRA, t[EXTRA]);
    put_le32(p + I_CRTIME, t[SEC]);
    put_le32(p + I_CRTIME_EXTRA, t[EXTRA]);
    memcpy(p + XATTR_IBODY_OFFSET, xattr, xattr_len);
}

/* metadata_csum of an inode: crc32c from s_csum_seed over the inode number and
 * i_generation (the per-inode seed), then over the inode with the checksum fields zero;
 * the low half goes in l_i_checksum_lo, the high half in i_checksum_hi. */
static void seal_inode(unsigned char *p, uint32_t fs_seed, uint32_t ino) {
    unsigned char ino_gen[8] = {0};
    put_le32(ino_gen, ino); /* i_generation: 0 */
    uint32_t crc = crc32c_update(fs_seed, ino_gen, sizeof ino_gen);
    crc = crc32c_update(crc, p, INODE_SIZE);
    put_le16(p + L_I_CHECKSUM_LO, crc & U16_MAX);
    put_le16(p + I_CHECKSUM_HI, crc >> 16);
}

static PyObject *pack_inode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != N_ARGS) {
        PyErr_Format(PyExc_TypeError, "pack_inode takes %d arguments (%zd given)", N_ARGS,
                     nargs);
        return NULL;
    }
    uint64_t head[N_HEAD], tail[N_TAIL];
    for (int i = 0; i < N_HEAD; i++)
        if (get_uint(args[HEAD_ARG + i], head_args[i].max, head_args[i].name, &head[i]) < 0)
            return NULL;
    for (int i = 0; i < N_TAIL; i++)
        if (get_uint(args[TAIL_ARG + i], tail_args[i].max, tail_args[i].name, &tail[i]) < 0)
            return NULL;
    Py_ssize_t offset = PyNumber_AsSsize_t(args[OFFSET_ARG], PyExc_OverflowError);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    PyObject *i_block = args[I_BLOCK_ARG], *xattr = args[XATTR_ARG];
    if (!PyBytes_Check(i_block) || PyBytes_GET_SIZE(i_block) != N_BLOCKS_BYTES) {
        PyErr_SetString(PyExc_ValueError, "pack_inode: i_block must be 60 bytes");
        return NULL;
    }
    if (!PyBytes_Check(xattr) || PyBytes_GET_SIZE(xattr) > XATTR_IBODY_SPACE) {
        PyErr_SetString(PyExc_ValueError, "pack_inode: xattr_ibody must be at most 96 bytes");
        return NULL;
    }
    Py_buffer table;
    if (PyObject_GetBuffer(args[TABLE_ARG], &table, PyBUF_WRITABLE) < 0)
        return NULL;
    if (offset < 0 || offset > table.len - INODE_SIZE) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "pack_inode: offset outside the table");
        return NULL;
    }
    unsigned char *p = (unsigned char *)table.buf + offset;
    fill_inode(p, head, tail, (const unsigned char *)PyBytes_AS_STRING(i_block),
               (const unsigned char *)PyBytes_AS_STRING(xattr), (size_t)PyBytes_GET_SIZE(xattr));
    seal_inode(p, (uint32_t)head[FS_SEED], (uint32_t)head[INO]);
    PyBuffer_Release(&table);
    Py_RETURN_NONE;
}

/* ext4_dir_entry_2 and ext4_dir_entry_tail (format.py's DIRENT, DIR_TAIL_SIZE). */
#define BLOCK_SIZE 4096
#define DIRENT_HEADER 8
#define DIRENT_INODE 0
#define DIRENT_REC_LEN 4
#define DIRENT_NAME_LEN 6
#define DIRENT_FILE_TYPE 7
#define NAME_MAX 255
#define DIR_TAIL_SIZE 12
#define DIR_TAIL_FT 0xDE
#define LEAF_SPACE (BLOCK_SIZE - DIR_TAIL_SIZE) /* where the tail starts */

static size_t dirent_size(size_t name_len) { return (DIRENT_HEADER + name_len + 3) & ~(size_t)3; }

static void put_dirent(unsigned char *p, uint64_t ino, size_t rec_len, size_t name_len,
                       unsigned file_type) {
    put_le32(p + DIRENT_INODE, ino);
    put_le16(p + DIRENT_REC_LEN, rec_len);
    p[DIRENT_NAME_LEN] = (unsigned char)name_len;
    p[DIRENT_FILE_TYPE] = (unsigned char)file_type;
}

/* Checks every entry before anything is written: names of 1..NAME_MAX bytes, inode
 * numbers of 32 bits, all of them fitting before the tail. */
static int check_entries(PyObject *inos, PyObject *names, Py_ssize_t n) {
    size_t used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        uint64_t ino;
        if (!PyBytes_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "dir_leaf: names must be bytes");
            return -1;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(name);
        if (len < 1 || len > NAME_MAX) {
            PyErr_SetString(PyExc_ValueError, "dir_leaf: a name must be 1 to 255 bytes");
            return -1;
        }
        if (get_uint(PyList_GET_ITEM(inos, i), U32_MAX, "an inode number", &ino) < 0)
            return -1;
        used += dirent_size((size_t)len);
        if (used > LEAF_SPACE) {
            PyErr_SetString(PyExc_ValueError, "dir_leaf: entries do not fit in a block");
            return -1;
        }
    }
    return 0;
}

static PyObject *dir_leaf(PyObject *self, PyObject *args) {
    PyObject *inos, *names, *seed_obj;
    Py_buffer types;
    uint64_t seed;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!y*O", &PyList_Type, &inos, &PyList_Type, &names, &types,
                          &seed_obj))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(names);
    PyObject *out = NULL;
    if (get_uint(seed_obj, U32_MAX, "inode_seed", &seed) < 0)
        goto done;
    if (PyList_GET_SIZE(inos) != n || types.len != n) {
        PyErr_SetString(PyExc_ValueError, "dir_leaf: inos, names and file_types differ in length");
        goto done;
    }
    if (check_entries(inos, names, n) < 0)
        goto done;
    out = PyBytes_FromStringAndSize(NULL, BLOCK_SIZE);
    if (out == NULL)
        goto done;
    unsigned char *block = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *file_types = types.buf;
    memset(block, 0, BLOCK_SIZE);
    size_t pos = 0;
    if (n == 0) /* an empty leaf: one unused entry spanning it */
        put_dirent(block, 0, LEAF_SPACE, 0, 0);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        size_t len = (size_t)PyBytes_GET_SIZE(name);
        size_t size = i == n - 1 ? LEAF_SPACE - pos : dirent_size(len);
        /* checked above: a 32-bit int */
        uint64_t ino = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(inos, i));
        put_dirent(block + pos, ino, size, len, file_types[i]);
        memcpy(block + pos + DIRENT_HEADER, PyBytes_AS_STRING(name), len);
        pos += size;
    }
    put_dirent(block + LEAF_SPACE, 0, DIR_TAIL_SIZE, 0, DIR_TAIL_FT);
    put_le32(block + LEAF_SPACE + DIRENT_HEADER, crc32c_update((uint32_t)seed, block, LEAF_SPACE));
done:
    PyBuffer_Release(&types);
    return out;
}

static PyMethodDef methods[] = {
    {"dir_leaf", dir_leaf, METH_VARARGS,
     "dir_leaf(inos, names, file_types, inode_seed) -> bytes: one checksummed ext4 "
     "directory leaf block."},
    {"pack_inode", (PyCFunction)(void (*)(void))pack_inode, METH_FASTCALL,
     "pack_inode(table, offset, fs_seed, ino, mode, uid, gid, size, links, blocks_512, "
     "flags, i_block, sec, extra, file_acl, xattr_ibody): one checksummed ext4 inode."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs.writers.ext4._ext4meta",
    "The ext4 writer's per-inode and per-directory loop bodies.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ext4meta(void) {
    crc32c_init();
    return PyModule_Create(&module);
}
