/* Building the slotted objects of a tree (vmimg/rootfs/tree.py) without their __init__.
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

static PyMethodDef methods[] = {
    {"new", (PyCFunction)(void (*)(void))new_slotted, METH_FASTCALL,
     "new(cls, fields, *values): an instance of cls with each slot of fields set to its value, "
     "without calling __init__."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs._slots", "Slotted tree objects built without __init__.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__slots(void) { return PyModule_Create(&module); }
