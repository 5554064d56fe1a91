"""Triton's system shared memory extension: a client places tensors in a POSIX shared memory
object, registers a window of it as a named region, and its requests point into the region
instead of carrying the bytes; outputs can be written into a region the same way.

Each region maps its object into the server once, at registration. An input reads from the
mapping without a copy, so the client must leave those bytes alone until the response arrives,
as with Triton. Regions are registered, read and written on the event loop only; a region
unregistered while a request still reads it stays mapped until that request lets go of it.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.serve.protocol import InvalidRequest, NotFound, SharedMemoryRef, to_bytes

# Where Linux keeps POSIX shared memory objects: shm_open("/name") is this directory's "name".
# (multiprocessing.shared_memory would do, but before Python 3.13 attaching registers the object
# with the resource tracker, which unlinks the client's object when the server exits.)
SHM_DIRECTORY = Path("/dev/shm")
_NAME_MAX = 255


class RegionExists(InvalidRequest):
    """A region of that name is registered already (gRPC: ALREADY_EXISTS)."""

    grpc_code = "ALREADY_EXISTS"


@dataclass(frozen=True)
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SharedMemoryRegions:
    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes from ``offset`` of the shared memory object ``key``."""
        if not name:
            raise InvalidRequest("a shared memory region needs a name")
        if name in self._regions:
            raise RegionExists(f"shared memory region {name!r} is registered already")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"shared memory region {name!r}: {field} must be a non-negative integer")
        if byte_size == 0:
            raise InvalidRequest(f"shared memory region {name!r}: byte_size must be at least 1")
        path = SHM_DIRECTORY / _object_name(key)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise InvalidRequest(f"no shared memory object {key!r} exists") from None
        except OSError as error:
            raise InvalidRequest(f"cannot open shared memory object {key!r}: {error.strerror}") from None
        try:
            size = os.fstat(descriptor).st_size
            if offset + byte_size > size:
                raise InvalidRequest(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} "
                    f"exceeds the {size} bytes of object {key!r}"
                )
            mapping = mmap.mmap(descriptor, offset + byte_size)
        finally:
            os.close(descriptor)
        self._regions[name] = _Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str = "") -> None:
        """Forget region ``name`` (every region when ``name`` is empty); an unknown name is no
        error, as in Triton."""
        names = [name] if name else list(self._regions)
        for region in filter(None, (self._regions.pop(n, None) for n in names)):
            try:
                region.mapping.close()
            except BufferError:  # a request still reads from it: unmapped when it lets go
                pass

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [region.status() for region in self._regions.values()]
        if name not in self._regions:
            raise NotFound(f"no shared memory region {name!r} is registered")
        return [self._regions[name].status()]

    def read(self, tensor: str, ref: SharedMemoryRef) -> memoryview:
        """The bytes of input ``tensor`` that ``ref`` points at (a view: no copy)."""
        start = self.locate(tensor, ref)
        return memoryview(self._region(ref.region).mapping)[start:start + ref.byte_size]

    def write(self, tensor: str, ref: SharedMemoryRef, array: np.ndarray) -> int:
        """Write output ``tensor`` where ``ref`` points; return its byte count."""
        data = to_bytes(array)
        if len(data) > ref.byte_size:
            raise InvalidRequest(
                f"output {tensor!r} takes {len(data)} bytes, more than the {ref.byte_size} bytes "
                f"given in shared memory region {ref.region!r}"
            )
        start = self.locate(tensor, ref)
        self._region(ref.region).mapping[start:start + len(data)] = data
        return len(data)

    def locate(self, tensor: str, ref: SharedMemoryRef) -> int:
        """Where ``ref`` starts in its region's mapping, once checked to lie inside the region."""
        region = self._region(ref.region)
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidRequest(
                f"tensor {tensor!r}: offset {ref.offset} + byte size {ref.byte_size} exceeds the "
                f"{region.byte_size} bytes of shared memory region {ref.region!r}"
            )
        return region.offset + ref.offset

    def _region(self, name: str) -> _Region:
        if name not in self._regions:  # the request's mistake, not a missing route: 400
            raise InvalidRequest(f"no shared memory region {name!r} is registered")
        return self._regions[name]


def _object_name(key: str) -> str:
    """The file name of shared memory object ``key`` ("/name" or "name", as shm_open takes)."""
    name = key.removeprefix("/") if isinstance(key, str) else ""
    if not name or "/" in name or name in (".", "..") or len(name) > _NAME_MAX or "\0" in name:
        raise InvalidRequest(f"shared memory key {key!r} is not a valid name (\"/name\", no other '/')")
    return name
