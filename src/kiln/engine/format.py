"""The ``.kiln`` engine file: a safetensors container with a JSON manifest. Never pickle.

Layout:
- tensors: weights (and, as they arrive, compiled kernel binaries and calibration scales). Types
  safetensors cannot hold are stored as their raw bytes (uint8) and retyped on load.
- ``__metadata__``: ``kiln.format_version``, ``kiln.manifest`` (the JSON manifest: versions,
  target device, signature, plan, layers) and ``kiln.sha256``, a digest over the manifest and
  every tensor's name, type, shape and bytes.

Loading checks the format version first, then the digest, before anything else is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kiln.errors import EngineFormatError

FORMAT_VERSION = 1
_VERSION_KEY = "kiln.format_version"
_MANIFEST_KEY = "kiln.manifest"
_DIGEST_KEY = "kiln.sha256"
# Types safetensors stores natively (older releases know no others).
_NATIVE = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2,
}
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    *_NATIVE, torch.complex128, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
)}


@dataclass
class EngineData:
    """An engine in memory: its manifest and its tensors (CPU, kiln storage dtypes)."""

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _digest(manifest_json: str, tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        sha.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return sha.hexdigest()


def dumps(engine: EngineData) -> bytes:
    tensors = _unshared({name: t.detach().cpu().contiguous() for name, t in engine.tensors.items()})
    manifest = {
        **engine.manifest,
        "format_version": FORMAT_VERSION,
        "tensor_types": {n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors.items()},
    }
    manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    stored = {
        name: t if t.dtype in _NATIVE else t.reshape(-1).view(torch.uint8)
        for name, t in tensors.items()
    }
    metadata = {
        _VERSION_KEY: str(FORMAT_VERSION),
        _MANIFEST_KEY: manifest_json,
        _DIGEST_KEY: _digest(manifest_json, tensors),
    }
    return st_save(stored, metadata=metadata)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies where tensors share memory (one constant used in several places): safetensors
    stores each tensor on its own."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        result[name] = tensor
    return result


def loads(blob: bytes, source: str = "engine") -> EngineData:
    metadata = _read_metadata(blob, source)
    version = metadata.get(_VERSION_KEY)
    if version != str(FORMAT_VERSION):
        raise EngineFormatError(
            f"{source}: engine format version {version or 'unknown'}; this kiln reads version "
            f"{FORMAT_VERSION}. Rebuild the engine from its model with `kiln build`"
        )
    try:
        stored = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise EngineFormatError(f"{source}: engine file is damaged ({error}); rebuild it") from None
    manifest_json = metadata.get(_MANIFEST_KEY, "")
    try:
        manifest = json.loads(manifest_json)
        tensors = {
            name: _retype(stored[name], *manifest["tensor_types"][name])
            for name in manifest["tensor_types"]
        }
    except (ValueError, KeyError, TypeError, RuntimeError):
        raise EngineFormatError(
            f"{source}: the engine's manifest is damaged or altered; rebuild the engine"
        ) from None
    if set(stored) != set(tensors) or _digest(manifest_json, tensors) != metadata.get(_DIGEST_KEY):
        raise EngineFormatError(
            f"{source}: digest mismatch — the engine file was altered or corrupted after it was "
            "written; rebuild it with `kiln build`"
        )
    return EngineData(manifest=manifest, tensors=tensors)


def _read_metadata(blob: bytes, source: str) -> dict[str, str]:
    damaged = f"{source}: not a kiln engine file, or a truncated one"
    if len(blob) < 8:
        raise EngineFormatError(damaged)
    header_size = int.from_bytes(blob[:8], "little")
    if header_size <= 0 or 8 + header_size > len(blob):
        raise EngineFormatError(damaged)
    try:
        header = json.loads(blob[8 : 8 + header_size])
    except (UnicodeDecodeError, ValueError):
        raise EngineFormatError(damaged) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or _MANIFEST_KEY not in metadata:
        raise EngineFormatError(f"{source}: a safetensors file, but not a kiln engine")
    return metadata


def _retype(tensor: torch.Tensor, dtype_name: str, shape: list[int]) -> torch.Tensor:
    dtype = _DTYPES[dtype_name]
    if tensor.dtype != dtype:
        tensor = tensor.view(dtype)
    return tensor.reshape(shape)


def save(engine: EngineData, path: str | os.PathLike) -> None:
    """Write ``engine`` to ``path`` atomically (a crash never leaves half a file behind)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(dumps(engine))
    os.replace(temporary, path)


def load(path: str | os.PathLike) -> EngineData:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise EngineFormatError(f"{path}: no such engine file") from None
    except IsADirectoryError:
        raise EngineFormatError(f"{path}: is a directory, not an engine file") from None
    return loads(blob, str(path))
