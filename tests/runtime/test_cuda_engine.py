"""CUDA engines: target recorded, saved and reloaded, refused on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.engine import format as engine_format
from kiln.errors import EngineCompatibilityError
from tests.graphs import mlp, mlp_reference

pytestmark = pytest.mark.gpu


def test_cuda_engine_round_trip(tmp_path):
    path = tmp_path / "mlp.kiln"
    kiln.build(mlp(), device="cuda").save(path)
    target = engine_format.load(path).manifest["target"]
    assert target["device"] == "cuda" and target["name"] and target["compute_capability"]
    engine = kiln.load(path)
    assert engine.device.type == "cuda"
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(engine.run({"x": x})["y"], mlp_reference(x)[0], rtol=1e-5)
    with pytest.raises(EngineCompatibilityError, match="built for cuda"):
        kiln.load(path, device="cpu")
