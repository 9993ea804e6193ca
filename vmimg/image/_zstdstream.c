/* One zstd frame decompressed with an output limit per call (vmimg/image/layers.py).
 *
 * Decompressor() decodes one frame through libzstd's streaming decoder
 * (ZSTD_decompressStream), with the interface of zlib's (and isal's) decompressobj that
 * layers.decompressed_chunks uses for gzip:
 *
 *   decompress(data, max_length) -> bytes   at most max_length bytes (max_length >= 1) of
 *       the frame's output. Input that could not be taken because the output was full is
 *       left in `unconsumed_tail`, to be given again. A call that returns max_length bytes
 *       may leave output decoded but not yet returned (libzstd decodes a block of up to
 *       128 KiB at a time) even when it took all its input: call again, with b"" if need be.
 *   eof              True once the frame has ended (ZSTD_decompressStream returned 0) and
 *                    all its output has been returned.
 *   unused_data      the input after the end of the frame (given in the call that ended it).
 *   unconsumed_tail  see decompress.
 *
 * A skippable frame (magic 0x184D2A50..0x184D2A5F) is a frame too: it ends with no output.
 * Anything else that does not start with zstd's magic is refused, so that frames of the
 * legacy formats (before zstd 0.8), which libzstd may have been built to read, are not.
 *
 * Why a limit per call: zstd's output per input byte is unbounded in practice (a 4-byte RLE
 * block is 128 KiB of output), and python-zstandard's decompressobj has no limit per call,
 * so vmimg fed it 1 KiB at a time; thousands of tiny calls, each releasing and retaking the
 * GIL, made zstd layers slow. Here one call takes a whole read's worth of input.
 *
 * The window is limited to 2^WINDOW_LOG_MAX bytes (ZSTD_d_windowLogMax): a frame declares
 * its window size, and the decoder allocates that much (plus a block) before it decodes
 * anything, so without a limit a frame of a few bytes could ask for gigabytes. 2^27 =
 * 128 MiB is libzstd's own default limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT), the one zstd(1)
 * applies without --memory and the one python-zstandard's decompressor applied here before:
 * every level up to 22 compresses within it; only --long=28 and more (or an explicit larger
 * window) go past it, and such frames are refused with a clear error. Set explicitly so
 * that a change of libzstd's default cannot change what vmimg accepts.
 *
 * The GIL is released around ZSTD_decompressStream. One object must not be used by two
 * threads at once: a second call while one is running raises RuntimeError (no crash).
 * Errors in the data raise ZstdError (a ValueError) with libzstd's description.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>

#define WINDOW_LOG_MAX 27
/* the first output buffer of a call (grown by doubling up to max_length when libzstd fills
 * it): a chunk of decompressed_chunks, so one allocation there */
#define FIRST_OUT (1 << 20)
#define MAGIC_LEN 4

static PyObject *ZstdError;

typedef struct {
    PyObject_HEAD
    ZSTD_DCtx *dctx;
    PyObject *unused_data;     /* bytes */
    PyObject *unconsumed_tail; /* bytes */
    unsigned char magic[MAGIC_LEN];
    unsigned char magic_len; /* how many of the frame's first bytes have been seen */
    char eof;
    char busy;   /* a call is running with the GIL released */
    char failed; /* libzstd reported an error: the context is unusable */
} Decompressor;

