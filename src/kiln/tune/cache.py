"""The timing cache: measured choice timings, kept in a JSON file across builds and models.

A key names everything a timing depends on: the spec (op, attributes, types), the concrete
shapes it was timed at, the GPU (name and compute capability) and the versions of torch, CUDA,
triton and kiln. The cache stores recipes' choice ids and milliseconds, never binaries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

log = logging.getLogger("kiln.tune")
FORMAT = 1


class TimingCache:
    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, float]] = {}
        self.hits = 0
        if self.path is not None and self.path.exists():
            self.entries = _read(self.path)

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, float] | None:
        found = self.entries.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: str, timings: dict[str, float]) -> None:
        self.entries[key] = timings

    def save(self) -> None:
        """Write the cache atomically (a concurrent reader sees the old or the new file)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "entries": self.entries}, sort_keys=True)
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".timing-cache-")
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, self.path)


def _read(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"timing cache {path} cannot be read ({error}); delete it or give another path"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        log.warning("timing cache %s has another format; starting a new one", path)
        return {}
    try:
        return {
            key: {str(k): float(v) for k, v in timings.items()}
            for key, timings in data["entries"].items()
        }
    except (AttributeError, TypeError, ValueError):
        log.warning("timing cache %s is malformed; starting a new one", path)
        return {}
