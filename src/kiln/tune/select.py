"""Pick one choice per kernel spec: by timing the candidates on the target GPU, or by preference.

Tuning level (the build's ``opt_level``): 0-1 take the first supporting choice (each op's list is
ordered by what is usually fastest); 2-4 time every candidate (20 runs after warm-up) and 5 times
them longer (100). The runs are captured in a CUDA graph and replayed, as engines run them: timed
one launch at a time, a choice whose Python launch path costs more than its kernel (a Triton
kernel's, at small sizes) would be charged for host time a replay never spends. A choice that
cannot be captured is timed launch by launch (median). A spec is timed at concrete shapes only: symbolic
dimensions take the optimization profile's ``opt`` values, and a spec with a dimension still
unknown, an integer input (its values matter) or a tensor attribute takes the first choice.
Each candidate's output is checked against the ``ops`` reference on the timing inputs; a choice
that fails, or disagrees beyond its precision's tolerance, costs ``inf``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kiln.kernels.arithmetic import fp32_arithmetic
from kiln.kernels.catalog import FALLBACK, choices_for
from kiln.kernels.choice import Choice, Launch, attributes_of
from kiln.lowering.spec import KernelSpec
from kiln.ops.registry import lookup
from kiln.tune.cache import TimingCache

log = logging.getLogger("kiln.tune")
TORCH_FLOAT_TYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64}
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# 8-bit outputs quantize float values each choice rounds its own way: one step apart where those
# straddle a rounding boundary. (rtol, atol): an integer step; float8_e4m3fn's 3 mantissa bits.
QUANTIZED_STEP = {torch.int8: (0.0, 1.0), torch.uint8: (0.0, 1.0), torch.float8_e4m3fn: (2.0**-3, 2.0**-9)}


@dataclass(frozen=True)
class Selection:
    choice: Choice
    timings: dict[str, float]  # choice id -> median ms; empty when not timed
    cached: bool = False

    @property
    def ms(self) -> float | None:
        best = self.timings.get(self.choice.id)
        return best if best is not None and math.isfinite(best) else None


class Tuner:
    def __init__(
        self, device: str, level: int, cache: TimingCache, symbols: Mapping[str, int],
        target: Mapping[str, Any], tf32: bool = False,
    ) -> None:
        self.device = device
        self.level = level
        self.cache = cache
        self.symbols = dict(symbols)
        self.target = dict(target)
        self.tf32 = tf32

    def select(self, spec: KernelSpec) -> Selection:
        candidates = choices_for(spec, self.device)
        default = next(c for c in candidates if not c.timed_only)
        if len(candidates) == 1 or self.level < 2 or self.device != "cuda":
            return Selection(default, {})
        shapes = self._shapes(spec)
        if shapes is None:
            return Selection(default, {})
        key = TimingCache.key({"spec": spec.to_json(), "shapes": shapes, "target": self.target})
        timings = self.cache.get(key)
        cached = timings is not None and all(c.id in timings for c in candidates)
        if not cached:
            timings = self._time(spec, shapes, candidates)
            self.cache.put(key, timings)
        best = min(candidates, key=lambda c: timings.get(c.id, math.inf))
        if not math.isfinite(timings.get(best.id, math.inf)):
            best = FALLBACK
        return Selection(best, timings, cached)

    def _shapes(self, spec: KernelSpec) -> list[list[int] | None] | None:
        """Concrete input shapes (None for omitted inputs), or None when a spec can't be timed."""
        if any("tensor" in e or "tensors" in e for e in json.loads(spec.attributes).values()):
            return None
        shapes: list[list[int] | None] = []
        for vtype in spec.input_types:
            if vtype is None:
                shapes.append(None)
                continue
            if vtype.kind != "tensor" or vtype.shape is None or vtype.dtype not in TORCH_FLOAT_TYPES:
                return None
            dims = [d if isinstance(d, int) else self.symbols.get(d) if isinstance(d, str) else None
                    for d in vtype.shape]
            if any(d is None for d in dims):
                return None
            shapes.append(dims)
        return shapes

    def _time(
        self, spec: KernelSpec, shapes: list[list[int] | None], candidates: list[Choice]
    ) -> dict[str, float]:
        generator = torch.Generator(device="cuda").manual_seed(0)
        inputs = [
            None if shape is None else torch.randn(
                shape, generator=generator, device="cuda", dtype=TORCH_FLOAT_TYPES[vtype.dtype]
            )
            for shape, vtype in zip(shapes, spec.input_types)
        ]
        reference = lookup(spec.op_type, spec.opset, spec.domain)
        attributes = attributes_of(spec)
        input_types = [t.dtype if t else 0 for t in spec.input_types]
        output_types = [t.dtype if t else 0 for t in spec.output_types]
        runs = 100 if self.level >= 5 else 20
        with torch.inference_mode(), fp32_arithmetic(self.tf32):
            expected = None
            timings = {}
            for choice in [FALLBACK, *[c for c in candidates if c is not FALLBACK]]:
                try:
                    launch = choice.launch(choice.recipe(spec), reference)
                    args = [_laid_out(choice, launch, i, x) for i, x in enumerate(inputs)]
                    bound = launch.impl.bind(
                        attributes, torch.device("cuda"), len(spec.output_types), input_types, output_types
                    )
                    result = launch.impl(args, bound)
                    if expected is None:
                        expected = result
                    elif not _agrees(result, expected):
                        log.warning("choice %s disagrees with ops for %s; not used", choice.id, spec.op_type)
                        timings[choice.id] = math.inf
                        continue
                    timings[choice.id] = _median_ms(lambda: launch.impl(args, bound), runs)
                except Exception as error:  # noqa: BLE001  (a choice that fails costs inf)
                    log.debug("choice %s failed for %s: %s", choice.id, spec.op_type, error)
                    timings[choice.id] = math.inf
        return timings


def _laid_out(choice: Choice, launch: Launch, index: int, x: torch.Tensor | None) -> torch.Tensor | None:
    """Input ``index`` as ``choice`` gets it in an engine: weights prepared at load, activations
    channels-last where the choice reads them so."""
    if x is None:
        return x
    if index in launch.prepare_weights:
        return launch.prepare_weights[index](x)
    if index in choice.channels_last_inputs and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _agrees(result: Any, expected: Any) -> bool:
    results = result if isinstance(result, tuple) else (result,)
    references = expected if isinstance(expected, tuple) else (expected,)
    for y, ref in zip(results, references):
        if y.shape != ref.shape or y.dtype != ref.dtype:
            return False
        if ref.dtype in QUANTIZED_STEP:
            rtol, atol = QUANTIZED_STEP[ref.dtype]
        else:
            rtol = TOLERANCE.get(ref.dtype, 0.0)
            atol = rtol * (ref.float().nan_to_num().abs().max().item() if ref.numel() else 0.0)
        if not torch.allclose(y.float(), ref.float(), rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


REPLAYS = 5  # graph replays timed; the median is kept


def _median_ms(run: Any, runs: int) -> float:
    for _ in range(3):
        run()
    graph = _captured(run, runs)
    if graph is not None:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(REPLAYS)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) / runs for start, end in events)
        return times[len(times) // 2]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def _captured(run: Any, runs: int) -> torch.cuda.CUDAGraph | None:
    """``runs`` launches of ``run`` captured in one CUDA graph, or None when they cannot be."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(runs):
                run()
    except Exception as error:  # noqa: BLE001  (timed launch by launch instead)
        torch.cuda.synchronize()
        log.debug("timing without a CUDA graph: %s", error)
        return None
    return graph
