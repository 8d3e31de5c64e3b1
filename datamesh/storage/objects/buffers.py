"""Reading a large object into its final ``bytes`` while a second thread hashes what has arrived.

A verified get must return one ``bytes`` and its SHA-256.  Read whole and then hashed, the hash
adds its full time to the read.  Read in chunks and joined, the join copies the object once more
into fresh memory, which on this kind of machine costs about as much as the hash.  So the object
is read straight into a new ``bytes`` object, chunk by chunk, and each chunk is handed to a hashing
thread as soon as it is filled: the hash trails the read by one chunk, on the other core, over
memory still in the CPU cache.

Filling a ``bytes`` object is what CPython's C API allows for one just made by
``PyBytes_FromStringAndSize(NULL, size)``: its contents are undefined until the maker writes them,
through the pointer ``PyBytes_AsString`` gives.  Nothing else holds the object until it is
returned, whole and verified.  Where that API is not reachable (not CPython), :func:`new_bytes`
returns ``None`` and callers read the plain way.
"""

from __future__ import annotations

import ctypes
import hashlib
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from datamesh.storage.objects.base import HASHERS, OVERLAP_MIN_BYTES


def _c_api() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        make, address = ctypes.pythonapi.PyBytes_FromStringAndSize, ctypes.pythonapi.PyBytes_AsString
    except AttributeError:  # not CPython
        return None
    make.restype, make.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    address.restype, address.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    return make, address


_API = _c_api()


def new_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """A new ``bytes`` of ``size`` bytes and a writable view of its contents, or ``None`` where
    this Python cannot make one.

    The contents are undefined until written: fill all of it through the view, release the view,
    and only then let the ``bytes`` be seen.  The view does not keep the ``bytes`` alive; hold both.
    """
    if _API is None or size < 1:  # size 0 would be the shared empty bytes object
        return None
    make, address = _API
    data: bytes = make(None, size)
    view = memoryview((ctypes.c_char * size).from_address(address(data))).cast("B")
    return data, view


class TrailingHash:
    """SHA-256 of chunks handed over one by one (:meth:`feed`), hashed on a hashing thread while
    the caller reads the next.  Always end it, with :meth:`result` or :meth:`abandon`, or its
    thread waits for chunks forever."""

    def __init__(self) -> None:
        self._chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._future: Future[tuple[str, int]] = HASHERS.get().submit(self._run)

    def _run(self) -> tuple[str, int]:
        sha = hashlib.sha256()
        size = 0
        while (chunk := self._chunks.get()) is not None:
            sha.update(chunk)
            size += len(chunk)
        return sha.hexdigest(), size

    def feed(self, chunk: memoryview) -> None:
        """Hash ``chunk`` next; it must not change until :meth:`result` returns."""
        self._chunks.put(chunk)

    def result(self) -> tuple[str, int]:
        """The hex digest and byte count of everything fed."""
        self._chunks.put(None)
        return self._future.result()

    def abandon(self) -> None:
        """Stop hashing (the read failed) and wait until no chunk is being read any more."""
        self._chunks.put(None)
        self._future.exception()


class Filling:
    """The ``bytes`` a verified get reads an object into, and the hash of what is read so far.

    Objects of at least ``OVERLAP_MIN_BYTES`` are hashed while they are read, on a hashing thread
    (:class:`TrailingHash`); smaller ones once read.  Where this Python cannot fill a new ``bytes``,
    the object is read into a ``bytearray`` and copied once at the end.  Either way the digest is of
    the returned bytes themselves.  Always end it, with :meth:`finish` or :meth:`end`.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        fresh = new_bytes(size)
        self._data: bytes | bytearray
        if fresh is None:
            self._data = bytearray(size)
            self.view = memoryview(self._data)
        else:
            self._data, self.view = fresh
        self._hashing = TrailingHash() if size >= OVERLAP_MIN_BYTES else None
        #: Bytes filled so far, from the start.
        self.offset = 0

    def read_from(self, readinto: Callable[[memoryview], int], chunk_bytes: int) -> bool:
        """Fill the rest from ``readinto`` (it reads into the view it is given and returns how many
        bytes), ``chunk_bytes`` at a time, each chunk handed to the hash once read; ``False`` if
        ``readinto`` ran dry first.  :attr:`offset` says how far it got, also if ``readinto`` raised,
        so a cut read can be resumed from there with another source."""
        while self.offset < self.size:
            count = readinto(self.view[self.offset : self.offset + chunk_bytes])
            if not count:
                return False
            if self._hashing is not None:
                self._hashing.feed(self.view[self.offset : self.offset + count])
            self.offset += count
        return True

    def finish(self) -> tuple[str, bytes]:
        """The digest and the bytes, once every byte is read."""
        if self._hashing is not None:
            digest, _ = self._hashing.result()
            self._hashing = None
        else:
            digest = hashlib.sha256(self.view).hexdigest()
        self.view.release()
        data = self._data
        return digest, data if isinstance(data, bytes) else bytes(data)

    def end(self) -> None:
        """Stop the hashing thread if the read failed (a no-op after :meth:`finish`)."""
        if self._hashing is not None:
            self._hashing.abandon()
            self._hashing = None
