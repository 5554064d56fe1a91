"""The model repository, laid out as Triton's:

    REPO/<model>/config.pbtxt            Triton's ModelConfig in protobuf text format (optional)
    REPO/<model>/<version>/model.kiln    an engine
    REPO/<model>/<version>/model.onnx    or a model, built on first load into model.kiln beside it

This module reads the layout and the configs and loads engines; it never keeps a model running.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kiln.errors import EngineCompatibilityError, EngineFormatError, KilnError
from kiln.runtime import Engine, load
from kiln.serve.protocol import InvalidRequest, NotFound

log = logging.getLogger("kiln.serve.repository")

CONFIG_FILE = "config.pbtxt"
ENGINE_FILE = "model.kiln"
ONNX_FILE = "model.onnx"
# A model name is one directory name: no separators, no "..", nothing hidden.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# Config fields kiln serve does not implement; a config using them fails to load rather than
# being served differently from what it says.
_UNSUPPORTED_FIELDS = ("sequence_batching", "ensemble_scheduling", "batch_input", "batch_output")
_INSTANCE_DEVICES = {
    model_config_pb2.ModelInstanceGroup.KIND_AUTO: None,  # the device the engine was built for
    model_config_pb2.ModelInstanceGroup.KIND_MODEL: None,
    model_config_pb2.ModelInstanceGroup.KIND_CPU: "cpu",
    model_config_pb2.ModelInstanceGroup.KIND_GPU: "cuda",
}


class RepositoryError(KilnError):
    """The model repository itself is unusable (missing, not a directory)."""


class ModelLoadError(KilnError):
    """A model or one of its versions cannot be loaded; the message is the index's ``reason``."""


class ModelRepository:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {root} is not a directory")

    def model_names(self) -> list[str]:
        """The models in the repository: its subdirectories with a valid name."""
        return sorted(
            entry.name for entry in self.root.iterdir()
            if entry.is_dir() and _MODEL_NAME.fullmatch(entry.name)
        )

    def model_dir(self, name: str) -> Path:
        """The directory of model ``name``; never a path outside the repository."""
        if not _MODEL_NAME.fullmatch(name) or ".." in name:
            raise InvalidRequest(f"invalid model name {name!r}: use letters, digits, '_', '-', '.'")
        directory = self.root / name
        if directory.resolve().parent != self.root or not directory.is_dir():
            raise NotFound(f"no model {name!r} in the repository")
        return directory

    def read_config(self, name: str) -> model_config_pb2.ModelConfig:
        """The model's config.pbtxt, parsed and checked; a default config when there is none."""
        path = self.model_dir(name) / CONFIG_FILE
        config = model_config_pb2.ModelConfig()
        if path.is_file():
            try:
                text_format.Parse(path.read_text(), config)
            except (text_format.ParseError, UnicodeDecodeError) as error:
                raise ModelLoadError(f"{path}: {error}") from None
        if config.name and config.name != name:
            raise ModelLoadError(f"{path}: name {config.name!r} differs from the directory {name!r}")
        config.name = name
        unsupported = sorted({f.name for f, _ in config.ListFields()} & set(_UNSUPPORTED_FIELDS))
        if unsupported:
            raise ModelLoadError(f"{path}: kiln serve does not support {', '.join(unsupported)}")
        if config.max_batch_size < 0:
            raise ModelLoadError(f"{path}: max_batch_size must be >= 0")
        for tensor in [*config.input, *config.output]:
            if tensor.HasField("reshape"):
                raise ModelLoadError(f"{path}: kiln serve does not support reshape ({tensor.name})")
        for group in config.instance_group:
            if group.gpus:
                raise ModelLoadError(
                    f"{path}: instance_group.gpus is not supported; kiln runs on the current CUDA device"
                )
        return config

    def versions_on_disk(self, name: str) -> list[int]:
        """Version directories holding an engine or a model, in increasing order."""
        return sorted(
            int(entry.name) for entry in self.model_dir(name).iterdir()
            if entry.is_dir() and entry.name.isdigit()
            and ((entry / ENGINE_FILE).is_file() or (entry / ONNX_FILE).is_file())
        )

    def load_engine(self, name: str, version: int, device: str | None) -> Engine:
        """Load the version's engine, building model.onnx into model.kiln first when needed."""
        directory = self.model_dir(name) / str(version)
        engine_path, onnx_path = directory / ENGINE_FILE, directory / ONNX_FILE
        if not engine_path.is_file() and not onnx_path.is_file():
            raise ModelLoadError(f"no {ENGINE_FILE} or {ONNX_FILE} in {directory}")
        stale = onnx_path.is_file() and (
            not engine_path.is_file() or onnx_path.stat().st_mtime > engine_path.stat().st_mtime
        )
        if not stale:
            try:
                return load(engine_path, device=device)
            except (EngineFormatError, EngineCompatibilityError) as error:
                if not onnx_path.is_file():
                    raise ModelLoadError(str(error)) from None
                log.warning("%s; rebuilding it from %s", error, onnx_path)
        return _build(onnx_path, engine_path, device)


def instance_devices(config: model_config_pb2.ModelConfig) -> list[str | None]:
    """One device per execution instance (None: the engine's own), from instance_group."""
    groups = config.instance_group or [model_config_pb2.ModelInstanceGroup()]
    # count 0 is the proto default and means one instance, as in Triton
    return [_INSTANCE_DEVICES[group.kind] for group in groups for _ in range(group.count or 1)]


def select_versions(config: model_config_pb2.ModelConfig, on_disk: list[int]) -> list[int]:
    """The versions the version policy asks for (default: the latest one)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(on_disk)
    if choice == "specific":
        return sorted(set(policy.specific.versions))
    latest = policy.latest.num_versions if choice == "latest" else 1
    return on_disk[-max(latest, 1):]


def _build(onnx_path: Path, engine_path: Path, device: str | None) -> Engine:
    import kiln  # the compiler loads only when a repository holds a model to build

    log.warning("building %s into %s", onnx_path, engine_path)
    try:
        engine = kiln.build(onnx_path, device=device)
    except KilnError as error:
        raise ModelLoadError(f"{onnx_path}: {error}") from None
    # Written beside and renamed: a concurrent reader never sees half an engine.
    with tempfile.NamedTemporaryFile(dir=engine_path.parent, suffix=".tmp", delete=False) as tmp:
        pass
    try:
        engine.save(tmp.name)
        os.replace(tmp.name, engine_path)
    except OSError as error:
        log.warning("cannot cache the engine at %s (%s); serving it from memory", engine_path, error)
        Path(tmp.name).unlink(missing_ok=True)
    return engine
