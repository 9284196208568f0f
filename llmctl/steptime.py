"""Seconds per optimizer step, for an ETA, from the wall clock alone.

Reading the clock costs nothing and needs no device sync, so the ETA can follow every step.
The first step of a fit carries compilation and warm-up (tens of seconds where a step then
takes one), so it alone sets the rate only until a second step completes; from then on the
rate is the mean over the steps after the first. Pauses between steps (evaluations, saves)
count, since they recur until the end too.
"""

from __future__ import annotations


class StepClock:
    def __init__(self, start_step: int, started: float):
        self.start_step = start_step
        self.started = started  # when the fit's first step began
        self.first_done: float | None = None  # when that first step ended
        self.step, self.now = start_step, started

    def tick(self, step: int, now: float) -> None:
        """Step `step` has just completed at time `now` (time.perf_counter())."""
        if self.first_done is None:
            self.first_done = now
        self.step, self.now = step, now

    def seconds_per_step(self) -> float | None:
        """None before the first step of this fit has completed."""
        done = self.step - self.start_step
        if done <= 0 or self.first_done is None:
            return None
        if done == 1:
            return self.now - self.started
        return (self.now - self.first_done) / (done - 1)

    def eta(self, steps_left: int) -> float | None:
        per_step = self.seconds_per_step()
        return None if per_step is None else max(0, steps_left) * per_step
