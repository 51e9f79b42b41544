/* The calls every forwarded message (and every accept) makes, for the compiled engine
 * (kubeprism/native.py).
 *
 * Why: CPython releases and retakes the GIL around every socket and epoll call (~700
 * instructions a time, a third of a small message's cost in user space) and builds each
 * call's arguments and results through generic layers. On a non-blocking socket and an
 * epoll_wait with a zero timeout nothing can block, so there is nothing to release the GIL
 * for (a poll that does wait releases it). fastio.py holds the same functions in Python
 * (the engine without a compiler); tests/test_fastio.py holds both to the same results,
 * errors included.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/socket.h>

/* Events one poll returns at most (the reactor asks for MAX_EVENTS = 256). */
#define MAX_EVENTS 256

static int
retry_after_signal(void)
{
    /* PEP 475: an interrupted call is retried once the signal handlers ran. */
    return errno == EINTR && PyErr_CheckSignals() == 0;
}

/* (a, b) as a new tuple of two ints: Py_BuildValue parses its format string on every call,
 * a tenth of a small message's cost. */
static PyObject *
pair(Py_ssize_t a, Py_ssize_t b)
{
    PyObject *first = PyLong_FromSsize_t(a);
    if (first == NULL)
        return NULL;
    PyObject *second = PyLong_FromSsize_t(b);
    if (second == NULL) {
        Py_DECREF(first);
        return NULL;
    }
    PyObject *tuple = PyTuple_New(2);
    if (tuple == NULL) {
        Py_DECREF(first);
        Py_DECREF(second);
        return NULL;
    }
    PyTuple_SET_ITEM(tuple, 0, first);
    PyTuple_SET_ITEM(tuple, 1, second);
    return tuple;
}

/* An fd given as an int. The callers keep fds, not sockets: PyObject_AsFileDescriptor on a
 * socket calls its fileno() method, a quarter of a small message's cost in user space. */
static int
fd_arg(PyObject *arg)
{
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "an fd must be an int, not %.100s", Py_TYPE(arg)->tp_name);
        return -1;
    }
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "an fd must be 0..%d, not %ld", INT_MAX, fd);
        return -1;
    }
    return (int)fd;
}

/* relay(src_fd, dst_fd, buffer) -> (read, sent): one recv from src into buffer, then one
 * send of what was read to dst. read is -1 when src had nothing (EAGAIN), 0 at EOF; sent is
 * 0 when dst is full. Any other error raises OSError (its errno subclass), as the socket
 * calls do. */
static PyObject *
relay(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "relay(src_fd, dst_fd, buffer) takes 3 arguments");
        return NULL;
    }
    int src = fd_arg(args[0]);
    if (src < 0)
        return NULL;
    int dst = fd_arg(args[1]);
    if (dst < 0)
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[2], &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    ssize_t n, sent = 0;
    do {
        n = recv(src, buf.buf, (size_t)buf.len, 0);
    } while (n < 0 && retry_after_signal());
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        n = -1;
    } else if (n < 0) {
        goto error;
    } else if (n > 0) {
        do {
            sent = send(dst, buf.buf, (size_t)n, MSG_NOSIGNAL);
        } while (sent < 0 && retry_after_signal());
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            sent = 0;
        else if (sent < 0)
            goto error;
    }
    PyBuffer_Release(&buf);
    return pair((Py_ssize_t)n, (Py_ssize_t)sent);
error:
    PyBuffer_Release(&buf);
    if (!PyErr_Occurred())
        PyErr_SetFromErrno(PyExc_OSError);
    return NULL;
}

/* An int argument within [low, high] into *out; -1 with ValueError naming it otherwise. */
static int
bounded_arg(PyObject *arg, const char *name, long low, long high, long *out)
{
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < low || value > high) {
        PyErr_Format(PyExc_ValueError, "%s must be %ld..%ld, not %ld", name, low, high, value);
        return -1;
    }
    *out = value;
    return 0;
}

/* poll(epoll_fd, maxevents, timeout_ms) -> [(fd, events), ...]: what
 * select.epoll.poll(timeout_ms / 1000, maxevents) returns. A zero timeout cannot block and
 * keeps the GIL (the poll after every wakeup); a wait releases it, as select.epoll.poll
 * does, so that other threads run meanwhile. */
static PyObject *
poll_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "poll(epoll_fd, maxevents, timeout_ms) takes 3 arguments");
        return NULL;
    }
    int epfd = fd_arg(args[0]);
    if (epfd < 0)
        return NULL;
    long wanted, timeout;
    if (bounded_arg(args[1], "maxevents", 1, MAX_EVENTS, &wanted) < 0 ||
        bounded_arg(args[2], "timeout_ms", 0, INT_MAX, &timeout) < 0)
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    int n;
    do {
        if (timeout == 0) {
            n = epoll_wait(epfd, events, (int)wanted, 0);
        } else {
            Py_BEGIN_ALLOW_THREADS
            n = epoll_wait(epfd, events, (int)wanted, (int)timeout);
            Py_END_ALLOW_THREADS
        }
    } while (n < 0 && retry_after_signal());
    if (n < 0)
        return PyErr_Occurred() ? NULL : PyErr_SetFromErrno(PyExc_OSError);
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *item = pair(events[i].data.fd, (Py_ssize_t)events[i].events);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

/* accept(listener) -> fd: accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC, so the new socket
 * needs no ioctl to become non-blocking. -1 when no connection is waiting: every burst of
 * accepts ends that way, and an exception costs more than the accept. Any other error
 * raises OSError, as socket.accept() does. */
static PyObject *
accept_nonblocking(PyObject *module, PyObject *listener)
{
    int lfd = PyObject_AsFileDescriptor(listener);
    if (lfd < 0)
        return NULL;
    int fd;
    do {
        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (fd < 0 && retry_after_signal());
    if (fd < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return PyLong_FromLong(-1);
    if (fd < 0)
        return PyErr_Occurred() ? NULL : PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyMethodDef methods[] = {
    {"accept", (PyCFunction)accept_nonblocking, METH_O,
     "accept(listener) -> fd: a new connection's socket, non-blocking and close-on-exec; -1 if none."},
    {"relay", (PyCFunction)(void (*)(void))relay, METH_FASTCALL,
     "relay(src_fd, dst_fd, buffer) -> (read, sent): one recv, then one send of what it read."},
    {"poll", (PyCFunction)(void (*)(void))poll_events, METH_FASTCALL,
     "poll(epoll_fd, maxevents, timeout_ms) -> [(fd, events)]: select.epoll.poll(timeout_ms / 1000, maxevents)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kubeprism.forward._fastio",
    "accept, recv-then-send and an epoll poll, without releasing the GIL where nothing can block.", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastio(void)
{
    return PyModule_Create(&module);
}
