"""kiln against PyTorch eager and torch.compile, side by side in one process on one GPU.

Builds ResNet-50 and ViT-B/16 (torchvision) and BERT-base and GPT-2 small (transformers, sequence
length 128) with random weights and runs each at batch 1 and 64 in fp16 through five systems: kiln
(``torch.onnx.export`` with static shapes, ``kiln.build``, ``engine.save``, ``kiln.load``, inputs
already on the GPU), PyTorch eager (``model.half()``) and torch.compile in modes ``default``,
``reduce-overhead`` and ``max-autotune``. Each system: median of 50 runs after 10 warm-up runs
(torch.compile's compilation happens in the warm-up), timed with CUDA events, and its peak GPU
memory while loaded and running (after kiln's build and torch.compile's first call); kiln's build
and load times and the cosine similarity of its output to the fp32 PyTorch model's (flagged below
0.999). A system that fails is recorded with its one-line error and the run goes on.

Prints a table per model and batch with kiln's speed-up over the best peer (best peer ms / kiln ms)
and their geometric mean over all cases; writes every row to
``benchmarks/results/DATE-GPU.json`` (after each case, so an interrupted run keeps what it measured)
and appends a section to ``benchmarks/RESULTS.md``.

    python benchmarks/peers.py [--models resnet50,vit_b_16,bert,gpt2] [--batches 1,64]
        [--systems kiln,torch-eager,torch-compile-default,...] [--runs 50] [--warmup 10]
        [--device cuda|cpu] [--output PATH.json] [--results-md PATH.md | --no-append]
        [--keep-engines DIR]

On ``--device cpu`` (a smoke run) everything runs in fp32, timed with ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.util
import json
import math
import re
import shlex
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

import kiln
from timing import median_ms, runs_per_s

HERE = Path(__file__).resolve().parent
SEQUENCE = 128
BERT_VOCAB, GPT2_VOCAB = 30522, 50257  # BertConfig()'s and GPT2Config()'s vocabulary sizes
COSINE_FLOOR = 0.999
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # the ONNX exporter colours its messages
KILN = "kiln"
EAGER = "torch-eager"
COMPILE_MODES = {
    "torch-compile-default": "default",
    "torch-compile-reduce-overhead": "reduce-overhead",
    "torch-compile-max-autotune": "max-autotune",
}
SYSTEMS = (KILN, EAGER, *COMPILE_MODES)


# --- models: each returns one tensor, its final output -----------------------------------------


class FirstOutput(nn.Module):
    """A transformers model that returns its first output alone (the hidden states or logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs)[0]


def resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def vit_b_16() -> nn.Module:
    from torchvision.models import vit_b_16

    model = vit_b_16(weights=None)
    # torchvision starts the classifier at zero: random weights give outputs to compare
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def bert_base() -> nn.Module:
    from transformers import BertConfig, BertModel

    return FirstOutput(BertModel(BertConfig(), add_pooling_layer=False))


def gpt2_small() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return FirstOutput(GPT2Model(GPT2Config(use_cache=False)))


def images(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 224, 224, generator=generator),)


def bert_tokens(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, BERT_VOCAB, (batch, SEQUENCE), generator=generator)
    return ids, torch.ones_like(ids)


def gpt2_tokens(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, GPT2_VOCAB, (batch, SEQUENCE), generator=generator),)


@dataclass(frozen=True)
class ModelCase:
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
    package: str


MODELS = {
    "resnet50": ModelCase(resnet50, images, ("image",), "torchvision"),
    "vit_b_16": ModelCase(vit_b_16, images, ("image",), "torchvision"),
    "bert": ModelCase(bert_base, bert_tokens, ("input_ids", "attention_mask"), "transformers"),
    "gpt2": ModelCase(gpt2_small, gpt2_tokens, ("input_ids",), "transformers"),
}


# --- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    device: str
    precision: str
    runs: int
    warmup: int
    engines: Path


