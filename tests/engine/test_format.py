"""The .kiln file: round trips, and every way a damaged or foreign file is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kiln
from kiln.engine import format as engine_format
from kiln.engine.format import EngineData
from kiln.errors import EngineCompatibilityError, EngineFormatError
from tests.graphs import mlp, mlp_reference


@pytest.fixture
def engine_file(tmp_path):
    path = tmp_path / "mlp.kiln"
    kiln.build(mlp(), device="cpu", opt_level=0).save(path)  # unfused: one layer per node
    return path


def test_saved_engine_loads_and_runs(engine_file):
    engine = kiln.load(engine_file)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    y, hidden = mlp_reference(x)
    out = engine.run({"x": x})
    assert list(out) == ["y", "hidden"]
    np.testing.assert_allclose(out["y"], y, rtol=1e-6)
    np.testing.assert_allclose(out["hidden"], hidden, rtol=1e-6)


def test_manifest_has_the_documented_fields(engine_file):
    manifest = engine_format.load(engine_file).manifest
    for key in ("format_version", "kiln_version", "created", "target", "versions", "precision",
                "signature", "plan", "layers"):
        assert key in manifest
    assert manifest["target"] == {"device": "cpu"}
    assert manifest["signature"]["inputs"] == [
        {"name": "x", "kind": "tensor", "dtype": "float32", "shape": ["batch", 4]}
    ]
    assert [layer["source_ops"] for layer in manifest["layers"]] == [["MatMul"], ["Add"], ["Relu"], ["Add"]]


def test_file_holds_no_pickle(engine_file):
    blob = engine_file.read_bytes()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert "kiln.manifest" in header["__metadata__"]
    assert b"\x80\x04\x95" not in blob  # the pickle protocol 4 opcode


def test_truncated_file(engine_file):
    engine_file.write_bytes(engine_file.read_bytes()[:-10])
    with pytest.raises(EngineFormatError, match="mlp.kiln"):
        kiln.load(engine_file)


def test_truncated_header(engine_file):
    engine_file.write_bytes(engine_file.read_bytes()[:100])
    with pytest.raises(EngineFormatError, match="truncated"):
        kiln.load(engine_file)


def test_altered_weights_fail_the_digest(engine_file):
    blob = bytearray(engine_file.read_bytes())
    blob[-3] ^= 0x40
    engine_file.write_bytes(bytes(blob))
    with pytest.raises(EngineFormatError, match="digest mismatch"):
        kiln.load(engine_file)


def _rewrite_manifest(path, edit) -> None:
    data = engine_format.load(path)
    blob = engine_format.dumps(data)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    edit(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])


def test_altered_manifest_fails_the_digest(engine_file):
    def edit(meta):
        manifest = json.loads(meta["kiln.manifest"])
        manifest["plan"]["steps"][2]["op"] = "Sigmoid"
        meta["kiln.manifest"] = json.dumps(manifest)

    _rewrite_manifest(engine_file, edit)
    with pytest.raises(EngineFormatError, match="digest mismatch"):
        kiln.load(engine_file)


def test_unknown_format_version(engine_file):
    _rewrite_manifest(engine_file, lambda meta: meta.update({"kiln.format_version": "99"}))
    with pytest.raises(EngineFormatError, match="format version 99.*kiln build"):
        kiln.load(engine_file)


def test_not_an_engine(tmp_path):
    path = tmp_path / "model.kiln"
    path.write_bytes(mlp().SerializeToString())
    with pytest.raises(EngineFormatError, match="not a kiln engine"):
        kiln.load(path)


def test_engine_for_another_device(engine_file):
    with pytest.raises(EngineCompatibilityError, match="built for cpu.*--device cuda"):
        kiln.load(engine_file, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_engine_without_a_gpu(engine_file):
    data = engine_format.load(engine_file)
    data.manifest["target"] = {"device": "cuda", "name": "NVIDIA H100", "compute_capability": "9.0"}
    engine_format.save(data, engine_file)
    with pytest.raises(EngineCompatibilityError, match="no CUDA GPU"):
        kiln.load(engine_file)


def test_types_safetensors_lacks_round_trip():
    tensors = {
        "fnuz": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fnuz),
        "c128": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex128),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
    }
    loaded = engine_format.loads(engine_format.dumps(EngineData({"layers": []}, tensors))).tensors
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
