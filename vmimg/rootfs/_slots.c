/* The slotted objects of a tree (vmimg/rootfs/tree.py): built without their __init__, and
 * summed without a Python loop.
 *
 * new(cls, fields, *values) allocates an instance of `cls` as object.__new__(cls) does and
 * stores each value through the matching member descriptor of `fields` (a tuple of the
 * class's slot descriptors, such as Content.size), as object.__setattr__ would. It is the
 * same object the class's __init__ makes when the caller passes the values __init__ would
 * have stored; it exists because a flattened layer makes a Node and a Content per file,
 * and their Python __init__s are most of the cost of flattening a small file.
 *
 * Only member descriptors of `cls` itself are accepted (slots, nothing that runs code),
 * and there must be exactly one value per descriptor.
 *
 * file_sizes(root, node_fields, content_fields, file_type) -> (total, others) walks every
 * directory below the Node `root` (a node whose `children` is a non-empty dict) and sums the
 * `size` of each regular file (type `file_type`, content not None) that is named once (only
 * its directory's dict refers to it, so it can be no hardlink), is not sparse (extents None)
 * and whose size is a plain int from 0 up: `total`. Every other regular file, one list
 * item per name, is in `others`, for Tree.content_bytes to count each node once in Python.
 * `node_fields` are Node's slots (children, type, content), `content_fields` Content's (size,
 * extents). A directory is walked once per name it has, and a tree gives each one name
 * (flatten refuses hardlinks to directories). Its Python twin is tests/tree_ref.py's
 * content_bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>
#include "structmember.h" /* T_OBJECT_EX: what a __slots__ member descriptor is */

static PyObject *new_slotted(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "new(cls, fields, *values)");
        return NULL;
    }
    PyObject *cls = args[0], *fields = args[1];
    if (!PyType_Check(cls) || !PyTuple_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "new: cls must be a type and fields a tuple");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    if (nargs - 2 != n) {
        PyErr_Format(PyExc_TypeError, "new: %zd fields, %zd values", n, nargs - 2);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!Py_IS_TYPE(field, &PyMemberDescr_Type) || PyDescr_TYPE(field) != type) {
            PyErr_SetString(PyExc_TypeError, "new: fields must be slot descriptors of cls");
            return NULL;
        }
    }
    PyObject *obj = type->tp_alloc(type, 0);
    if (obj == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (Py_TYPE(field)->tp_descr_set(field, obj, args[i + 2]) < 0) {
            Py_DECREF(obj);
            return NULL;
        }
    }
    return obj;
}

/* A slot's value, borrowed (slots hold a reference); NULL if it is unset. */
static PyObject *slot(PyObject *obj, PyObject *field) {
    PyMemberDef *m = ((PyMemberDescrObject *)field)->d_member;
    return *(PyObject **)((char *)obj + m->offset);
}

/* `fields`: a tuple of the member descriptors named `names` (NULL-terminated), in that
 * order, all of one class; that class, or NULL. */
static PyTypeObject *slots_of(PyObject *fields, const char *const *names) {
    Py_ssize_t n = 0;
    while (names[n] != NULL)
        n++;
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != n)
        return NULL;
    PyTypeObject *cls = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!Py_IS_TYPE(field, &PyMemberDescr_Type))
            return NULL;
        PyMemberDef *m = ((PyMemberDescrObject *)field)->d_member;
        if (m->type != T_OBJECT_EX || strcmp(m->name, names[i]) != 0 ||
            (cls != NULL && PyDescr_TYPE(field) != cls))
            return NULL;
        cls = PyDescr_TYPE(field);
    }
    return cls;
}

enum { N_CHILDREN, N_TYPE, N_CONTENT };
enum { C_SIZE, C_EXTENTS };
static const char *const NODE_FIELDS[] = {"children", "type", "content", NULL};
static const char *const CONTENT_FIELDS[] = {"size", "extents", NULL};

/* One child of a directory: pushed onto `dirs` if it is one with children, summed into *total
 * or listed in `others` if it is a regular file. 0, or -1 with an error set. */
