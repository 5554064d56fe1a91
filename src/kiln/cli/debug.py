"""``kiln debug TOOL``: tools for finding what breaks.

``kiln debug reduce MODEL --check "COMMAND {model}"`` shrinks MODEL to a minimal subgraph on which
COMMAND still fails (exits non-zero), for a small bug report or a fast reproduction.

``kiln debug precision MODEL --precision int8 --budget "cosine>=0.999"`` finds the fewest layers
to keep in fp32 for the engine to meet the accuracy budget (the search ``kiln build
--accuracy-budget`` runs, see :mod:`kiln.precision_search`) and prints them as ``kiln build``
takes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
from rich.console import Console

from kiln.cli.options import (
    add_calibration_arguments, add_layer_precision_argument, calibration_options, layer_precisions,
)
from kiln.cli.reduce import Subgraphs, minimize
from kiln.config import DEVICES, BuildConfig
from kiln.engine.progress import ProgressEvent
from kiln.errors import BuildError, InputError
from kiln.frontend.onnx import read_onnx
from kiln.precision_search import SEARCHABLE, search_layer_precisions

HELP = (
    "debugging tools: reduce a failing model to a minimal failing subgraph; find the layers to "
    "keep in fp32 for an accuracy budget"
)
log = logging.getLogger("kiln.debug")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
    reduce = tools.add_parser(
        "reduce", help="shrink a model on which a command fails to a minimal failing subgraph",
        description="Delta debugging over the model's nodes: keep the smallest subgraph (valid "
        "ONNX, cut values become typed inputs) on which the check command still fails.",
    )
    reduce.add_argument("model", help="ONNX model on which the check fails")
    reduce.add_argument(
        "--check", required=True, metavar='"COMMAND {model}"',
        help="shell command that fails (exits non-zero) on a bad model; {model} is replaced by "
        "the candidate's path",
    )
    reduce.add_argument(
        "--fail-regex", metavar="REGEX",
        help="count a failure only when the command's output matches REGEX (so that a different "
        "error does not pass for the one being chased)",
    )
    reduce.add_argument("--timeout", type=float, metavar="SECONDS", help="limit of one check")
    reduce.add_argument(
        "-o", "--output", type=Path, default=Path("reduced.onnx"),
        help="where to save the reduced model (reduced.onnx)",
    )
    reduce.set_defaults(usage_error=reduce.error)

    precision = tools.add_parser(
        "precision", help="find the fewest layers to keep in fp32 for a precision to meet an "
        "accuracy budget",
        description="Build the model at --precision, measure it against FP32 in ONNX Runtime "
        "(on --calibration-data, else on random inputs), order the layers it narrowed by the "
        "error each adds, and bisect for the fewest of the most sensitive to keep in fp32 until "
        "--budget holds. Prints them as `kiln build` takes them; exits 1 when even every layer "
        "in fp32 misses the budget.",
    )
    precision.add_argument("model", help="ONNX model")
    precision.add_argument(
        "--precision", required=True, choices=SEARCHABLE, help="the precision to build at",
    )
    precision.add_argument(
        "--budget", required=True, metavar='"cosine>=0.999"',
        help="how close to FP32 the engine must stay: cosine>=X (worst sample), top1>=X, "
        "max_abs<=X, max_rel<=X, several joined by commas",
    )
    add_layer_precision_argument(precision)
    precision.add_argument("--device", choices=DEVICES, help="target device (default: cuda if present)")
    precision.add_argument(
        "--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
        help="optimization level: 0 cleanup only, 3 default",
    )
    add_calibration_arguments(precision)
    precision.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    return TOOLS[args.tool](args)


def reduce_main(args: argparse.Namespace) -> int:
    if "{model}" not in args.check:
        args.usage_error('--check must contain {model}, e.g. --check "kiln build {model} -o /dev/null"')
    model = read_onnx(args.model)
    subgraphs = Subgraphs(model)
    count = len(subgraphs.nodes)
    check = _Check(args.check, re.compile(args.fail_regex) if args.fail_regex else None, args.timeout)
    console = Console(stderr=True)
    tried: dict[tuple[int, ...], bool] = {}
    with (
        tempfile.TemporaryDirectory(prefix="kiln-reduce-") as scratch,
        console.status(f"reducing {args.model}") as status,
    ):
        candidate_path = Path(scratch) / "candidate.onnx"
        if not check.fails(model, candidate_path):
            raise InputError(
                f"the check passes on {args.model} itself, so there is nothing to reduce: "
                f"`{args.check}` must exit non-zero on the model"
            )

        def fails(keep: Sequence[int]) -> bool:
            key = tuple(keep)
            if key not in tried:
                candidate = subgraphs.extract(keep)
                tried[key] = candidate is not None and check.fails(candidate, candidate_path)
                log.info("%d of %d nodes: %s", len(keep), count, "fails" if tried[key] else "passes")
                status.update(f"reducing {args.model}: check {len(tried)}, {len(keep)} nodes")
            return tried[key]

        kept = minimize(count, fails)
    reduced = subgraphs.extract(kept)
    if reduced is None:  # only when nothing can be cut: the whole model is the answer
        reduced = model
    onnx.save(reduced, args.output)
    ops = ", ".join(node.op_type for node in reduced.graph.node[:8])
    console.print(
        f"reduced {args.model} from {count} to {len(reduced.graph.node)} node(s) ({ops}) in "
        f"{len(tried) + 1} checks; saved {args.output}"
    )
    return 0


def precision_main(args: argparse.Namespace) -> int:
    config = BuildConfig(
        device=args.device, opt_level=args.opt_level, precision=args.precision,
        accuracy_budget=args.budget, layer_precisions=layer_precisions(args.layer_precision),
        **calibration_options(args),
    )
    console = Console(stderr=True)
    with console.status(f"searching {args.model}") as status:

        def show(event: ProgressEvent) -> None:
            if event.state == "advance":
                status.update(f"searching {args.model}: {event.detail}")

        found = search_layer_precisions(args.model, config, show, args.calibration_data)
    if args.json:
        print(json.dumps({**found.to_json(), "layer_precision_args": found.layer_precision_args()}, indent=2))
    if not found.met:
        raise BuildError(found.failure())
    if not args.json:
        console.print(f"{found.describe()}, found in {found.builds} builds", highlight=False, soft_wrap=True)
        print(found.layer_precision_args())
    return 0


TOOLS = {"reduce": reduce_main, "precision": precision_main}


class _Check:
    """The user's command, run on a candidate model saved to a scratch path."""

    def __init__(self, command: str, fail_regex: re.Pattern | None, timeout: float | None) -> None:
        self.command = command
        self.fail_regex = fail_regex
        self.timeout = timeout

    def fails(self, model: onnx.ModelProto, path: Path) -> bool:
        onnx.save(model, path)
        command = self.command.replace("{model}", shlex.quote(str(path)))
        try:
            result = subprocess.run(
                command, shell=True, capture_output=True, text=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            return False  # a hang is not the failure being chased
        except OSError as error:
            raise InputError(f"cannot run the check command {self.command!r}: {error}") from None
        if result.returncode == 0:
            return False
        return self.fail_regex is None or bool(self.fail_regex.search(result.stdout + result.stderr))
