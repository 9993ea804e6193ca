/* The commonest entries of a layer applied in C (vmimg/rootfs/flatten.py).
 *
 * apply_files(entries, parents, times, tar_path, shapes) applies entries from the end of the
 * list `entries` (flatten keeps a layer's entries reversed and pops them) for as long as each
 * is a plain regular file or a plain directory whose parent directory flatten already knows,
 * and pops each one it applied; it stops, leaving that entry on the list, at the first that
 * is anything else, for _Flattener.apply_entry to apply. It returns how many it applied.
 *
 * "Plain" is exactly the case apply_entry's own fast path takes, with the result it gives:
 * an Entry (the exact class) whose name is bytes; whose type is a regular file's ('0', NUL,
 * '7' or 'S') or a directory's ('5'); whose name after its last "/" is not "", "." or "..",
 * does not start with ".wh." and is at most NAME_MAX bytes; whose directory part (all before
 * the last "/", as written) is in `parents`, as (directory Node, path bound) with bound + the
 * name's length at most PATH_MAX; and whose xattrs are an empty dict.
 *
 * A file: the directory holds nothing by that name, or a regular file (replaced; nothing
 * flatten remembers goes through it). The node made is what tree.file_node makes (mode &
 * 0o7777, the mtime shared through `times`, the shared empty xattrs dict), put in the
 * directory as _Flattener._put puts it.
 *
 * A directory: the directory holds nothing by that name, and the node made is what
 * Node(DIR, mode & 0o7777, uid, gid, mtime, the empty xattrs) makes (a new empty children
 * dict, no target, the (0, 0) rdev, no content), put there as _put puts it; or it holds a
 * directory, which keeps its children and takes the entry's attributes as
 * _Flattener._set_attrs sets them. Then, as _Flattener._remember_dir does, `parents` maps
 * the entry's whole name to (that directory, bound + the name's length + 1), for the entries
 * inside it. A directory over anything else goes back to Python (_put forgets `parents` when
 * it replaces a directory or symlink).
 *
 * Everything else goes back to Python, which decides it as before: whiteouts, names that
 * climb or fail a limit (Python raises the error), unknown parents, links, devices, xattrs,
 * a file over anything but a file and a directory over anything but a directory. Nothing is
 * changed for an entry handed back.
 *
 * `shapes` holds the classes and constants the nodes are made of (built once in flatten.py):
 * (Entry, its 13 slot descriptors, Node, its 10, Content, its 5, NodeType.FILE,
 * NodeType.DIR, the empty xattrs dict, the (0, 0) rdev, NAME_MAX, PATH_MAX). Each descriptor
 * is checked to be the named slot of its class, so nothing that runs code is called and no
 * field is mistaken; FILE and DIR must be two objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "structmember.h" /* T_OBJECT_EX: what a __slots__ member descriptor is */

/* the fields used, by position in their class's field order (checked by name) */
static const char *const ENTRY_NAMES[] = {"name",     "type",     "mode",     "uid",   "gid",
                                          "mtime_ns", "size",     "linkname", "devmajor",
                                          "devminor", "offset",   "xattrs",   "sparse"};
enum { E_NAME, E_TYPE, E_MODE, E_UID, E_GID, E_MTIME, E_SIZE, E_LINK, E_MAJOR, E_MINOR,
       E_OFFSET, E_XATTRS, E_SPARSE, ENTRY_FIELDS };
static const char *const NODE_NAMES[] = {"type",     "mode",     "uid",    "gid",  "mtime_ns",
                                         "xattrs",   "children", "target", "rdev", "content"};
enum { N_TYPE, N_MODE, N_UID, N_GID, N_MTIME, N_XATTRS, N_CHILDREN, N_TARGET, N_RDEV,
       N_CONTENT, NODE_FIELDS };
static const char *const CONTENT_NAMES[] = {"size", "path", "offset", "data", "extents"};
enum { C_SIZE, C_PATH, C_OFFSET, C_DATA, C_EXTENTS, CONTENT_FIELDS };
enum { S_ENTRY, S_ENTRY_FIELDS, S_NODE, S_NODE_FIELDS, S_CONTENT, S_CONTENT_FIELDS, S_FILE,
       S_DIR, S_NO_XATTRS, S_NO_RDEV, S_NAME_MAX, S_PATH_MAX, SHAPES };

