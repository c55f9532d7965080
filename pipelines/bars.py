"""er's progress bars: live in a terminal, sparse in a log file.

In a terminal (or a notebook's widget) a bar redraws in place. In a file (a Ray job's log, CI,
`2> log`) each redraw is one more line, so there it redraws at most every LOG_EVERY seconds: its
first state is always written, and its last when the bar stays (leave=True).
"""

from __future__ import annotations

import sys

LOG_EVERY = 30.0  # seconds between redraws when the bar's stream is not a terminal


def bar(file=None, **kw):
    """A tqdm bar on `file` (stderr by default) that redraws as often as its stream can take."""
    from tqdm import autonotebook, std
    from tqdm.auto import tqdm

    file = file or sys.stderr
    widget = autonotebook.tqdm is not std.tqdm  # in a notebook: it adds no lines
    every = 0.1 if widget or _is_terminal(file) else LOG_EVERY
    # tqdm's monitor thread redraws a bar idle for maxinterval: never sooner than `every`.
    return tqdm(file=file, mininterval=every, maxinterval=max(10.0, every), dynamic_ncols=True, **kw)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
