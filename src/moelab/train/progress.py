"""Progress of training runs: one line per arm with its step, losses, throughput and an ETA.

On a terminal it is a live ``rich`` bar per arm. When stdout is not a terminal (a log file, a
pipe, CI) it prints one plain line when an arm starts, after each evaluation and when it ends, so
a log shows progress while the run goes on (a live bar would only be drawn at the end).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


def fmt_duration(seconds: float) -> str:
    """``"1:02:03"`` / ``"2:03"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _f(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


@dataclass
class _Arm:
    total: int
    start_step: int
    t0: float = field(default_factory=time.perf_counter)
    step: int = 0
    task: Any = None

    def eta(self) -> float:
        done = self.step - self.start_step
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self.t0) / done * (self.total - self.step)


class RunProgress:
    """Progress display for one or more training arms (``moelab train``, ``compare``, ``repro``).

    Args:
        console: a ``rich.console.Console`` (default: a new one on stdout).
        enabled: False shows nothing.
        throughput: the label of the tokens-per-second number (``"tok/s (wall)"`` or ``"tok/s/core"``).

    ``add(label, total)`` when an arm starts, ``update(label, report)`` with the trainer's callback
    reports (``step``, ``loss``, ``tokens_per_s``, ``imbalance``, and ``val_loss`` after an
    evaluation), ``finish(label, val_loss)`` when it ends. Use it as a context manager.
    """

    def __init__(
        self, console: Any = None, *, enabled: bool = True, throughput: str = "tok/s (wall)"
    ) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console()
        self.enabled = enabled
        self.throughput = throughput
        self.live = enabled and self.console.is_terminal
        self.arms: dict[str, _Arm] = {}
        self.bar = self._bar() if self.live else None

    def _bar(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        wide = self.console.width >= 120
        cols: list[Any] = [
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24 if wide else 12),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
        ]
        if wide:
            cols += [
                TextColumn("{task.fields[tps]} " + self.throughput),
                TextColumn("max/mean load {task.fields[imb]}"),
            ]
        cols += [TextColumn("eta"), TimeRemainingColumn()]
        return Progress(*cols, console=self.console, transient=False)

    def __enter__(self) -> RunProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def print(self, text: str) -> None:
        """A message above the bars (or a plain line)."""
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def add(self, label: str, total: int, completed: int = 0) -> None:
        arm = _Arm(total=int(total), start_step=int(completed), step=int(completed))
        self.arms[label] = arm
        if self.bar is not None:
            arm.task = self.bar.add_task(
                label, total=total, completed=completed, loss="-", val="-", tps="-", imb="-"
            )
        elif self.enabled:
            start = f" from step {completed}" if completed else ""
            self.print(f"{label}: training {total} steps{start}")

    def update(self, label: str, report: dict[str, Any]) -> None:
        arm = self.arms.get(label)
        if arm is None or not self.enabled:
            return
        arm.step = int(report.get("step", arm.step))
        if self.bar is not None:
            fields = {
                "loss": _f(report.get("loss"), ".3f"),
                "tps": _f(report.get("tokens_per_s"), ",.0f"),
                "imb": _f(report.get("imbalance"), ".2f"),
            }
            if "val_loss" in report:
                fields["val"] = _f(report["val_loss"], ".3f")
            self.bar.update(arm.task, completed=arm.step, **fields)
        elif "val_loss" in report:  # plain output: one line per evaluation
            self.print(
                f"{label}: step {arm.step}/{arm.total}  loss {_f(report.get('loss'), '.3f')}  "
                f"val {_f(report['val_loss'], '.3f')}  {_f(report.get('tokens_per_s'), ',.0f')} {self.throughput}  "
                f"max/mean load {_f(report.get('imbalance'), '.2f')}  "
                f"elapsed {fmt_duration(time.perf_counter() - arm.t0)}  eta {fmt_duration(arm.eta())}"
            )

    def finish(self, label: str, val_loss: float | None = None) -> None:
        arm = self.arms.get(label)
        if arm is None or not self.enabled:
            return
        if self.bar is not None:
            fields = {"val": _f(val_loss, ".3f")} if val_loss is not None else {}
            self.bar.update(arm.task, completed=arm.total, **fields)
        else:
            val = f", val loss {_f(val_loss, '.4f')}" if val_loss is not None else ""
            self.print(f"{label}: done in {fmt_duration(time.perf_counter() - arm.t0)}{val}")