#define WHITEOUT_PREFIX ".wh."

struct shapes {
    PyTypeObject *entry, *node, *content;
    PyObject *const *entry_fields, *const *node_fields, *const *content_fields;
    PyObject *file, *dir, *no_xattrs, *no_rdev;
    long long name_max, path_max;
};

/* `fields` is a tuple of the n slot descriptors of `cls` named `names`, in that order. */
static int check_fields(PyObject *cls, PyObject *fields, const char *const *names, Py_ssize_t n,
                        PyObject *const **out) {
    if (!PyType_Check(cls) || !PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) != n)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!Py_IS_TYPE(field, &PyMemberDescr_Type) ||
            PyDescr_TYPE(field) != (PyTypeObject *)cls ||
            ((PyMemberDescrObject *)field)->d_member->type != T_OBJECT_EX ||
            (((PyMemberDescrObject *)field)->d_member->flags & READONLY) ||
            strcmp(((PyMemberDescrObject *)field)->d_member->name, names[i]) != 0)
            return -1;
    }
    *out = &PyTuple_GET_ITEM(fields, 0);
    return 0;
}

static int read_shapes(PyObject *t, struct shapes *s) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != SHAPES ||
        check_fields(PyTuple_GET_ITEM(t, S_ENTRY), PyTuple_GET_ITEM(t, S_ENTRY_FIELDS),
                     ENTRY_NAMES, ENTRY_FIELDS, &s->entry_fields) ||
        check_fields(PyTuple_GET_ITEM(t, S_NODE), PyTuple_GET_ITEM(t, S_NODE_FIELDS), NODE_NAMES,
                     NODE_FIELDS, &s->node_fields) ||
        check_fields(PyTuple_GET_ITEM(t, S_CONTENT), PyTuple_GET_ITEM(t, S_CONTENT_FIELDS),
                     CONTENT_NAMES, CONTENT_FIELDS, &s->content_fields) ||
        PyTuple_GET_ITEM(t, S_FILE) == PyTuple_GET_ITEM(t, S_DIR) ||
        !PyDict_CheckExact(PyTuple_GET_ITEM(t, S_NO_XATTRS)) ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(t, S_NAME_MAX)) ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(t, S_PATH_MAX))) {
        PyErr_SetString(PyExc_TypeError, "apply_files: shapes are not flatten.py's");
        return -1;
    }
    s->entry = (PyTypeObject *)PyTuple_GET_ITEM(t, S_ENTRY);
    s->node = (PyTypeObject *)PyTuple_GET_ITEM(t, S_NODE);
    s->content = (PyTypeObject *)PyTuple_GET_ITEM(t, S_CONTENT);
    s->file = PyTuple_GET_ITEM(t, S_FILE);
    s->dir = PyTuple_GET_ITEM(t, S_DIR);
    s->no_xattrs = PyTuple_GET_ITEM(t, S_NO_XATTRS);
    s->no_rdev = PyTuple_GET_ITEM(t, S_NO_RDEV);
    s->name_max = PyLong_AsLongLong(PyTuple_GET_ITEM(t, S_NAME_MAX));
    s->path_max = PyLong_AsLongLong(PyTuple_GET_ITEM(t, S_PATH_MAX));
    return PyErr_Occurred() ? -1 : 0;
}

/* A slot's value, borrowed (slots hold a reference); NULL if it is unset. */
static PyObject *slot(PyObject *obj, PyObject *field) {
    PyMemberDef *m = ((PyMemberDescrObject *)field)->d_member;
    return *(PyObject **)((char *)obj + m->offset);
}

/* The n slots `fields` of `obj` set to `values`, as object.__setattr__ sets them; -1 on an
 * error. */
static int set_slots(PyObject *obj, PyObject *const *fields, PyObject *const *values, int n) {
    for (int i = 0; i < n; i++)
        if (Py_TYPE(fields[i])->tp_descr_set(fields[i], obj, values[i]) < 0)
            return -1;
    return 0;
}

/* An instance of `cls` with its slots set to `values` (as _slots.new makes it). Each value
 * is stored straight into its slot of the new object (all unset), as the descriptor would
 * store it: check_fields made sure they are `cls`'s writable object slots, each named once.
 * The descriptors' calls were a tenth of what a small file cost. */
