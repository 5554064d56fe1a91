"""Render build progress events: a rich display of phases, or JSON lines."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn
from rich.text import Text

from kiln.engine.progress import ProgressEvent


class JsonLines:
    """One JSON object per event, on stdout, flushed at once for a reading process."""

    def __call__(self, event: ProgressEvent) -> None:
        sys.stdout.write(json.dumps(event.to_json()) + "\n")
        sys.stdout.flush()

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class PhaseDisplay:
    """A progress line per phase on stderr: a bar with n/N and ETA where the size is known.

    ``verbose`` also prints a line as each phase ends, with its summary and time (shown even
    where the console is not a terminal and the bars are not drawn).
    """

    def __init__(self, console: Console | None = None, verbose: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.verbose = verbose
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<9}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[count]:>9}"),
            _TimeColumn(),
            TextColumn("[dim]{task.fields[detail]}"),
            console=self.console,
        )
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, event: ProgressEvent) -> None:
        task = self.tasks.get(event.phase)
        if event.state == "start":
            self.tasks[event.phase] = self.progress.add_task(
                event.phase, total=event.total, detail="", count=_count(event), seconds=None
            )
        elif task is None:
            return
        elif event.state == "advance":
            self.progress.update(
                task, completed=event.completed, detail=event.detail, count=_count(event)
            )
        elif event.state == "end":
            total = event.total if event.total is not None else 1
            self.progress.update(
                task, total=total, completed=total, detail=event.detail, count=_count(event),
                seconds=event.seconds,
            )
            self.progress.stop_task(task)
            if self.verbose:
                self.console.print(f"{event.phase}: {event.detail or 'done'} ({event.seconds:.3f} s)")
        elif event.state == "failed":
            self.progress.update(task, description=f"[red]{event.phase}", detail="failed")
            self.progress.stop_task(task)

    def __enter__(self) -> PhaseDisplay:
        if self.console.is_terminal:  # off a terminal (a log, a pipe), bars would only be noise
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.progress.stop()


class _TimeColumn(ProgressColumn):
    """Elapsed time while a phase runs (and an ETA when its size is known), its time once done."""

    def render(self, task: Task) -> Text:
        if task.fields.get("seconds") is not None:
            return Text(f"{task.fields['seconds']:.2f} s", style="progress.elapsed")
        text = f"{task.elapsed or 0:.1f} s"
        if task.total and task.time_remaining is not None:
            text += f", eta {task.time_remaining:.0f} s"
        return Text(text, style="progress.elapsed")


def _count(event: ProgressEvent) -> str:
    return f"{event.completed}/{event.total}" if event.total is not None else ""