def wall_seconds(fn: Callable[[], object], device: str) -> tuple[float, object]:
    begin = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin, result


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cosine(output: torch.Tensor, reference: torch.Tensor) -> float:
    a = output.flatten().double()
    b = reference.to(output.device).flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def one_line(error: BaseException) -> str:
    lines = ANSI_COLOR.sub("", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def reference_output(model: nn.Module, inputs: tuple[torch.Tensor, ...], device: str) -> torch.Tensor:
    """The fp32 model's output, computed in strict fp32 (no TF32) on ``device``, kept on the CPU."""
    model.to(device)
    try:
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return model(*(x.to(device) for x in inputs)).cpu()
    finally:
        model.cpu()
        release_memory(device)


# --- the systems ---------------------------------------------------------------------------------


def export_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...],
                path: Path) -> str:
    """Export with static shapes through torch.export, or the TorchScript exporter where that
    fails; returns which exporter wrote ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, inputs, path, dynamo=True, input_names=list(names), verbose=False)
            return "dynamo"
        except Exception as failure:  # exporters raise many types; the fallback is tried for all
            reason = one_line(failure.__cause__ or failure)  # the ONNX exporter wraps torch.export's error
            print(f"    torch.export failed ({reason}); using the TorchScript exporter", flush=True)
        torch.onnx.export(model, inputs, path, dynamo=False, input_names=list(names))
        return "torchscript"


def print_build_phase(event: kiln.ProgressEvent) -> None:
    """kiln.build's progress: a line as each phase ends."""
    if event.state in ("end", "failed"):
        outcome = "failed after" if event.state == "failed" else "done in"
        detail = f" ({event.detail})" if event.detail else ""
        print(f"      {event.phase} {outcome} {event.seconds:.1f} s{detail}", flush=True)


def run_kiln(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...],
             reference: torch.Tensor, case: str, settings: Settings,
             calibration: list[dict] | None = None) -> dict:
    """Export, build (calibrating int8/fp8 on ``calibration``), save, load and time kiln."""
    folder = settings.engines / case
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    exporter = "reused"
    if not onnx_path.exists():  # one export serves every precision of a case
        exporter = export_onnx(model, inputs, names, onnx_path)
    print(f"    exported with {exporter}; building", flush=True)
    phases: dict[str, float] = {}

    def progress(event: kiln.ProgressEvent) -> None:
        print_build_phase(event)
        if event.state == "end":
            phases[event.phase] = event.seconds

    build_s, built = wall_seconds(
        lambda: kiln.build(onnx_path, device=settings.device, precision=settings.precision,
                           calibration_data=calibration, progress=progress),
        settings.device,
    )
    engine_path = folder / f"model-{settings.precision}.kiln"
    built.save(engine_path)
    fallback = built.manifest["build"].get("fp16_fallback")  # int8/fp8 layers kept in fp16
    fp16_layers = {} if fallback is None else {"fp16_layers": len(fallback["layers"]) if fallback.get("kept") else 0}
    del built  # the loaded engine alone is measured
    release_memory(settings.device)
    if settings.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    load_s, engine = wall_seconds(lambda: kiln.load(engine_path), settings.device)
    print(f"    built in {build_s:.1f} s, loaded in {load_s:.2f} s; timing", flush=True)
    given = dict(zip(names, inputs))
    feed = {info.name: given[info.name].to(settings.device) for info in engine.inputs}
    timed = timings(lambda: engine.run(feed), settings)
    peak = peak_memory(settings.device)
    output = next(iter(engine.run(feed).values()))
    calibrated = {"calibration_s": round(phases["calibration"], 3)} if "calibration" in phases else {}
    return {**timed, "exporter": exporter, "build_s": round(build_s, 3), "load_s": round(load_s, 3),
            **calibrated, **fp16_layers, **peak, "cosine": cosine(output, reference)}


def run_torch(model: nn.Module, inputs: tuple[torch.Tensor, ...], system: str, settings: Settings) -> dict:
    dtype = torch.float16 if settings.precision == "fp16" else torch.float32
    module = copy.deepcopy(model).to(device=settings.device, dtype=dtype)
    args = tuple(x.to(settings.device, dtype if x.is_floating_point() else x.dtype) for x in inputs)
    with torch.inference_mode():
        if system == EAGER:
            return {**timings(lambda: module(*args), settings), **peak_memory(settings.device)}
        compiled = torch.compile(module, mode=COMPILE_MODES[system], dynamic=False)

        def call() -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead and max-autotune replay graphs
            return compiled(*args)

        print("    compiling", flush=True)
        compile_s, _ = wall_seconds(call, settings.device)
        if settings.device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # what running takes, as for kiln after its build
        timed = timings(call, settings)
    return {**timed, "compile_s": round(compile_s, 3), **peak_memory(settings.device)}


def timings(fn: Callable[[], object], settings: Settings) -> dict:
    """``ms``: median latency of one run, each waited for; ``runs_per_s``: runs enqueued back to back."""
    return {"ms": median_ms(fn, settings.device, settings.runs, settings.warmup),
            "runs_per_s": runs_per_s(fn, settings.device, settings.runs, settings.warmup)}


