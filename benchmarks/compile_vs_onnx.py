"""kiln.compile against the ONNX path on the same module: both should give the same engine speed.

Builds ResNet-50 (the architecture's shapes, random weights) once through ``kiln.compile`` and once
through ``torch.onnx.export`` + ``kiln.build``, then times both (and PyTorch eager for context) at
batch 1 and 64 in fp32, median of 50 runs after 10 warm-up runs, with CUDA events on a GPU.

    python benchmarks/compile_vs_onnx.py [--device cuda] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kiln  # noqa: E402
from timing import median_ms  # noqa: E402
from tests.models import zoo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = zoo.ResNet50().eval().to(args.device)
    example = torch.randn(2, 3, 224, 224, device=args.device)
    compiled = kiln.compile(model, example, dynamic_shapes={"x": {0: "batch"}})
    with tempfile.TemporaryDirectory() as folder:
        path = zoo.export(model.cpu(), (example.cpu(),), Path(folder) / "resnet50.onnx", ["image"],
                          {"image": {0: "batch"}})
        model.to(args.device)
        engine = kiln.build(path, device=args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"ResNet-50 fp32 on {name} (torch {torch.__version__}), median of 50 runs, ms")
    print(f"{'batch':>5} {'kiln.compile':>13} {'ONNX + kiln.build':>18} {'ratio':>6} {'torch eager':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, 224, 224, device=args.device)
        with torch.inference_mode():
            via_compile = median_ms(lambda: compiled(x), args.device)
            via_onnx = median_ms(lambda: engine.run({"image": x}), args.device)
            eager = median_ms(lambda: model(x), args.device)
        print(f"{batch:>5} {via_compile:>13.3f} {via_onnx:>18.3f} {via_compile / via_onnx:>6.3f} {eager:>12.3f}")


if __name__ == "__main__":
    main()