static int size_up(PyObject *child, PyObject *const *node_f, PyObject *const *content_f,
                   PyTypeObject *content_cls, PyObject *file_type, PyObject *dirs,
                   PyObject *others, long long *total) {
    PyObject *children = slot(child, node_f[N_CHILDREN]);
    if (children != NULL && children != Py_None && !PyDict_Check(children)) {
        PyErr_SetString(PyExc_TypeError, "file_sizes: a node's children must be a dict");
        return -1;
    }
    if (children != NULL && children != Py_None && PyDict_GET_SIZE(children))
        return PyList_Append(dirs, child);
    PyObject *content = slot(child, node_f[N_CONTENT]);
    if (slot(child, node_f[N_TYPE]) != file_type || content == NULL || content == Py_None)
        return 0;
    if (!Py_IS_TYPE(content, content_cls)) {
        PyErr_SetString(PyExc_TypeError, "file_sizes: a file's content must be a Content");
        return -1;
    }
    PyObject *size = slot(content, content_f[C_SIZE]), *extents = slot(content, content_f[C_EXTENTS]);
    /* one name: the directory's dict holds the only reference (the walk borrows it) */
    if (Py_REFCNT(child) == 1 && extents == Py_None && size != NULL && PyLong_CheckExact(size)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(size, &overflow);
        if (!overflow && n >= 0 && n <= LLONG_MAX - *total) {
            *total += n;
            return 0;
        }
        if (PyErr_Occurred())
            return -1;
    }
    return PyList_Append(others, child);
}

static PyObject *file_sizes(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    PyTypeObject *node_cls = nargs == 4 ? slots_of(args[1], NODE_FIELDS) : NULL;
    PyTypeObject *content_cls = nargs == 4 ? slots_of(args[2], CONTENT_FIELDS) : NULL;
    if (node_cls == NULL || content_cls == NULL || !Py_IS_TYPE(args[0], node_cls)) {
        PyErr_SetString(PyExc_TypeError,
                        "file_sizes(root, node_fields, content_fields, file_type): the root a "
                        "node of the class whose slots node_fields are");
        return NULL;
    }
    PyObject *const *node_f = &PyTuple_GET_ITEM(args[1], 0);
    PyObject *const *content_f = &PyTuple_GET_ITEM(args[2], 0);
    PyObject *file_type = args[3];
    PyObject *dirs = PyList_New(0), *others = PyList_New(0);
    long long total = 0;
    if (dirs == NULL || others == NULL || PyList_Append(dirs, args[0]) < 0)
        goto fail;
    for (Py_ssize_t n = PyList_GET_SIZE(dirs); n > 0; n = PyList_GET_SIZE(dirs)) {
        PyObject *directory = Py_NewRef(PyList_GET_ITEM(dirs, n - 1));
        int rc = PyList_SetSlice(dirs, n - 1, n, NULL);
        PyObject *children = rc < 0 ? NULL : slot(directory, node_f[N_CHILDREN]);
        if (children != NULL && !PyDict_Check(children)) {
            PyErr_SetString(PyExc_TypeError, "file_sizes: a node's children must be a dict");
            children = NULL;
        }
        Py_ssize_t pos = 0;
        PyObject *name, *child;
        /* nothing below runs Python code: the dict cannot change while walked */
        while (children != NULL && PyDict_Next(children, &pos, &name, &child)) {
            if (!Py_IS_TYPE(child, node_cls)) {
                PyErr_SetString(PyExc_TypeError, "file_sizes: a child that is not a node");
                break;
            }
            if (size_up(child, node_f, content_f, content_cls, file_type, dirs, others,
                        &total) < 0)
                break;
        }
        Py_DECREF(directory);
        if (PyErr_Occurred())
            goto fail;
    }
    Py_DECREF(dirs);
    return Py_BuildValue("(LN)", total, others);
fail:
    Py_XDECREF(dirs);
    Py_XDECREF(others);
    return NULL;
}

static PyMethodDef methods[] = {
    {"new", (PyCFunction)(void (*)(void))new_slotted, METH_FASTCALL,
     "new(cls, fields, *values): an instance of cls with each slot of fields set to its value, "
     "without calling __init__."},
    {"file_sizes", (PyCFunction)(void (*)(void))file_sizes, METH_FASTCALL,
     "file_sizes(root, node_fields, content_fields, file_type) -> (total, others): the sizes "
     "of the regular files named once below root, summed, and every other regular file."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs._slots", "Slotted tree objects built without __init__, and summed.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__slots(void) { return PyModule_Create(&module); }