static PyObject *new_slotted(PyTypeObject *cls, PyObject *const *fields, PyObject *const *values,
                             int n) {
    PyObject *obj = cls->tp_alloc(cls, 0);
    if (obj == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyMemberDef *m = ((PyMemberDescrObject *)fields[i])->d_member;
        *(PyObject **)((char *)obj + m->offset) = Py_XNewRef(values[i]); /* NULL: left unset */
    }
    return obj;
}

/* What apply_one takes an entry's type for: a regular file's, a directory's, or neither. */
enum kind { OTHER, FILE_KIND, DIR_KIND };

static enum kind entry_kind(PyObject *type) {
    if (!PyBytes_CheckExact(type) || PyBytes_GET_SIZE(type) != 1)
        return OTHER;
    char t = PyBytes_AS_STRING(type)[0];
    if (t == '0' || t == 0 || t == '7' || t == 'S')
        return FILE_KIND;
    return t == '5' ? DIR_KIND : OTHER;
}

/* A name flatten's fast path may put in a known directory (not "", ".", "..", a whiteout,
 * nor longer than NAME_MAX). */
static int is_plain_name(const char *name, Py_ssize_t len, long long name_max) {
    if (len == 0 || len > name_max)
        return 0;
    if ((len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.'))
        return 0;
    return !(len >= 4 && memcmp(name, WHITEOUT_PREFIX, 4) == 0);
}

/* The directory part `head` of a name in `parents` (the directory Node and the bound of its
 * path), or 0: not known, or not as flatten.py stores it. The last one found is kept in
 * *cached (a new reference) with its head, since a layer's entries come a directory at a
 * time. apply_files changes `parents` only by remembering a directory entry by its whole
 * name, never its own head (the one cached then): what is cached stays what `parents` holds.
 * -1 on an error. */
struct known {
    PyObject *head; /* new reference, or NULL */
    PyObject *dir;  /* borrowed from the tuple `parents` holds, held by `value` */
    PyObject *value;
    long long bound;
};

static int lookup_parent(PyObject *parents, const char *name, Py_ssize_t head_len,
                         const struct shapes *s, struct known *k) {
    if (k->head != NULL && PyBytes_GET_SIZE(k->head) == head_len &&
        memcmp(PyBytes_AS_STRING(k->head), name, (size_t)head_len) == 0)
        return 1;
    Py_CLEAR(k->head);
    Py_CLEAR(k->value);
    PyObject *head = PyBytes_FromStringAndSize(name, head_len);
    if (head == NULL)
        return -1;
    PyObject *value = PyDict_GetItemWithError(parents, head);
    if (value == NULL) {
        Py_DECREF(head);
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 2 ||
        !Py_IS_TYPE(PyTuple_GET_ITEM(value, 0), s->node) ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(value, 1))) {
        Py_DECREF(head);
        return 0;
    }
    int overflow;
    long long bound = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(value, 1), &overflow);
    if (overflow || bound < 0) {
        Py_DECREF(head);
        return 0;
    }
    k->head = head;
    k->value = Py_NewRef(value);
    k->dir = PyTuple_GET_ITEM(value, 0);
    k->bound = bound;
    return 1;
}

/* The file node for entry `e`, or NULL and an error. */
static PyObject *file_node(PyObject *e, long long mode, PyObject *times, PyObject *tar_path,
                           const struct shapes *s) {
    PyObject *const *ef = s->entry_fields;
    PyObject *mtime = slot(e, ef[E_MTIME]);
    PyObject *size = slot(e, ef[E_SIZE]), *offset = slot(e, ef[E_OFFSET]);
    PyObject *sparse = slot(e, ef[E_SPARSE]);
    PyObject *shared_mtime = PyDict_SetDefault(times, mtime, mtime); /* borrowed */
    if (shared_mtime == NULL)
        return NULL;
    PyObject *content_values[CONTENT_FIELDS] = {size, tar_path, offset, Py_None, sparse};
    PyObject *content = new_slotted(s->content, s->content_fields, content_values,
                                    CONTENT_FIELDS);
    if (content == NULL)
        return NULL;
    PyObject *mode_obj = PyLong_FromLongLong(mode & 07777);
    if (mode_obj == NULL) {
        Py_DECREF(content);
        return NULL;
    }
    PyObject *node_values[NODE_FIELDS] = {
        s->file,    mode_obj, slot(e, ef[E_UID]), slot(e, ef[E_GID]), shared_mtime,
        s->no_xattrs, Py_None, Py_None,          s->no_rdev,         content};
    PyObject *node = new_slotted(s->node, s->node_fields, node_values, NODE_FIELDS);
    Py_DECREF(mode_obj);
    Py_DECREF(content);
    return node;
}

