/* ContentReader.read_many's per-range work in C (vmimg/rootfs/content.py).
 *
 * read_many reads the tails of many small files, which lie close together in a layer tar,
 * by a few large preads. Per range that took two Python loops: finding how far one pread
 * reaches, and cutting each range's bytes out of what it read (75 ms of writing 100,000
 * small files as erofs). Both are here; the preads and the errors stay in Python.
 *
 * spans(ranges, gap_max, span_max, fields) -> [(i, j, first, end), ...]
 *     `ranges` is a list of (content, start, length); `fields` the slot descriptors
 *     (Content.size, Content.path, Content.offset, Content.extents). In order, each run
 *     ranges[i:j] that one pread of [first, end) in content.path covers: ranges that are
 *     plain (a path, no extents, 0 <= start, 0 <= length, start + length <= size), in the
 *     same file, each starting at most gap_max bytes after the previous one ends (never
 *     before it), the run within span_max bytes (a first range may be longer). A range
 *     that is not plain is a run of its own with first = end = -1: read_many reads it
 *     alone (and refuses it there if it is bad). Values too large for 64 bits count as
 *     not plain.
 *
 * cut(data, ranges, i, j, first, fields) -> [bytes, ...]
 *     For each (content, start, length) of ranges[i:j]: the `length` bytes of `data` from
 *     content.offset + start - first. The caller got i, j and first from spans and `data`
 *     from the pread; a range outside `data` is a ValueError, never a read out of bounds.
 *
 * tests/readplan_ref.py is the same in Python; tests/test_content.py holds them together.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

enum { F_SIZE, F_PATH, F_OFFSET, F_EXTENTS, N_FIELDS };

struct range {
    PyObject *path;   /* borrowed from the content's slot, or NULL when not plain */
    long long at;     /* content.offset + start: where its bytes are in the file */
    long long length;
};

static int check_fields(PyObject *fields, PyTypeObject **type) {
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != N_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "fields must be a tuple of 4 slot descriptors");
        return -1;
    }
    *type = NULL;
    for (Py_ssize_t k = 0; k < N_FIELDS; k++) {
        PyObject *f = PyTuple_GET_ITEM(fields, k);
        if (!Py_IS_TYPE(f, &PyMemberDescr_Type) ||
            (*type != NULL && PyDescr_TYPE(f) != *type)) {
            PyErr_SetString(PyExc_TypeError, "fields must be slot descriptors of one class");
            return -1;
        }
        *type = PyDescr_TYPE(f);
    }
    return 0;
}

/* A new reference to the slot `k` of `obj`, or NULL with an exception set. */
static PyObject *slot(PyObject *obj, PyObject *fields, int k) {
    PyObject *f = PyTuple_GET_ITEM(fields, k);
    return Py_TYPE(f)->tp_descr_get(f, obj, (PyObject *)Py_TYPE(obj));
}

/* 0 and *out set, or 1 when `v` is not an int that fits in 64 bits, or -1 on an error. */
static int as_ll(PyObject *v, long long *out) {
    if (!PyLong_Check(v))
        return 1;
    int overflow = 0;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return overflow ? 1 : 0;
}

/* Decode ranges[i]: r->path NULL when it is not plain. 0, or -1 with an exception set. The
 * path reference is borrowed: the content holds it, and the ranges list the content. */
static int decode(PyObject *item, PyObject *fields, PyTypeObject *type, struct range *r) {
    r->path = NULL;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(item, 0), type)) {
        PyErr_SetString(PyExc_TypeError, "each range must be (content, start, length)");
        return -1;
    }
    PyObject *content = PyTuple_GET_ITEM(item, 0);
    long long start, length, size, offset;
    int bad = as_ll(PyTuple_GET_ITEM(item, 1), &start);
    if (bad == 0)
        bad = as_ll(PyTuple_GET_ITEM(item, 2), &length);
    if (bad < 0)
        return -1;
    if (bad || start < 0 || length < 0)
        return 0;
    PyObject *values[N_FIELDS] = {NULL};
    int result = -1;
    for (int k = 0; k < N_FIELDS; k++)
        if ((values[k] = slot(content, fields, k)) == NULL)
            goto done;
    result = 0;
    if (values[F_PATH] == Py_None || values[F_EXTENTS] != Py_None)
        goto done;
    bad = as_ll(values[F_SIZE], &size);
    if (bad == 0)
        bad = as_ll(values[F_OFFSET], &offset);
    if (bad) {
        result = bad < 0 ? -1 : 0;
        goto done;
    }
    if (size < 0 || start > size - length || offset < 0 || offset > LLONG_MAX - (start + length))
        goto done; /* past the file's end; or an offset no file has */
    r->path = values[F_PATH];
    r->at = offset + start;
    r->length = length;
