"""Deterministic pseudo-random byte streams shared by the stand-in API server and TCP servers.

Both ends of a bulk-integrity test regenerate the same stream instead of shipping it around,
so a 64 MiB test never holds 64 MiB in memory.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator

# Large enough to amortise per-block Python overhead, small enough to stream with backpressure.
BLOCK_SIZE = 64 * 1024
# Arbitrary fixed seed ("kprism"); changing it changes every expected digest.
SEED = 0x6B70_7269_736D


# 1024 blocks = 64 MiB: concurrent streams at different offsets of a 64 MiB stream all hit.
@functools.lru_cache(maxsize=1024)
def _block(index: int) -> bytes:
    # Seeding per block makes every block computable on its own, so a verifier can start
    # anywhere and the cost stays linear in the bytes actually produced.
    return random.Random(SEED + index).randbytes(BLOCK_SIZE)


def data_chunks(n: int) -> Iterator[bytes]:
    """Yield exactly n bytes of the deterministic stream, in chunks of at most BLOCK_SIZE."""
    if n < 0:
        raise ValueError(f"negative length {n}")
    full, rest = divmod(n, BLOCK_SIZE)
    for index in range(full):
        yield _block(index)
    if rest:
        yield _block(full)[:rest]


def data_bytes(n: int) -> bytes:
    """Return the first n bytes of the deterministic stream (for small payloads)."""
    return b"".join(data_chunks(n))


@functools.lru_cache(maxsize=32)
def data_sha256(n: int) -> str:
    """Hex sha256 of the first n bytes of the deterministic stream."""
    digest = hashlib.sha256()
    for chunk in data_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


# The stand-in API server serves /large?bytes=N from this stream; tests read better with this name.
large_body_sha256 = data_sha256


class StreamVerifier:
    """Compare arbitrarily split received chunks with the deterministic stream as they arrive.

    Reports the first differing offset, which says far more than a digest mismatch
    (a lost chunk, a duplicate, or an off-by-one in a pump all look different).
    """

    def __init__(self, expected_len: int) -> None:
        self.expected_len = expected_len
        self.received = 0
        self.mismatch_offset: int | None = None

    def feed(self, chunk: bytes) -> None:
        """Check the next received chunk."""
        if self.mismatch_offset is not None:
            self.received += len(chunk)
            return
        view = memoryview(chunk)
        while view:
            pos = self.received
            if pos >= self.expected_len:
                self.mismatch_offset = pos
                self.received += len(view)
                return
            index, within = divmod(pos, BLOCK_SIZE)
            take = min(len(view), BLOCK_SIZE - within, self.expected_len - pos)
            expected = _block(index)[within : within + take]
            # bytes(), not the memoryview itself: memoryview comparison goes element by
            # element in Python (measured 2 ms per 64 KiB), bytes comparison is a memcmp.
            if bytes(view[:take]) != expected:
                self.mismatch_offset = pos + _first_difference(view[:take], expected)
                self.received += len(view)
                return
            self.received += take
            view = view[take:]

    @property
    def complete(self) -> bool:
        """True when exactly the expected bytes, and nothing else, have been fed."""
        return self.mismatch_offset is None and self.received == self.expected_len

    def describe(self) -> str:
        """One line for assertion messages."""
        return (
            f"received {self.received} of {self.expected_len} bytes, "
            f"first mismatch at {self.mismatch_offset}"
        )


def _first_difference(got: memoryview, expected: bytes) -> int:
    for offset, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a != b:
            return offset
    return len(expected)