/* The directory node for entry `e` (as Node.__init__ makes it), or NULL and an error. */
static PyObject *dir_node(PyObject *e, PyObject *mode_obj, PyObject *shared_mtime,
                          const struct shapes *s) {
    PyObject *const *ef = s->entry_fields;
    PyObject *children = PyDict_New();
    if (children == NULL)
        return NULL;
    PyObject *node_values[NODE_FIELDS] = {
        s->dir,      mode_obj, slot(e, ef[E_UID]), slot(e, ef[E_GID]), shared_mtime,
        s->no_xattrs, children, Py_None,          s->no_rdev,         Py_None};
    PyObject *node = new_slotted(s->node, s->node_fields, node_values, NODE_FIELDS);
    Py_DECREF(children);
    return node;
}

/* Apply the plain directory entry `e` (named `name`, `leaf` in its parent's `children`) over
 * `old` (borrowed; NULL: nothing there), as apply_entry would: 1 applied, 0 handed back
 * (nothing changed), -1 error. */
static int apply_dir(PyObject *e, PyObject *name, PyObject *leaf, PyObject *children,
                     PyObject *old, long long mode_bits, PyObject *parents, PyObject *times,
                     const struct shapes *s, const struct known *k) {
    PyObject *const *ef = s->entry_fields, *const *nf = s->node_fields;
    if (old != NULL && !(Py_IS_TYPE(old, s->node) && slot(old, nf[N_TYPE]) == s->dir))
        return 0; /* over a file, a symlink...: _put decides what `parents` keeps */
    PyObject *dir = Py_XNewRef(old); /* held: the mtime's hash could run code */
    PyObject *mtime = slot(e, ef[E_MTIME]);
    PyObject *shared_mtime = PyDict_SetDefault(times, mtime, mtime); /* borrowed */
    PyObject *mode_obj = shared_mtime == NULL ? NULL : PyLong_FromLongLong(mode_bits & 07777);
    int err = mode_obj == NULL ? -1 : 0;
    if (err == 0 && dir == NULL) { /* _other_node's new Node, put as _put puts it */
        dir = dir_node(e, mode_obj, shared_mtime, s);
        err = dir == NULL ? -1 : PyDict_SetItem(children, leaf, dir);
    } else if (err == 0) { /* _set_attrs: the same slots, in its order; the children stay */
        PyObject *attrs[] = {mode_obj, slot(e, ef[E_UID]), slot(e, ef[E_GID]), shared_mtime,
                             s->no_xattrs};
        err = set_slots(dir, nf + N_MODE, attrs, N_XATTRS - N_MODE + 1);
    }
    Py_XDECREF(mode_obj);
    if (err == 0) { /* _remember_dir: its entries name it by `name` */
        PyObject *bound = PyLong_FromLongLong(k->bound + PyBytes_GET_SIZE(leaf) + 1);
        PyObject *value = bound == NULL ? NULL : PyTuple_Pack(2, dir, bound);
        err = value == NULL ? -1 : PyDict_SetItem(parents, name, value);
        Py_XDECREF(value);
        Py_XDECREF(bound);
    }
    Py_XDECREF(dir);
    return err ? -1 : 1;
}