done:
    for (int k = 0; k < N_FIELDS; k++)
        Py_XDECREF(values[k]);
    return result;
}

static PyObject *run_tuple(Py_ssize_t i, Py_ssize_t j, long long first, long long end) {
    return Py_BuildValue("(nnLL)", i, j, first, end);
}

static PyObject *spans(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *ranges, *fields;
    long long gap_max, span_max;
    if (!PyArg_ParseTuple(args, "O!LLO", &PyList_Type, &ranges, &gap_max, &span_max, &fields))
        return NULL;
    PyTypeObject *type;
    if (check_fields(fields, &type) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t i = 0;
    while (i < PyList_GET_SIZE(ranges)) {
        struct range r;
        if (decode(PyList_GET_ITEM(ranges, i), fields, type, &r) < 0)
            goto fail;
        Py_ssize_t j = i + 1;
        long long first = -1, end = -1;
        if (r.path != NULL) {
            first = r.at;
            end = r.at + r.length;
            while (j < PyList_GET_SIZE(ranges)) {
                struct range n;
                if (decode(PyList_GET_ITEM(ranges, j), fields, type, &n) < 0)
                    goto fail;
                if (n.path == NULL)
                    break;
                if (n.path != r.path) {
                    int same = PyObject_RichCompareBool(n.path, r.path, Py_EQ);
                    if (same < 0)
                        goto fail;
                    if (!same)
                        break;
                }
                if (n.at < end || n.at - end > gap_max || n.at + n.length - first > span_max)
                    break;
                end = n.at + n.length;
                j++;
            }
        }
        PyObject *t = run_tuple(i, j, first, end);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            goto fail;
        }
        Py_DECREF(t);
        i = j;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *cut(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer data;
    PyObject *ranges, *fields;
    Py_ssize_t i, j;
    long long first;
    if (!PyArg_ParseTuple(args, "y*O!nnLO", &data, &PyList_Type, &ranges, &i, &j, &first,
                          &fields))
        return NULL;
    PyObject *out = NULL;
    PyTypeObject *type;
    if (check_fields(fields, &type) < 0)
        goto done;
    if (i < 0 || j < i || j > PyList_GET_SIZE(ranges)) {
        PyErr_SetString(PyExc_ValueError, "cut: i and j must name a run of ranges");
        goto done;
    }
    out = PyList_New(j - i);
    if (out == NULL)
        goto done;
    for (Py_ssize_t k = i; k < j; k++) {
        struct range r;
        if (decode(PyList_GET_ITEM(ranges, k), fields, type, &r) < 0)
            goto fail;
        if (r.path == NULL || r.at < first || r.at - first > data.len - r.length) {
            PyErr_SetString(PyExc_ValueError, "cut: a range outside the bytes read");
            goto fail;
        }
        PyObject *piece =
            PyBytes_FromStringAndSize((const char *)data.buf + (r.at - first), r.length);
        if (piece == NULL)
            goto fail;
        PyList_SET_ITEM(out, k - i, piece);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"spans", spans, METH_VARARGS,
     "spans(ranges, gap_max, span_max, fields) -> [(i, j, first, end)]: the runs of ranges "
     "one pread each covers (first = end = -1: a range to read alone)."},
    {"cut", cut, METH_VARARGS,
     "cut(data, ranges, i, j, first, fields) -> [bytes]: each range of ranges[i:j] cut out "
     "of data, which holds the file's bytes from `first` on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs._readplan",
    "ContentReader.read_many's planning and cutting.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__readplan(void) { return PyModule_Create(&module); }
