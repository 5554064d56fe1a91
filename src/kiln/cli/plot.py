"""Draw a layer profile: the slowest layers as horizontal bars, the rest summed as "other".

Bars are coloured by op kind and hatched by precision; each carries its time and share. PNG goes
through matplotlib (its object API, so no global pyplot state), HTML is one self-contained page.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from kiln.errors import InputError

OTHER = "other"
LABEL_CHARS = 42
# Hatches by precision: plain fp32 reads as the baseline, reduced precisions stand out.
HATCHES = {"fp32": "", "tf32": "..", "bf16": "\\\\", "fp16": "//", "int8": "xx", "fp8": "++"}


def top_layers(layers: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The ``top`` slowest layers, slowest first, then one ``other`` row for the rest."""
    ranked = sorted(layers, key=lambda layer: layer["ms"], reverse=True)
    shown, rest = ranked[:top], ranked[top:]
    if rest:
        shown.append({
            "name": f"{len(rest)} other layers", "op": OTHER, "precision": "",
            "ms": sum(layer["ms"] for layer in rest), "share": sum(layer["share"] for layer in rest),
        })
    return shown


def plot_profile(layers: list[dict[str, Any]], path: Path, title: str, top: int) -> None:
    rows = top_layers(layers, top)
    suffix = path.suffix.lower()
    if suffix == ".png":
        _png(rows, path, title)
    elif suffix in (".html", ".htm"):
        _html(rows, path, title)
    else:
        raise InputError(f"--plot writes a .png or .html file, not {path.name!r}")


def _label(row: dict[str, Any]) -> str:
    if row["op"] == OTHER:
        return row["name"]
    text = f"{row['name']} · {row['op'].split('::')[-1]}"
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _op_colours(rows: list[dict[str, Any]]) -> dict[str, str]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors + colormaps["tab20b"].colors
    ops = sorted({row["op"] for row in rows if row["op"] != OTHER})
    colours = {op: _hex(palette[i % len(palette)]) for i, op in enumerate(ops)}
    colours[OTHER] = "#b0b0b0"
    return colours


def _hex(rgb: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(channel * 255):02x}" for channel in rgb[:3])


def _png(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = _op_colours(rows)
    figure = Figure(figsize=(9, 1.6 + 0.32 * len(rows)), dpi=100, layout="constrained")
    axes = figure.subplots()
    positions = range(len(rows))
    bars = axes.barh(
        positions, [row["ms"] for row in rows], color=[colours[row["op"]] for row in rows],
        hatch=[HATCHES.get(row["precision"], "") for row in rows], edgecolor="white", linewidth=0.5,
    )
    axes.set_yticks(list(positions), [_label(row) for row in rows], fontsize=8)
    axes.invert_yaxis()  # slowest on top
    axes.bar_label(
        bars, [f"{row['ms']:.3f} ms  {row['share']:.1%}" for row in rows], padding=3, fontsize=7
    )
    axes.set_xlim(0, max(row["ms"] for row in rows) * 1.3)  # room for the bar labels
    axes.set_xlabel("median time per run (ms)")
    axes.set_title(title, fontsize=10)
    axes.spines[["top", "right"]].set_visible(False)
    legend = [Patch(facecolor=colours[op], label=op.split("::")[-1]) for op in colours if op != OTHER]
    precisions = sorted({row["precision"] for row in rows if row["precision"]})
    legend += [
        Patch(facecolor="white", edgecolor="#444", hatch=HATCHES.get(p, ""), label=p) for p in precisions
    ]
    # Beside the axes, where no bar can run under it.
    axes.legend(
        handles=legend, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False,
        title="op · precision", title_fontsize=7,
    )
    figure.savefig(path)


def _html(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    colours = _op_colours(rows)
    widest = max(row["ms"] for row in rows) or 1.0
    lines = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font:13px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td{padding:2px 8px;white-space:nowrap}td.bar{width:480px}"
        "div.bar{height:14px}td.num{text-align:right;font-variant-numeric:tabular-nums}</style>",
        f"<h3>{html.escape(title)}</h3><table>",
        "<tr><th>layer</th><th>op</th><th>precision</th><th>ms</th><th>share</th><th></th></tr>",
    ]
    for row in rows:
        width = 100 * row["ms"] / widest
        lines.append(
            f"<tr><td>{html.escape(row['name'])}</td><td>{html.escape(row['op'])}</td>"
            f"<td>{html.escape(row['precision'])}</td><td class='num'>{row['ms']:.3f}</td>"
            f"<td class='num'>{row['share']:.1%}</td><td class='bar'><div class='bar' "
            f"style='width:{width:.1f}%;background:{colours[row['op']]}'></div></td></tr>"
        )
    lines.append("</table>")
    path.write_text("\n".join(lines), encoding="utf-8")