/* Apply `e` if it is the plain case: 1 applied, 0 handed back (nothing changed), -1 error. */
static int apply_one(PyObject *e, PyObject *parents, PyObject *times, PyObject *tar_path,
                     const struct shapes *s, struct known *k) {
    PyObject *const *ef = s->entry_fields;
    if (!Py_IS_TYPE(e, s->entry))
        return 0;
    PyObject *name = slot(e, ef[E_NAME]), *type = slot(e, ef[E_TYPE]);
    PyObject *mode = slot(e, ef[E_MODE]), *xattrs = slot(e, ef[E_XATTRS]);
    /* every slot the node is made of is set (Python would raise AttributeError otherwise) */
    for (int i = 0; i < ENTRY_FIELDS; i++)
        if (slot(e, ef[i]) == NULL)
            return 0;
    enum kind kind = entry_kind(type);
    if (!PyBytes_CheckExact(name) || kind == OTHER || !PyLong_CheckExact(mode) ||
        !PyDict_CheckExact(xattrs) || PyDict_GET_SIZE(xattrs) != 0)
        return 0;
    const char *chars = PyBytes_AS_STRING(name);
    Py_ssize_t len = PyBytes_GET_SIZE(name);
    Py_ssize_t slash = len - 1; /* name.rpartition(b"/"): head, and the name after it */
    while (slash >= 0 && chars[slash] != '/')
        slash--;
    Py_ssize_t head_len = slash >= 0 ? slash : 0;
    const char *leaf = chars + slash + 1;
    Py_ssize_t leaf_len = len - slash - 1;
    if (!is_plain_name(leaf, leaf_len, s->name_max))
        return 0;
    int found = lookup_parent(parents, chars, head_len, s, k);
    if (found <= 0)
        return found;
    if (k->bound > s->path_max - leaf_len) /* Python raises the error */
        return 0;
    int overflow;
    long long mode_bits = PyLong_AsLongLongAndOverflow(mode, &overflow);
    if (overflow)
        return 0;
    PyObject *children = slot(k->dir, s->node_fields[N_CHILDREN]);
    if (children == NULL || !PyDict_CheckExact(children))
        return 0;
    PyObject *leaf_obj = PyBytes_FromStringAndSize(leaf, leaf_len);
    if (leaf_obj == NULL)
        return -1;
    PyObject *old = PyDict_GetItemWithError(children, leaf_obj);
    if (old == NULL && PyErr_Occurred()) {
        Py_DECREF(leaf_obj);
        return -1;
    }
    if (kind == DIR_KIND) {
        int r = apply_dir(e, name, leaf_obj, children, old, mode_bits, parents, times, s, k);
        Py_DECREF(leaf_obj);
        return r;
    }
    if (old != NULL && !(Py_IS_TYPE(old, s->node) && slot(old, s->node_fields[N_TYPE]) == s->file)) {
        Py_DECREF(leaf_obj);
        return 0;
    }
    PyObject *node = file_node(e, mode_bits, times, tar_path, s);
    int err = node == NULL ? -1 : PyDict_SetItem(children, leaf_obj, node);
    Py_XDECREF(node);
    Py_DECREF(leaf_obj);
    return err ? -1 : 1;
}

static PyObject *apply_files(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) ||
        !PyDict_CheckExact(args[2]) || !PyUnicode_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "apply_files(entries: list, parents: dict, times: dict, tar_path: str, "
                        "shapes: tuple)");
        return NULL;
    }
    PyObject *entries = args[0], *parents = args[1], *times = args[2], *tar_path = args[3];
    struct shapes s;
    if (read_shapes(args[4], &s))
        return NULL;
    struct known k = {NULL, NULL, NULL, 0};
    Py_ssize_t applied = 0;
    int r = 0;
    for (Py_ssize_t n = PyList_GET_SIZE(entries); n > 0; n = PyList_GET_SIZE(entries)) {
        PyObject *e = Py_NewRef(PyList_GET_ITEM(entries, n - 1));
        r = apply_one(e, parents, times, tar_path, &s, &k);
        Py_DECREF(e);
        if (r <= 0)
            break;
        /* let the entry go now, as flatten's loop does: the tree grows into its memory */
        if (PyList_SetSlice(entries, n - 1, n, NULL) < 0) {
            r = -1;
            break;
        }
        applied++;
    }
    Py_XDECREF(k.head);
    Py_XDECREF(k.value);
    if (r < 0)
        return NULL;
    return PyLong_FromSsize_t(applied);
}

static PyMethodDef methods[] = {
    {"apply_files", (PyCFunction)(void (*)(void))apply_files, METH_FASTCALL,
     "apply_files(entries, parents, times, tar_path, shapes) -> int: the plain regular files "
     "and directories at the end of entries, in known directories, applied and popped."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.rootfs._flatten", "flatten's commonest entries, in C.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__flatten(void) { return PyModule_Create(&module); }
