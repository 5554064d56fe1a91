"""Build an engine for a bundled model, run it, and compare it with ONNX Runtime.

Used by ``make demo``: SqueezeNet 1.1 (examples/models) is built for cuda when a GPU is visible,
else for the CPU; the engine is saved, loaded back, and checked against ONNX Runtime on random
images at two batch sizes, with the median latency of each.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

import kiln

MODEL = Path(__file__).with_name("models") / "squeezenet1_1.onnx"
ENGINE = Path(__file__).resolve().parent.parent / ".demo" / "squeezenet1_1.kiln"


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    console = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    engine = kiln.build(MODEL, device=device)
    ENGINE.parent.mkdir(exist_ok=True)
    engine.save(ENGINE)
    console.print(
        f"built {ENGINE.relative_to(Path.cwd()) if ENGINE.is_relative_to(Path.cwd()) else ENGINE} "
        f"for [bold]{device}[/] in {time.perf_counter() - start:.2f} s ({len(engine.layers)} layers)"
    )
    engine = kiln.load(ENGINE)
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])

    table = Table(title=f"SqueezeNet 1.1, kiln ({device}) vs ONNX Runtime (CPU), fp32")
    for column in ("batch", "max abs error", "max rel error", "top-1 agree", "kiln ms", "onnxruntime ms"):
        table.add_column(column, justify="right")
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        image = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        ours = engine.run({"image": image})["logits"]
        reference = session.run(None, {"image": image})[0]
        abs_error = float(np.abs(ours - reference).max())
        rel_error = abs_error / float(np.abs(reference).max())
        agree = float((ours.argmax(1) == reference.argmax(1)).mean())
        table.add_row(
            str(batch), f"{abs_error:.2e}", f"{rel_error:.2e}", f"{agree:.0%}",
            f"{median_ms(lambda: engine.run({'image': image})):.2f}",
            f"{median_ms(lambda: session.run(None, {'image': image})):.2f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
