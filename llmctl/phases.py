"""What a stage is doing before its first step.

Loading the tokenizer, tokenizing, building the model, finding a micro-batch: on a real preset
these take minutes, and a screen that says nothing meanwhile reads as a hang. `Phases` shows
the phase under way: on a terminal one Rich spinner line ("tokenizing wikitext-2 …"),
otherwise one plain line per phase as it begins (no escape codes, so a piped log stays
line-based and a stuck run shows where it stuck). It keeps every phase with its start time,
because the run's training.log, where they belong too, is only created once every input has
been checked: `log_to` then writes the ones so far and every later one there.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.status import Status
from rich.text import Text


class Phases:
    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal and not console.quiet
        self.history: list[tuple[datetime.datetime, str]] = []
        self._status: Status | None = None
        self._log: Callable[[str, datetime.datetime], None] | None = None

    def log_to(self, write: Callable[[str, datetime.datetime], None]) -> None:
        """Send the phases so far, and those to come, to `write(line, began)` (a RunLog's)."""
        self._log = write
        for began, text in self.history:
            write(text, began)

    def __call__(self, text: str) -> None:
        """Phase `text` begins (and the one before it has ended); `text` ends with " …"."""
        began = datetime.datetime.now()
        self.history.append((began, text))
        if self._log is not None:
            self._log(text, began)
        if not self.live:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        elif self._status is None:
            self._status = Status(Text(text), console=self.console)  # Text: names with [brackets] stay literal
            self._status.start()
        else:
            self._status.update(Text(text))

    def stop(self) -> None:
        """Take the spinner off the screen (it is transient); the next phase brings it back."""
        if self._status is not None:
            self._status.stop()
            self._status = None

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Make way for another live display (Rich shows one at a time), e.g. the token store's bars."""
        self.stop()
        yield

    def __enter__(self) -> "Phases":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def approx_count(n: int) -> str:
    """A count the way a person says it: 30M, 3.3M, 120K, 512."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)
