/* The fast path of vmimg's layer tar parser (vmimg/image/tarparse.py).
 *
 * scan(buf, pos, base) reads consecutive plain tar headers (ustar, GNU or v7; no GNU long
 * names, no sparse files, no global PAX headers), each alone or after a local PAX header
 * ('x') of the plain kind, from `buf` starting at `pos`, and returns (members, pos): one
 * tuple per member, as Python's tarfile would have read it, and the position of the first
 * header it left alone. It stops, without consuming it, at any header it does not take
 * whole: one that does not fit in `buf`, an all-zero block, a bad checksum, a number field
 * in any but the plain forms (octal between blanks, base-256 that fits), a member the
 * Python parser must refuse or treat specially (meta types, negative sizes, ids past 32
 * bits, times past 64-bit nanoseconds). The Python parser then reads that header itself,
 * so every decision about an odd header is made in one place.
 *
 * A local PAX header is taken with the member after it (both, and the records between,
 * inside `buf`) only when its records are at most 64 KiB in the strict form
 * "LEN KEYWORD=VALUE\n" that tiles them exactly (tarfile's regex loop reads the same
 * records there), none is hdrcharset, GNU.sparse* or SCHILY.xattr.*, and the values that
 * count (the last of each keyword) are ones tarparse.py reads the same way: path and
 * linkpath without NUL bytes, size, uid and gid in plain decimal digits within range, mtime
 * as _pax_time_ns reads it ("-"? digits ("." digits*)?) within 64-bit nanoseconds. Other
 * keywords (atime, uname, comment...) are ignored, as tarfile.py ignores them. The member
 * after it must be one the scanner takes alone; the records then replace its name (path,
 * trailing slashes stripped), link name, size (and so where the next header is), ids and
 * mtime.
 *
 * scan_entries(buf, pos, base, entries, cls, fields, data_end) reads the same members but
 * appends them to `entries` as tarparse.Entry objects (cls, set through its slot
 * descriptors `fields`, as Entry(*member) would make them) and returns (pos, data_end):
 * data_end raised to where the furthest regular file's data among them ends. tarparse
 * uses it; scan's tuples are what tests/tarscan_ref.py checks the reading against.
 *
 * `base` is the absolute offset of buf[0] in the layer: member offsets are absolute.
 * Nothing in a header is trusted: every read is inside the 512-byte block, or the PAX
 * records, which are inside `buf`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX, READONLY: slot descriptors */
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
/* local PAX headers of more data than this go to the Python parser */
#define MAX_PAX_HEADER (64 << 10)
/* PAX numbers and record lengths of more digits than this go to the Python parser */
#define MAX_PAX_DIGITS 18
/* PAX sizes at or past this go to the Python parser */
#define MAX_PAX_SIZE (((int64_t)1 << 60) - 1)

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

/* The header's sum with its checksum field as 8 spaces, bytes taken unsigned or signed (old
 * tars summed signed chars; tarfile accepts either). A signed byte is its unsigned value less
 * 256 where the top bit is set, so one pass counts both: a loop the compiler vectorises (a
 * branch per byte was a third of the scan's time per member). */