static PyObject *decompressor_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Decompressor() takes no arguments");
        return NULL;
    }
    Decompressor *self = (Decompressor *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->unused_data = PyBytes_FromStringAndSize(NULL, 0);
    self->unconsumed_tail = PyBytes_FromStringAndSize(NULL, 0);
    if (self->unused_data == NULL || self->unconsumed_tail == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->dctx = ZSTD_createDCtx();
    if (self->dctx == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    size_t r = ZSTD_DCtx_setParameter(self->dctx, ZSTD_d_windowLogMax, WINDOW_LOG_MAX);
    if (ZSTD_isError(r)) {
        PyErr_Format(ZstdError, "cannot limit the zstd window: %s", ZSTD_getErrorName(r));
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void decompressor_dealloc(Decompressor *self) {
    ZSTD_freeDCtx(self->dctx); /* accepts NULL */
    Py_XDECREF(self->unused_data);
    Py_XDECREF(self->unconsumed_tail);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether the n (<= 4) bytes m can begin a frame's magic number (little-endian): zstd's, or a
 * skippable frame's. */
static int starts_frame_magic(const unsigned char *m, size_t n) {
    int zstd = 1, skip = 1;
    for (size_t i = 0; i < n; i++) {
        unsigned shift = 8 * (unsigned)i;
        zstd &= m[i] == (unsigned char)(ZSTD_MAGICNUMBER >> shift);
        unsigned char mask = (unsigned char)(ZSTD_MAGIC_SKIPPABLE_MASK >> shift);
        skip &= (m[i] & mask) == (unsigned char)(ZSTD_MAGIC_SKIPPABLE_START >> shift);
    }
    return zstd || skip;
}

static void raise_zstd_error(size_t code) {
    if (ZSTD_getErrorCode(code) == ZSTD_error_frameParameter_windowTooLarge)
        PyErr_Format(ZstdError, "%s (the frame's window is over %d MiB, the most vmimg accepts)",
                     ZSTD_getErrorName(code), 1 << (WINDOW_LOG_MAX - 20));
    else
        PyErr_SetString(ZstdError, ZSTD_getErrorName(code));
}

/* Replace *slot with bytes of src[0:n]; -1 on failure. */
static int set_bytes(PyObject **slot, const char *src, size_t n) {
    PyObject *b = PyBytes_FromStringAndSize(src, (Py_ssize_t)n);
    if (b == NULL)
        return -1;
    Py_SETREF(*slot, b);
    return 0;
}

static PyObject *decompress_into(Decompressor *self, const char *src, size_t size,
                                 size_t max_length) {
    /* The frame's magic number, checked byte by byte before libzstd sees the bytes. */
    if (self->magic_len < MAGIC_LEN && size > 0) {
        size_t missing = (size_t)(MAGIC_LEN - self->magic_len);
        size_t take = missing < size ? missing : size;
        memcpy(self->magic + self->magic_len, src, take);
        self->magic_len += (unsigned char)take;
        if (!starts_frame_magic(self->magic, self->magic_len)) {
            self->failed = 1;
            PyErr_SetString(ZstdError, "not a zstd frame (unknown magic number)");
            return NULL;
        }
    }
    size_t cap = max_length < FIRST_OUT ? max_length : FIRST_OUT;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    if (out == NULL)
        return NULL;
    ZSTD_inBuffer in = {src, size, 0};
    ZSTD_outBuffer ob = {PyBytes_AS_STRING(out), cap, 0};
    size_t ret;
    for (;;) {
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        ret = ZSTD_decompressStream(self->dctx, &ob, &in);
        Py_END_ALLOW_THREADS
        self->busy = 0;
        if (ZSTD_isError(ret)) {
            self->failed = 1;
            raise_zstd_error(ret);
            Py_DECREF(out);
            return NULL;
        }
        /* Done: the frame ended, or everything decoded was returned (so all input was
         * taken), or the output reached max_length. */
        if (ret == 0 || ob.pos < ob.size || ob.size == max_length)
            break;
        size_t grown = ob.size > max_length / 2 ? max_length : ob.size * 2;
        if (_PyBytes_Resize(&out, (Py_ssize_t)grown) < 0)
            return NULL;
        ob.dst = PyBytes_AS_STRING(out);
        ob.size = grown;
    }
    if (ret == 0) {
        self->eof = 1;
        if (set_bytes(&self->unused_data, src + in.pos, size - in.pos) < 0 ||
            set_bytes(&self->unconsumed_tail, NULL, 0) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    } else if (set_bytes(&self->unconsumed_tail, src + in.pos, size - in.pos) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    if (ob.pos < ob.size && _PyBytes_Resize(&out, (Py_ssize_t)ob.pos) < 0)
        return NULL;
    return out;
}

static PyObject *decompressor_decompress(Decompressor *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"", "max_length", NULL};
    Py_buffer data;
    Py_ssize_t max_length;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*n:decompress", kwlist, &data, &max_length))
        return NULL;
    PyObject *out = NULL;
    if (max_length <= 0)
        PyErr_SetString(PyExc_ValueError, "max_length must be positive");
    else if (self->busy)
        PyErr_SetString(PyExc_RuntimeError, "Decompressor used by two threads at once");
    else if (self->failed)
        PyErr_SetString(ZstdError, "an earlier error left the frame undecodable");
    else if (self->eof)
        PyErr_SetString(PyExc_EOFError, "the zstd frame has already ended");
    else
        out = decompress_into(self, data.buf, (size_t)data.len, (size_t)max_length);
    PyBuffer_Release(&data);
    return out;
}

static PyObject *get_eof(Decompressor *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->eof);
}

static PyObject *get_unused_data(Decompressor *self, void *Py_UNUSED(closure)) {
    return Py_NewRef(self->unused_data);
}

static PyObject *get_unconsumed_tail(Decompressor *self, void *Py_UNUSED(closure)) {
    return Py_NewRef(self->unconsumed_tail);
}

static PyMethodDef decompressor_methods[] = {
    {"decompress", (PyCFunction)(void (*)(void))decompressor_decompress,
     METH_VARARGS | METH_KEYWORDS,
     "decompress(data, max_length): at most max_length bytes of the frame's output; input "
     "not taken is left in unconsumed_tail."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef decompressor_getset[] = {
    {"eof", (getter)get_eof, NULL, "True once the frame has ended and all its output returned.",
     NULL},
    {"unused_data", (getter)get_unused_data, NULL, "The input after the end of the frame.", NULL},
    {"unconsumed_tail", (getter)get_unconsumed_tail, NULL,
     "Input not taken because the output limit was reached: give it again.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecompressorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vmimg.image._zstdstream.Decompressor",
    .tp_basicsize = sizeof(Decompressor),
    .tp_dealloc = (destructor)decompressor_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Decompressor(): decodes one zstd frame, at most max_length bytes per call.",
    .tp_methods = decompressor_methods,
    .tp_getset = decompressor_getset,
    .tp_new = decompressor_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmimg.image._zstdstream",
    "One zstd frame decompressed with an output limit per call (libzstd).", -1, NULL, NULL, NULL,
    NULL, NULL,
};

PyMODINIT_FUNC PyInit__zstdstream(void) {
    if (PyType_Ready(&DecompressorType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    ZstdError = PyErr_NewExceptionWithDoc("vmimg.image._zstdstream.ZstdError",
                                          "Corrupt or unacceptable zstd data.", PyExc_ValueError,
                                          NULL);
    if (ZstdError == NULL || PyModule_AddObjectRef(m, "ZstdError", ZstdError) < 0 ||
        PyModule_AddObjectRef(m, "Decompressor", (PyObject *)&DecompressorType) < 0 ||
        PyModule_AddIntConstant(m, "WINDOW_LOG_MAX", WINDOW_LOG_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
