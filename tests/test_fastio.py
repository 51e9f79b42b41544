"""fastio: the C relay/poll/accept of the compiled engine and their Python versions give the
same results on real sockets, errors included (the rest of the data path is one source
for both engines; these functions are the only code written twice)."""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kubeprism.forward import _fastio, fastio

RELAYS = {"c": _fastio.relay, "python": fastio.relay_py}
Relay = Callable[[socket.socket, socket.socket, memoryview], tuple[int, int]]
Pairs = Callable[[], tuple[socket.socket, socket.socket]]


def c_poller(ep: select.epoll, maxevents: int, timeout: float = 0.0) -> fastio.Poller:
    """What the compiled engine's fastio.poller gives (defined only there)."""
    return lambda: _fastio.poll(ep.fileno(), maxevents, math.ceil(timeout * 1000))


POLLERS = {"c": c_poller, "python": fastio.poller_py}


@pytest.fixture(params=sorted(RELAYS))
def relay(request: pytest.FixtureRequest) -> Relay:
    """A relay called with the sockets' fds, as the pumps call it."""
    impl = RELAYS[request.param]
    return lambda src, dst, buffer: impl(src.fileno(), dst.fileno(), buffer)


@pytest.fixture
def tcp() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    """Connected TCP pairs (ours non-blocking, theirs blocking), closed afterwards."""
    listener = socket.create_server(("127.0.0.1", 0))
    made: list[socket.socket] = [listener]

    def pair() -> tuple[socket.socket, socket.socket]:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        ours.setblocking(False)
        made.extend((ours, theirs))
        return ours, theirs

    yield pair
    for sock in made:
        sock.close()


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_what_is_read_is_sent(relay: Relay, tcp: Pairs) -> None:
    (src, feeder), (dst, sink) = tcp(), tcp()
    feeder.sendall(b"hello")
    buf = memoryview(bytearray(1024))
    assert relay(src, dst, buf) == (5, 5)
    assert sink.recv(1024) == b"hello"


def test_nothing_to_read_is_minus_one(relay: Relay, tcp: Pairs) -> None:
    (src, _), (dst, _) = tcp(), tcp()
    assert relay(src, dst, memoryview(bytearray(16))) == (-1, 0)


def test_eof_is_zero(relay: Relay, tcp: Pairs) -> None:
    (src, feeder), (dst, _) = tcp(), tcp()
    feeder.shutdown(socket.SHUT_WR)
    assert relay(src, dst, memoryview(bytearray(16))) == (0, 0)


def test_a_full_destination_sends_less(relay: Relay, tcp: Pairs) -> None:
    (src, feeder), (dst, _sink) = tcp(), tcp()
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    buf = memoryview(bytearray(64 * 1024))
    feeder.setblocking(False)
    for _ in range(1000):  # bounded: the sink never reads, so dst fills up
        with contextlib.suppress(BlockingIOError):
            feeder.send(bytes(64 * 1024))
        n, sent = relay(src, dst, buf)
        assert 0 <= sent <= n
        if n > 0 and sent < n:
            break
    else:
        pytest.fail("dst never filled up")


def test_a_reset_source_raises_connection_reset(relay: Relay, tcp: Pairs) -> None:
    (src, feeder), (dst, _) = tcp(), tcp()
    reset(feeder)
    with pytest.raises(ConnectionResetError):
        relay(src, dst, memoryview(bytearray(16)))


def test_a_reset_destination_raises_the_same_error(
    tcp: Pairs,
) -> None:
    errors = {}
    for name, relay in RELAYS.items():
        (src, feeder), (dst, sink) = tcp(), tcp()
        reset(sink)
        feeder.sendall(b"x")
        for _ in range(100):  # the RST may need a moment to arrive
            try:
                relay(src.fileno(), dst.fileno(), memoryview(bytearray(16)))
                feeder.sendall(b"x")
            except OSError as exc:
                errors[name] = type(exc), exc.errno
                break
    assert errors["c"] == errors["python"] and errors["c"][0] is not None, errors