static int checksum_ok(const unsigned char *b, int64_t stored) {
    uint32_t u = 0, high = 0;
    for (size_t i = 0; i < BLOCK; i++) {
        u += b[i];
        high += b[i] >> 7;
    }
    for (size_t i = CHKSUM_OFF; i < CHKSUM_OFF + 8; i++) {
        u -= b[i];
        high -= b[i] >> 7;
    }
    u += 8 * ' '; /* a space has no top bit */
    int64_t s = (int64_t)u - 256 * (int64_t)high;
    return stored == (int64_t)u || stored == s;
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

/* The checks every header the scanner takes must pass, as tarfile's frombuf makes them:
 * checksum right, and every number field in the plain forms. 0 and the fields set, or -1. */
struct fields {
    int64_t mode, uid, gid, size, mtime, major, minor;
};

static int header_ok(const unsigned char *b, struct fields *f) {
    int64_t chk;
    if (number(b + CHKSUM_OFF, 8, &chk) || !checksum_ok(b, chk))
        return -1;
    if (number(b + MODE_OFF, ID_LEN, &f->mode) || number(b + UID_OFF, ID_LEN, &f->uid) ||
        number(b + GID_OFF, ID_LEN, &f->gid) || number(b + SIZE_OFF, NUM12_LEN, &f->size) ||
        number(b + MTIME_OFF, NUM12_LEN, &f->mtime) ||
        number(b + DEVMAJOR_OFF, ID_LEN, &f->major) ||
        number(b + DEVMINOR_OFF, ID_LEN, &f->minor))
        return -1;
    return 0;
}

/* What a local PAX header changes in the member after it (only the records that matter). */
struct pax {
    const unsigned char *path, *linkpath; /* NULL: no such record */
    size_t path_len, linkpath_len;
    int has_size, has_uid, has_gid, has_mtime;
    int64_t size, uid, gid, mtime_ns;
};

/* A member as the scanner read it: what a tuple or an Entry is made of. */
struct member {
    unsigned char name_buf[PREFIX_LEN + 1 + NAME_LEN]; /* prefix "/" name, when not PAX's */
    const unsigned char *name, *link;
    size_t name_len, link_len;
    unsigned char type;
    int64_t mode, uid, gid, mtime_ns, size, major, minor;
    int64_t data; /* absolute offset of its data */
    int64_t next; /* absolute offset of the next header */
};

/* Read the member from the header at b (absolute offset hdr) into *m, its fields replaced
 * by `pax` if not NULL: 1, or 0 if the Python parser takes this header. */
static int read_member(const unsigned char *b, int64_t hdr, const struct pax *pax,
                       struct member *m) {
    struct fields f;
    unsigned char type = b[TYPE_OFF];
    if (is_meta(type))
        return 0;
    if (header_ok(b, &f))
        return 0;
    if (f.uid > MAX_ID || f.gid > MAX_ID || f.mtime > MAX_MTIME_S)
        return 0;
    size_t name_len = field_len(b + NAME_OFF, NAME_LEN);
    size_t link_len = field_len(b + LINK_OFF, LINK_LEN);
    size_t prefix_len = field_len(b + PREFIX_OFF, PREFIX_LEN);
    /* v7: a directory is a regular file whose name ends in a slash */
    if (type == 0 && name_len > 0 && b[NAME_OFF + name_len - 1] == '/')
        type = '5';
    if (type == '5')
        while (name_len > 0 && b[NAME_OFF + name_len - 1] == '/')
            name_len--;
    unsigned char *name = m->name_buf;
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
    const unsigned char *name_p = name, *link_p = b + LINK_OFF;
    int64_t mtime_ns = f.mtime * NS_PER_S;
    if (pax) { /* tarfile's _apply_pax_info */
        if (pax->path) { /* a PAX path loses its trailing slashes, whatever the type */
            name_p = pax->path;
            n = pax->path_len;
            while (n > 0 && name_p[n - 1] == '/')
                n--;
        }
        if (pax->linkpath) {
            link_p = pax->linkpath;
            link_len = pax->linkpath_len;
        }
        if (pax->has_size)
            f.size = pax->size;
        if (pax->has_uid)
            f.uid = pax->uid;
        if (pax->has_gid)
            f.gid = pax->gid;
        if (pax->has_mtime)
            mtime_ns = pax->mtime_ns;
    }
    m->name = name_p;
    m->name_len = n;
    m->link = link_p;
    m->link_len = link_len;
    m->type = type;
    m->mode = f.mode;
    m->uid = f.uid;
    m->gid = f.gid;
    m->mtime_ns = mtime_ns;
    m->size = f.size;
    m->major = f.major;
    m->minor = f.minor;
    m->data = hdr + BLOCK;
    m->next = skips_data(type) ? m->data + ((f.size + BLOCK - 1) & ~(int64_t)(BLOCK - 1))
                               : m->data;
    return 1;
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int starts_with(const unsigned char *s, size_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return len >= n && memcmp(s, prefix, n) == 0;
}

static int equals(const unsigned char *s, size_t len, const char *word) {
    return len == strlen(word) && memcmp(s, word, len) == 0;
}

/* A PAX size, uid or gid: plain ASCII digits only, at most `max`; 0 and *out set, or -1
 * (int() reads other forms too, and the Python parser decides about those). */
static int pax_number(const unsigned char *s, size_t len, int64_t max, int64_t *out) {
    int64_t n = 0;
    if (len == 0 || len > MAX_PAX_DIGITS)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (!is_digit(s[i]))
            return -1;
        n = n * 10 + (s[i] - '0'); /* at most 18 digits: no overflow */
    }
    if (n > max)
        return -1;
    *out = n;
    return 0;
}

/* A PAX mtime as tarfile.py's _pax_time_ns reads it: "-"? digits ("." digits*)?, the
 * fraction cut or padded to nanoseconds; -1 for anything else, or for a time that does not
 * fit 64-bit nanoseconds (the Python parser clamps those). */
static int pax_time(const unsigned char *s, size_t len, int64_t *out) {
    size_t i = 0, start;
    int64_t sec = 0, ns = 0;
    int negative = len > 0 && s[0] == '-';
    if (negative)
        i = 1;
    start = i;
    while (i < len && is_digit(s[i])) {
        if (i - start >= MAX_PAX_DIGITS)
            return -1;
        sec = sec * 10 + (s[i] - '0');
        i++;
    }
    if (i == start)
        return -1;
    if (i < len) {
        if (s[i] != '.')
            return -1;
        for (size_t k = 0, j = i + 1; j < len; j++, k++) {
            if (!is_digit(s[j]))
                return -1;
            if (k < 9)
                ns = ns * 10 + (s[j] - '0');
        }
        for (size_t k = len - i - 1; k < 9; k++)
            ns *= 10;
    }
    if (sec > MAX_MTIME_S || sec * NS_PER_S > INT64_MAX - ns)
        return -1;
    *out = negative ? -(sec * NS_PER_S + ns) : sec * NS_PER_S + ns;
    return 0;
}

/* The records of a local PAX header, `data` its `size` bytes and the padding after them
 * (`padded` bytes in all); 0 and *pax set, or -1 for anything the Python parser must read:
 * a record not in the strict form "LEN KEYWORD=VALUE\n" that tiles the data exactly (where
 * tarfile's regex loop reads the same records), records the Python code treats specially
 * (hdrcharset, GNU sparse, xattrs), and values it refuses or reads leniently. */
static int pax_records(const unsigned char *data, size_t size, size_t padded, struct pax *pax) {
    static const char hdrcharset[] = " hdrcharset=";
    const size_t hl = sizeof hdrcharset - 1;
    const unsigned char *size_v = NULL, *uid_v = NULL, *gid_v = NULL, *mtime_v = NULL;
    size_t size_l = 0, uid_l = 0, gid_l = 0, mtime_l = 0;
    memset(pax, 0, sizeof *pax);
    for (size_t i = 0; i + hl <= padded; i++)
        if (data[i] == ' ' && memcmp(data + i, hdrcharset, hl) == 0)
            return -1;
    /* after the last record, the regex must find none in the padding */
    if (size < padded && is_digit(data[size]))
        return -1;
    size_t p = 0;
    while (p < size) {
        size_t d = 0, len = 0;
        while (p + d < size && is_digit(data[p + d])) {
            if (d >= MAX_PAX_DIGITS)
                return -1;
            len = len * 10 + (data[p + d] - '0');
            d++;
        }
        if (d == 0 || len == 0 || len > size - p)
            return -1;
        size_t end = p + len; /* the record is data[p:end] */
        if (p + d >= end || data[p + d] != ' ' || data[end - 1] != '\n')
            return -1;
        const unsigned char *kw = data + p + d + 1;
        const unsigned char *eq = memchr(kw, '=', end - 1 - (p + d + 1));
        if (eq == NULL || eq == kw)
            return -1;
        size_t kw_len = (size_t)(eq - kw);
        const unsigned char *value = eq + 1;
        size_t value_len = (size_t)(data + end - 1 - value);
        if (starts_with(kw, kw_len, "GNU.sparse") || starts_with(kw, kw_len, "SCHILY.xattr."))
            return -1;
        if (equals(kw, kw_len, "path")) {
            pax->path = value;
            pax->path_len = value_len;
        } else if (equals(kw, kw_len, "linkpath")) {
            pax->linkpath = value;
            pax->linkpath_len = value_len;
        } else if (equals(kw, kw_len, "size")) {
            size_v = value;
            size_l = value_len;
        } else if (equals(kw, kw_len, "uid")) {
            uid_v = value;
            uid_l = value_len;
        } else if (equals(kw, kw_len, "gid")) {
            gid_v = value;
            gid_l = value_len;
        } else if (equals(kw, kw_len, "mtime")) {
            mtime_v = value;
            mtime_l = value_len;
        }
        p = end;
    }
    /* the last record of a keyword wins: only its value counts */
    if ((pax->path && memchr(pax->path, 0, pax->path_len)) ||
        (pax->linkpath && memchr(pax->linkpath, 0, pax->linkpath_len)))
        return -1;
    if ((pax->has_size = size_v != NULL) && pax_number(size_v, size_l, MAX_PAX_SIZE, &pax->size))
        return -1;
    if ((pax->has_uid = uid_v != NULL) && pax_number(uid_v, uid_l, MAX_ID, &pax->uid))
        return -1;
    if ((pax->has_gid = gid_v != NULL) && pax_number(gid_v, gid_l, MAX_ID, &pax->gid))
        return -1;
    if ((pax->has_mtime = mtime_v != NULL) && pax_time(mtime_v, mtime_l, &pax->mtime_ns))
        return -1;
    return 0;
}

/* A local PAX header at buf[pos] and the plain member after it, as one member: 1 and *m
 * set, or 0 (the Python parser reads them). Both headers and the records between them must
 * lie inside buf. */
static int read_pax_member(const unsigned char *buf, Py_ssize_t len, Py_ssize_t pos,
                           int64_t base, struct member *m) {
    const unsigned char *b = buf + pos;
    struct fields f;
    struct pax pax;
    if (header_ok(b, &f) || f.size > MAX_PAX_HEADER)
        return 0;
    Py_ssize_t padded = (Py_ssize_t)((f.size + BLOCK - 1) & ~(int64_t)(BLOCK - 1));
    Py_ssize_t hdr = pos + BLOCK + padded; /* the member's own header */
    if (hdr > len - BLOCK)
        return 0;
    if (pax_records(b + BLOCK, (size_t)f.size, (size_t)padded, &pax))
        return 0;
    if (all_zero(buf + hdr))
        return 0;
    return read_member(buf + hdr, base + hdr, &pax, m);
}

/* The member as a tuple (scan's form, the one tests/tarscan_ref.py makes). */
static PyObject *member_tuple(const struct member *m) {
    char type_byte = (char)m->type;
    return Py_BuildValue("(y#y#LLLLLy#LLL)", (const char *)m->name, (Py_ssize_t)m->name_len,
                         &type_byte, (Py_ssize_t)1, (long long)m->mode, (long long)m->uid,
                         (long long)m->gid, (long long)m->mtime_ns, (long long)m->size,
                         (const char *)m->link, (Py_ssize_t)m->link_len, (long long)m->major,
                         (long long)m->minor, (long long)m->data);
}

/* tarparse.Entry's fields, in order; the last two (xattrs, sparse) are not in a tuple */
#define ENTRY_FIELDS 13

/* The member as an instance of `cls` (tarparse.Entry), each slot of `fields` set through its
 * descriptor to what Entry(*member_tuple(m)) stores: the tuple's values, a new empty dict
 * for xattrs (Entry's default factory) and None for sparse. Made without __init__ for the
 * reason _slots.c gives: a layer of small files is a hundred thousand of them. */
static PyObject *member_entry(const struct member *m, PyTypeObject *cls, PyObject *fields) {
    char type_byte = (char)m->type;
    PyObject *values[ENTRY_FIELDS] = {
        PyBytes_FromStringAndSize((const char *)m->name, (Py_ssize_t)m->name_len),
        PyBytes_FromStringAndSize(&type_byte, 1),
        PyLong_FromLongLong(m->mode),
        PyLong_FromLongLong(m->uid),
        PyLong_FromLongLong(m->gid),
        PyLong_FromLongLong(m->mtime_ns),
        PyLong_FromLongLong(m->size),
        PyBytes_FromStringAndSize((const char *)m->link, (Py_ssize_t)m->link_len),
        PyLong_FromLongLong(m->major),
        PyLong_FromLongLong(m->minor),
        PyLong_FromLongLong(m->data),
        PyDict_New(),
        Py_NewRef(Py_None),
    };
    PyObject *obj = NULL;
    for (int i = 0; i < ENTRY_FIELDS; i++)
        if (values[i] == NULL)
            goto done;
    obj = cls->tp_alloc(cls, 0);
    if (obj == NULL)
        goto done;
    /* stored straight into the new object's (unset) slots, as their descriptors would:
     * check_entry_class made sure each is a writable object slot of `cls`, named once */
    for (int i = 0; i < ENTRY_FIELDS; i++) {
        PyMemberDef *m = ((PyMemberDescrObject *)PyTuple_GET_ITEM(fields, i))->d_member;
        *(PyObject **)((char *)obj + m->offset) = Py_NewRef(values[i]);
    }
done:
    for (int i = 0; i < ENTRY_FIELDS; i++)
        Py_XDECREF(values[i]);
    return obj;
}

/* What scan and scan_entries share: the members at buf[*pos:] appended to `out` (as
 * member_entry makes them if `cls` is not NULL, else as tuples), *pos moved past them and
 * *data_end raised to where the data of the furthest regular file among them ends. 0, or
 * -1 with an error set. */
static int scan_into(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *pos, int64_t base,
                     PyObject *out, PyTypeObject *cls, PyObject *fields, int64_t *data_end) {
    struct member m;
    while (*pos <= len - BLOCK) {
        const unsigned char *b = buf + *pos;
        if (all_zero(b))
            break;
        int taken = b[TYPE_OFF] == 'x' ? read_pax_member(buf, len, *pos, base, &m)
                                       : read_member(b, base + *pos, NULL, &m);
        if (!taken)
            break;
        PyObject *o = cls ? member_entry(&m, cls, fields) : member_tuple(&m);
        if (o == NULL)
            return -1;
        int err = PyList_Append(out, o);
        Py_DECREF(o);
        if (err)
            return -1;
        /* tarparse's FILE_TYPES that reach here (GNU sparse never does): their data is
         * checked against the layer's length once it is known */
        if ((m.type == '0' || m.type == 0 || m.type == '7') && m.data + m.size > *data_end)
            *data_end = m.data + m.size;
        *pos = (Py_ssize_t)(m.next - base);
        if (m.next - base > len)
            break;
    }
    return 0;
}

static int check_position(Py_ssize_t pos, long long base) {
    if (pos < 0 || base < 0 || base > MAX_BASE) {
        PyErr_SetString(PyExc_ValueError, "scan: negative position or base");
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    long long base;
    int64_t data_end = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nL", &view, &pos, &base))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL || check_position(pos, base) ||
        scan_into(view.buf, view.len, &pos, (int64_t)base, out, NULL, NULL, &data_end)) {
        Py_XDECREF(out);
        PyBuffer_Release(&view);
        return NULL;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nn)", out, pos);
}

/* `fields` must be ENTRY_FIELDS slot descriptors of `cls` itself (nothing that runs code). */
static int check_entry_class(PyObject *cls, PyObject *fields) {
    if (!PyType_Check(cls) || !PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != ENTRY_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "scan_entries: cls must be a type, fields a 13-tuple");
        return -1;
    }
    for (Py_ssize_t i = 0; i < ENTRY_FIELDS; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        int bad = !Py_IS_TYPE(field, &PyMemberDescr_Type) ||
                  PyDescr_TYPE(field) != (PyTypeObject *)cls;
        PyMemberDef *m = bad ? NULL : ((PyMemberDescrObject *)field)->d_member;
        bad = bad || m->type != T_OBJECT_EX || (m->flags & READONLY);
        for (Py_ssize_t j = 0; !bad && j < i; j++)
            bad = PyTuple_GET_ITEM(fields, j) == field;
        if (bad) {
            PyErr_SetString(PyExc_TypeError,
                            "scan_entries: fields must be slot descriptors of cls");
            return -1;
        }
    }
    return 0;
}

static PyObject *scan_entries(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    long long base, data_end;
    PyObject *out, *cls, *fields;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nLO!OOL", &view, &pos, &base, &PyList_Type, &out, &cls,
                          &fields, &data_end))
        return NULL;
    int64_t end = (int64_t)data_end;
    if (check_position(pos, base) || check_entry_class(cls, fields) ||
        scan_into(view.buf, view.len, &pos, (int64_t)base, out, (PyTypeObject *)cls, fields,
                  &end)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nL)", pos, (long long)end);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(buf, pos, base) -> (members, pos): the plain tar headers at buf[pos:]."},
    {"scan_entries", scan_entries, METH_VARARGS,
     "scan_entries(buf, pos, base, entries, cls, fields, data_end) -> (pos, data_end): the "
     "plain tar headers at buf[pos:] appended to entries as instances of cls."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.image._tarscan", "Fast path of the layer tar parser.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarscan(void) { return PyModule_Create(&module); }
