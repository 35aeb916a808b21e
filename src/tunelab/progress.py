"""Progress as a user sees it: a rich bar on a terminal, plain lines in a log file.

Training, evaluation and assessment each show how far they are and how long is left. On a
terminal that is a bar redrawn in place; where output goes to a file (a job's log, ``nohup``),
a redrawn bar is noise, so the same facts come as lines: step, loss, lr, grad norm, elapsed and
ETA for training, one line per finished model and prompt variant for evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``: how long, readable at a glance."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def training_line(step: int, total: int, status: str, *, elapsed_s: float,
                  steps_done: int) -> str:
    """A log-file progress line: ``step 40/100  loss ... lr ... grad norm ...  elapsed 1m10s
    ETA 1m45s``; the ETA from this call's own pace (a resumed run's earlier steps took no time
    here)."""
    remaining = (total - step) * elapsed_s / steps_done if steps_done else 0.0
    return (f"step {step}/{total}  {status}  elapsed {duration(elapsed_s)}  "
            f"ETA {duration(remaining)}")


@contextmanager
def progress_bar(console: Console, description: str, total: int,
                 unit: str = "examples") -> Iterator[Callable[[int], None]]:
    """A bar for one piece of work of ``total`` items; yields ``advance(n)``. On a terminal the
    finished bar stays on screen; elsewhere one line says what was done and how long it took.
    """
    started = time.perf_counter()
    live = console.is_terminal
    bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False, disable=not live)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
    if not live and not console.quiet:
        console.print(f"{description}: {total} {unit} in "
                      f"{duration(time.perf_counter() - started)}", highlight=False)
