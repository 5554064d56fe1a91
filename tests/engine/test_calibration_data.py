"""Calibration batches from a directory or an iterable, checked against the model's inputs."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import onnx_ir as ir

from kiln.engine.calibration_data import DeclaredInput, calibration_batches
from kiln.errors import ConfigError, InputError
from kiln.runtime.io import TensorInfo

IMAGE = TensorInfo("image", "float32", ("batch", 3, 8, 8))
MASK = TensorInfo("mask", "int64", ("batch", 8))
TWO = [IMAGE, MASK]


def batch(n: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
        "mask": rng.integers(0, 2, (n, 8)),
    }


def test_npz_directory(tmp_path):
    written = [batch(n, seed) for seed, n in enumerate((1, 4, 2))]
    for name, data in zip(("b2", "a1", "c3"), written):
        np.savez(tmp_path / f"{name}.npz", **data)
    (tmp_path / "README.txt").write_text("not a batch")
    (tmp_path / "nested.npz").mkdir()  # a directory, not a file: ignored
    found = calibration_batches(tmp_path, TWO)
    assert len(found) == 3
    for got, expected in zip(found, (written[1], written[0], written[2])):  # name order
        assert set(got) == {"image", "mask"}
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key])
    assert len(calibration_batches(str(tmp_path), TWO, limit=2)) == 2


def test_npy_directory_for_a_single_input_model(tmp_path):
    arrays = [np.full((n, 3, 8, 8), n, np.float32) for n in (1, 3)]
    for index, array in enumerate(arrays):
        np.save(tmp_path / f"batch{index}.npy", array)
    found = calibration_batches(tmp_path, [IMAGE])
    assert [b["image"].shape[0] for b in found] == [1, 3]


def test_bfloat16_from_npy_files(tmp_path):
    np.save(tmp_path / "b.npy", np.ones((2, 4), ml_dtypes.bfloat16))
    (found,) = calibration_batches(tmp_path, [TensorInfo("x", "bfloat16", ("n", 4))])
    assert found["x"].dtype == ml_dtypes.bfloat16


def test_iterable_of_torch_tensors_and_tuple_inputs():
    def generate():
        torch.manual_seed(0)
        while True:  # endless: the limit stops it
            yield {"x": torch.randn(5, 4), "ids": torch.arange(5)}

    inputs = [("x", np.float32, ("n", 4)), DeclaredInput("ids", torch.int64, ("n",))]
    found = calibration_batches(generate(), inputs, limit=3)
    assert len(found) == 3
    assert all(isinstance(b["x"], np.ndarray) and b["x"].dtype == np.float32 for b in found)
    assert found[0]["ids"].tolist() == [0, 1, 2, 3, 4]


def test_onnx_typed_inputs():
    inputs = [DeclaredInput("x", ir.DataType.FLOAT16, (2,))]
    (found,) = calibration_batches([{"x": torch.ones(2, dtype=torch.float16)}], inputs)
    assert found["x"].dtype == np.float16
    with pytest.raises(InputError, match="float32.*float16"):
        calibration_batches([{"x": torch.ones(2)}], inputs)


def test_unknown_rank_and_dims_accept_any_shape():
    inputs = [TensorInfo("x", "float32", None), TensorInfo("y", None, (None, 2))]
    found = calibration_batches([{"x": np.zeros((1, 2, 3), np.float32), "y": [[1, 2]]}], inputs)
    assert found[0]["y"].shape == (1, 2)


def bad(mutate) -> list[dict]:
    data = [batch(seed=0), batch(seed=1)]
    mutate(data[1])
    return data


@pytest.mark.parametrize("mutate, needles", [
    (lambda b: b.pop("mask"), ["batch 1", "lacks", "'mask'"]),
    (lambda b: b.update(extra=np.zeros(1)), ["batch 1", "unknown", "'extra'"]),
    (lambda b: b.update(masks=b.pop("mask")),
     ["batch 1", "lacks input(s) 'mask' and has unknown input(s) 'masks'"]),
    (lambda b: b.update(image=b["image"].astype(np.float64)),
     ["batch 1", "'image'", "float64", "float32", "astype(np.float32)"]),
    (lambda b: b.update(image=torch.from_numpy(b["image"]).double()),
     ["batch 1", "'image'", "float64", "tensor.to(torch.float32)"]),
    (lambda b: b.update(image=b["image"][0]), ["batch 1", "'image'", "rank 3", "rank 4"]),
    (lambda b: b.update(image=np.zeros((2, 4, 8, 8), np.float32)),
     ["batch 1", "'image'", "size 4 in dimension 1", "expects 3"]),
    (lambda b: b.update(image=np.zeros((0, 3, 8, 8), np.float32), mask=np.zeros((0, 8), np.int64)),
     ["batch 1", "'image'", "size 0", "'batch'"]),
    (lambda b: b.update(mask=np.zeros((5, 8), np.int64)), ["batch 1", "'batch'", "'image'", "'mask'"]),
])
def test_bad_batch(mutate, needles):
    with pytest.raises(InputError) as caught:
        calibration_batches(bad(mutate), TWO)
    for needle in needles:
        assert needle in str(caught.value)


def test_bad_file_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", **batch())
    wrong = batch()
    wrong["image"] = wrong["image"].astype(np.float16)
    np.savez(tmp_path / "b.npz", **wrong)
    with pytest.raises(InputError, match=r"'b\.npz'.*'image'.*float16"):
        calibration_batches(tmp_path, TWO)


def test_corrupt_file_is_named(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"a\.npz"):
        calibration_batches(tmp_path, TWO)


def test_npy_files_for_a_two_input_model(tmp_path):
    np.savez(tmp_path / "a.npz", **batch())
    np.save(tmp_path / "b.npy", batch()["image"])
    with pytest.raises(InputError, match=r"'b\.npy'.*2 inputs.*image.*mask"):
        calibration_batches(tmp_path, TWO)


def test_empty_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(InputError, match=r"no \.npz"):
        calibration_batches(tmp_path, TWO)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        calibration_batches(tmp_path / "nowhere", TWO)


def test_empty_iterable():
    with pytest.raises(InputError, match="no batches"):
        calibration_batches([], TWO)
    with pytest.raises(InputError, match="no batches"):
        calibration_batches(iter(()), TWO)


def test_single_mapping_or_non_mapping_batches():
    with pytest.raises(InputError, match="single mapping"):
        calibration_batches(batch(), TWO)
    with pytest.raises(InputError, match="batch 0 is a list"):
        calibration_batches([[1, 2]], TWO)
    with pytest.raises(InputError, match="iterable"):
        calibration_batches(42, TWO)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(limit):
    with pytest.raises(ConfigError, match="limit"):
        calibration_batches([batch()], TWO, limit=limit)