def peak_memory(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def run_system(system: str, run: Callable[[], dict], settings: Settings) -> dict:
    """``run``'s measurements, or its error; what it left on the device is released either way."""
    print(f"  {system}", flush=True)
    release_memory(settings.device)
    if settings.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        return run()
    except Exception as error:  # a failing system is recorded and the run goes on
        print(f"    failed: {one_line(error)}", flush=True)
        return {"ms": None, "error": one_line(error), **peak_memory(settings.device)}
    finally:
        torch._dynamo.reset()
        release_memory(settings.device)


def run_case(name: str, model: nn.Module, batch: int, systems: list[str], settings: Settings,
             device_name: str) -> list[dict]:
    case = MODELS[name]
    inputs = case.inputs(batch, torch.Generator().manual_seed(batch))
    reference = reference_output(model, inputs, settings.device)
    rows = []
    for system in systems:
        if system == KILN:
            run = partial(run_kiln, model, inputs, case.input_names, reference, f"{name}-b{batch}", settings)
        else:
            run = partial(run_torch, model, inputs, system, settings)
        result = run_system(system, run, settings)
        ms, per_s = result.pop("ms"), result.pop("runs_per_s", None)
        rows.append({"model": name, "batch": batch, "precision": settings.precision, "system": system,
                     "ms": ms, "items_per_s": None if per_s is None else batch * per_s,
                     "device": device_name, **result})
    return rows


# --- reporting -----------------------------------------------------------------------------------


def kiln_speedup(rows: list[dict], measure: str = "ms") -> float | None:
    """kiln's speedup over the best peer of one case's rows, when kiln and a peer ran: in latency
    (``ms``, best peer's over kiln's) or in throughput (``items_per_s``, kiln's over best peer's)."""
    kiln_value = next((r[measure] for r in rows if r["system"] == KILN), None)
    peers = [r[measure] for r in rows if r["system"] != KILN and r[measure] is not None]
    if not kiln_value or not peers:
        return None
    return min(peers) / kiln_value if measure == "ms" else kiln_value / max(peers)


def geomean(values: list[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """Aligned for a terminal too: the first column left, the others (numbers) right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]

    def line(cells: list[str]) -> str:
        padded = [cell.ljust(width) if column == 0 else cell.rjust(width)
                  for column, (cell, width) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "-" * (widths[0] + 2) + "|" + "|".join("-" * (width + 1) + ":" for width in widths[1:]) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def cosine_note(value: float) -> str:
    return f"{value:.5f}" + ("" if value >= COSINE_FLOOR else f" (below {COSINE_FLOOR})")  # NaN too


def note(row: dict) -> str | None:
    if "error" in row:
        return f"{row['system']} failed: {row['error']}"
    if "cosine" in row:
        return (f"kiln: built in {row['build_s']:.1f} s, loaded in {row['load_s']:.2f} s, "
                f"cosine to fp32 PyTorch {cosine_note(row['cosine'])}")
    if "compile_s" in row:
        return f"{row['system']}: first call (compiling) {row['compile_s']:.1f} s"
    return None


def case_report(rows: list[dict]) -> str:
    body = [[row["system"], fmt(row["ms"], 3), fmt(row["items_per_s"], 1), fmt(row.get("peak_gpu_mib"), 0)]
            for row in rows]
    speedup = kiln_speedup(rows)
    lines = [markdown_table(["system", "ms", "items/s", "peak MiB"], body),
             *(text for text in map(note, rows) if text),
             *([] if speedup is None else [f"kiln / best peer: {speedup:.3f} in latency, "
                                           f"{fmt(kiln_speedup(rows, 'items_per_s'), 3)} back to back"])]
    return "\n".join(lines)


def short_name(system: str) -> str:
    """``torch-eager`` -> ``eager``, ``torch-compile-max-autotune`` -> ``compile max-autotune``."""
    return system.replace("torch-compile-", "compile ").removeprefix("torch-")


def summary_table(rows: list[dict], systems: list[str]) -> str:
    cases = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    body = []
    for model, batch in cases:
        by_system = {r["system"]: r for r in rows if (r["model"], r["batch"]) == (model, batch)}
        kiln_row = by_system.get(KILN, {})
        body.append([model, str(batch),
                     *("failed" if s in by_system and by_system[s]["ms"] is None
                       else fmt(by_system.get(s, {}).get("ms"), 3) for s in systems),
                     fmt(kiln_speedup(list(by_system.values())), 3),
                     fmt(kiln_speedup(list(by_system.values()), "items_per_s"), 3),
                     cosine_note(kiln_row["cosine"]) if "cosine" in kiln_row else "—",
                     fmt(kiln_row.get("build_s"), 1), fmt(kiln_row.get("load_s"), 2)])
    header = ["model", "batch", *(f"{short_name(s)} (ms)" for s in systems), "kiln / best peer",
              "same, back to back",
              "kiln cosine", "kiln build (s)", "kiln load (s)"]
    return markdown_table(header, body)


def overall_speedup(rows: list[dict], measure: str = "ms") -> tuple[float | None, int]:
    cases = dict.fromkeys((r["model"], r["batch"]) for r in rows)
    speedups = [kiln_speedup([r for r in rows if (r["model"], r["batch"]) == case], measure) for case in cases]
    speedups = [s for s in speedups if s is not None]
    return geomean(speedups), len(speedups)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def measured_command(args: argparse.Namespace) -> str:
    """The command that repeats this run's measurements (where results go is left out)."""
    return shlex.join([
        "python", "benchmarks/peers.py", "--models", ",".join(args.models),
        "--batches", ",".join(map(str, args.batches)), "--systems", ",".join(args.systems),
        "--runs", str(args.runs), "--warmup", str(args.warmup), "--device", args.device,
    ])


def results_section(rows: list[dict], args: argparse.Namespace, settings: Settings, device_name: str) -> str:
    mean, count = overall_speedup(rows)
    failures = [f"- {r['model']} batch {r['batch']}, {r['system']}: {r['error']}"
                for r in rows if "error" in r]
    timing = "CUDA events" if settings.device == "cuda" else "wall clock"
    lines = [
        f"## {datetime.date.today().isoformat()} — kiln against PyTorch eager and torch.compile "
        f"({device_name})",
        "",
        f"`{measured_command(args)}`",
        f"— torch {torch.__version__}, triton {version('triton')}, torchvision {version('torchvision')}, "
        f"transformers {version('transformers')}; random weights, {settings.precision}, {timing}, one "
        f"process. Latency (ms): the median of {settings.runs} runs after {settings.warmup} warm-up "
        f"runs, each waited for; back to back: the throughput of {settings.runs} runs enqueued "
        f"without waiting, as a serving loop or `kiln bench` runs them.",
        "",
        summary_table(rows, args.systems),
        "",
        f"Geometric mean of kiln / best peer over {count} cases: {fmt(mean, 3)} in latency, "
        f"{fmt(overall_speedup(rows, 'items_per_s')[0], 3)} back to back.",
    ]
    if failures:
        lines += ["", "Failed:", *failures]
    return "\n".join(lines) + "\n"


def write_json(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(rows, indent=2) + "\n")
    temporary.replace(path)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- the run ------------------------------------------------------------------------------------


def names_from(known: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of ``known``."""
    known = list(known)

    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        return names

    return parse


def batch_sizes(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, not {text!r}")
    return batches


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=names_from(MODELS), default=list(MODELS),
                        help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--batches", type=batch_sizes, default=[1, 64],
                        help="comma-separated (default: 1,64)")
    parser.add_argument("--systems", type=names_from(SYSTEMS), default=list(SYSTEMS),
                        help=f"comma-separated (default: {','.join(SYSTEMS)})")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", type=Path,
                        help="the JSON file (default: benchmarks/results/DATE-GPU.json)")
    parser.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="do not append to --results-md")
    parser.add_argument("--keep-engines", type=Path, metavar="DIR",
                        help="keep the ONNX files and engines here (default: a temporary folder)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; use --device cpu for a smoke run")
    return args


def main() -> None:
    args = parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    output = args.output or HERE / "results" / f"{datetime.date.today().isoformat()}-{slug(device_name)}.json"
    with tempfile.TemporaryDirectory(prefix="kiln-peers-") as scratch:
        settings = Settings(args.device, "fp16" if args.device == "cuda" else "fp32", args.runs, args.warmup,
                            args.keep_engines or Path(scratch))
        print(f"{device_name}, torch {torch.__version__}, {settings.precision}: "
              f"models {','.join(args.models)}, batches {','.join(map(str, args.batches))}, "
              f"systems {','.join(args.systems)}", flush=True)
        rows: list[dict] = []
        for name in args.models:
            package = MODELS[name].package
            if importlib.util.find_spec(package) is None:
                print(f"skipping {name}: {package} is not installed (pip install {package})", flush=True)
                continue
            torch.manual_seed(0)
            model = MODELS[name].build().eval()
            for batch in args.batches:
                print(f"{name}, batch {batch}", flush=True)
                case_rows = run_case(name, model, batch, args.systems, settings, device_name)
                print(case_report(case_rows), flush=True)
                rows += case_rows
                write_json(rows, output)
            del model
    write_json(rows, output)
    mean, count = overall_speedup(rows)
    print(f"\ngeometric mean of kiln / best peer over {count} cases: {fmt(mean, 3)} in latency, "
          f"{fmt(overall_speedup(rows, 'items_per_s')[0], 3)} back to back", flush=True)
    print(f"wrote {output}", flush=True)
    if rows and not args.no_append:
        with args.results_md.open("a") as results:
            results.write("\n" + results_section(rows, args, settings, device_name))
        print(f"appended to {args.results_md}", flush=True)


if __name__ == "__main__":
    main()
