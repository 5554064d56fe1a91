"""kiln at each precision, side by side in one process on one GPU: fp16, bf16, int8 and fp8.

Builds ResNet-50 (torchvision) and BERT-base (transformers, sequence length 128) with random
weights, as ``peers.py`` does, at batch 64 in each precision; int8 and fp8 calibrate on
``--calibration-samples`` random inputs (512 by default, in batches of the benchmark's size) with
kiln's default method. Each: median of 50 runs after 10 warm-up runs with CUDA events, the build
and calibration times, and the cosine similarity of the output to the fp32 PyTorch model's; for
int8 and fp8, how many quantized layers the build kept in fp16 because they ran faster there
(:mod:`kiln.fp16_fallback`).

Prints one table with each precision's ms and its speed-up over kiln fp16; writes the rows (the
peer benchmark's JSON format, ``system`` "kiln" and ``precision`` set) to
``benchmarks/results/DATE-GPU-precisions.json`` and appends the table to ``benchmarks/RESULTS.md``.

    python benchmarks/precisions.py [--models resnet50,bert] [--batches 64]
        [--precisions fp16,bf16,int8,fp8] [--calibration-samples 512] [--runs 50] [--warmup 10]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import tempfile
from functools import partial
from pathlib import Path

import torch

from peers import (
    HERE, KILN, MODELS, Settings, batch_sizes, fmt, markdown_table, names_from, reference_output,
    run_kiln, run_system, slug, version, write_json,
)

PRECISIONS = ("fp16", "bf16", "int8", "fp8")


def calibration_batches(name: str, batch: int, samples: int) -> list[dict]:
    """Random inputs of the benchmark's shapes, none of them the timed input."""
    case = MODELS[name]
    count = max(1, samples // batch)
    return [dict(zip(case.input_names, (t.numpy() for t in case.inputs(batch, torch.Generator().manual_seed(10_000 + i)))))
            for i in range(count)]


def run_precisions(name: str, batch: int, precisions: list[str], args: argparse.Namespace,
                   engines: Path, device_name: str) -> list[dict]:
    case = MODELS[name]
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs(batch, torch.Generator().manual_seed(batch))
    reference = reference_output(model, inputs, "cuda")
    calibration = calibration_batches(name, batch, args.calibration_samples)
    rows = []
    for precision in precisions:
        settings = Settings("cuda", precision, args.runs, args.warmup, engines)
        quantized = precision in ("int8", "fp8")
        run = partial(run_kiln, model, inputs, case.input_names, reference, f"{name}-b{batch}",
                      settings, calibration if quantized else None)
        result = run_system(f"{KILN} {precision}", run, settings)
        ms, per_s = result.pop("ms"), result.pop("runs_per_s", None)
        rows.append({"model": name, "batch": batch, "precision": precision, "system": KILN, "ms": ms,
                     "items_per_s": None if per_s is None else batch * per_s, "device": device_name,
                     **({"calibration_samples": len(calibration) * batch} if quantized else {}),
                     **result})
    return rows


def table(rows: list[dict], precisions: list[str]) -> str:
    body = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        by_precision = {r["precision"]: r for r in rows if (r["model"], r["batch"]) == (model, batch)}
        fp16_ms = by_precision.get("fp16", {}).get("ms")
        cells = [model, str(batch)]
        for precision in precisions:
            row = by_precision.get(precision, {})
            ms = row.get("ms")
            if "error" in row:
                cells.append("failed")
            else:
                ratio = f" ({fp16_ms / ms:.2f}x)" if ms and fp16_ms else ""
                cosine = f", cos {row['cosine']:.4f}" if "cosine" in row else ""
                calibration = f", calib {row['calibration_s']:.1f} s" if "calibration_s" in row else ""
                fp16_layers = f", {row['fp16_layers']} layers fp16" if row.get("fp16_layers") else ""
                cells.append(f"{fmt(ms, 3)}{ratio}{cosine}{calibration}{fp16_layers}")
        body.append(cells)
    return markdown_table(["model", "batch", *(f"kiln {p} ms (vs fp16)" for p in precisions)], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=names_from(("resnet50", "bert")), default=["resnet50", "bert"])
    parser.add_argument("--batches", type=batch_sizes, default=[64])
    parser.add_argument("--precisions", type=names_from(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible")
    device_name = torch.cuda.get_device_name()
    output = args.output or HERE / "results" / f"{datetime.date.today().isoformat()}-{slug(device_name)}-precisions.json"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kiln-precisions-") as scratch:
        for name in args.models:
            for batch in args.batches:
                print(f"{name}, batch {batch}", flush=True)
                rows += run_precisions(name, batch, args.precisions, args, Path(scratch), device_name)
                write_json(rows, output)
    text = table(rows, args.precisions)
    print(text, flush=True)
    command = shlex.join(["python", "benchmarks/precisions.py", "--models", ",".join(args.models),
                          "--batches", ",".join(map(str, args.batches)), "--precisions",
                          ",".join(args.precisions), "--calibration-samples", str(args.calibration_samples),
                          "--runs", str(args.runs), "--warmup", str(args.warmup)])
    if not args.no_append:
        with args.results_md.open("a") as results:
            results.write(
                f"\n## {datetime.date.today().isoformat()} — kiln by precision ({device_name})\n\n"
                f"`{command}` — torch {torch.__version__}, triton {version('triton')}; random weights, "
                f"int8/fp8 calibrated on random inputs, median of {args.runs} runs after "
                f"{args.warmup} warm-up runs, CUDA events, one process.\n\n{text}\n"
            )
    print(f"wrote {output}", flush=True)


if __name__ == "__main__":
    main()