@pytest.mark.parametrize("impl", sorted(POLLERS))
def test_a_poller_reports_what_epoll_poll_reports(impl: str) -> None:
    a, b = socket.socketpair()
    ep = select.epoll()
    try:
        poll_now, poll_one = POLLERS[impl](ep, 256), POLLERS[impl](ep, 1)
        ep.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        ep.register(b.fileno(), select.EPOLLOUT)
        assert poll_now() == [(b.fileno(), select.EPOLLOUT)]
        b.send(b"x")
        b.shutdown(socket.SHUT_WR)
        got = sorted(poll_now())
        assert got == sorted(ep.poll(0, 256))
        assert (a.fileno(), select.EPOLLIN | select.EPOLLRDHUP) in got
        assert len(poll_one()) == 1  # maxevents bounds one poll
    finally:
        ep.close()
        a.close()
        b.close()


def _in_epoll_wait(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/wchan") as f:
        return "epoll" in f.read()


@pytest.mark.parametrize("impl", sorted(POLLERS))
def test_a_waiting_poller_gives_other_threads_their_turn(impl: str) -> None:
    """A poll with a timeout returns the event that comes during its wait, and lets other
    threads run meanwhile: here the very thread that makes the event (the C poll with a
    zero timeout keeps the GIL; one that waits must not)."""
    a, b = socket.socketpair()
    ep = select.epoll()
    waiter = threading.get_native_id()
    sent: list[float] = []

    def send_once_waiting() -> None:
        deadline = time.monotonic() + 10.0
        while not _in_epoll_wait(waiter) and time.monotonic() < deadline:
            time.sleep(0.001)  # polls the other thread's state, with a deadline
        b.send(b"x")
        sent.append(time.monotonic())

    try:
        ep.register(a.fileno(), select.EPOLLIN)
        wait = POLLERS[impl](ep, 8, 20.0)
        sender = threading.Thread(target=send_once_waiting)
        sender.start()
        got = wait()
        sender.join()
        assert got == [(a.fileno(), select.EPOLLIN)] and sent
    finally:
        ep.close()
        a.close()
        b.close()


def test_the_c_poll_rejects_a_bad_bound_or_timeout() -> None:
    ep = select.epoll()
    try:
        with pytest.raises(ValueError, match=r"maxevents must be 1\.\.256"):
            _fastio.poll(ep.fileno(), 0, 0)
        with pytest.raises(ValueError, match=r"timeout_ms must be 0\.\."):
            _fastio.poll(ep.fileno(), 1, -1)
    finally:
        ep.close()


def test_the_c_functions_take_fds_not_sockets() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(TypeError, match="an fd must be an int, not socket"):
            _fastio.relay(a, b, memoryview(bytearray(16)))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="an fd must be 0"):
            _fastio.relay(-1, b.fileno(), memoryview(bytearray(16)))
        with pytest.raises(OSError) as bad:
            _fastio.poll(a.fileno(), 1, 0)  # a socket is no epoll set
        assert bad.value.errno == errno.EINVAL
    finally:
        a.close()
        b.close()


def test_the_compiled_engine_uses_the_c_functions() -> None:
    import kubeprism

    c = (_fastio.relay, _fastio.accept)
    python = (fastio.relay_py, fastio.accept_py)
    in_use: tuple[object, object] = (fastio.relay, fastio.accept)
    assert in_use == (c if kubeprism.ENGINE == "native" else python)
    ep = select.epoll()
    try:
        bound = fastio.poller(ep, 8, 0.0)
        assert isinstance(bound, functools.partial)
        want = _fastio.poll if kubeprism.ENGINE == "native" else ep.poll
        assert bound.func == want
    finally:
        ep.close()


@pytest.mark.parametrize("impl", ["c", "python"])
def test_accept_gives_a_non_blocking_close_on_exec_socket(impl: str) -> None:
    accept = {"c": _fastio.accept, "python": fastio.accept_py}[impl]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        assert accept(listener) == -1  # none waiting: no exception
        client = socket.create_connection(listener.getsockname())
        fd = accept(listener)
        try:
            assert not os.get_blocking(fd) and not os.get_inheritable(fd)
            with socket.socket(
                socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd
            ) as s:
                assert s.gettimeout() == 0.0
                assert s.getpeername() == client.getsockname()
        finally:
            client.close()
    finally:
        listener.close()
