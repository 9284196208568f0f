"""What a training run keeps on disk: the Trainer callback that writes its checkpoints
(`llmctl.checkpoint` holds the file format) and retention, which deletes old step
checkpoints (`keep_last`) but never the final one nor the one with the best validation loss.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from llmctl.checkpoint import checkpoint_path, remove_partial_files, save_checkpoint, step_checkpoints
from llmctl.config import Config
from llmctl.data.tokenizer import TextTokenizer
from llmctl.trainer import Callback, Trainer


class CheckpointCallback(Callback):
    """Writes `<run>-<stage>_step{N}.pt` and `<run>-<stage>_final.pt`, each self-contained,
    and applies retention: the `keep_last` newest step checkpoints and the best-validation one.

    A checkpoint written only to guard an evaluation (the trainer saves before every eval) is
    deleted once that eval has scored it, unless it is the best so far: so the best
    validation weights are always on disk even when evals and saves do not line up."""

    def __init__(self, run_dir: Path, cfg: Config, stage: str, tokenizer: TextTokenizer,
                 data_meta: dict[str, Any], keep_last: int, extra: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.extra = extra or {}  # stage-specific plain values saved in every checkpoint (sft: template)
        self.cfg = cfg
        self.stage = stage
        self.tokenizer = tokenizer
        self.data_meta = data_meta
        self.keep_last = keep_last
        self.last_path: Path | None = None  # the newest good checkpoint (set to the resumed one on resume)
        self._guards: set[int] = set()  # steps saved only to guard an evaluation

    def on_fit_start(self, trainer: Trainer) -> None:
        remove_partial_files(self.run_dir)

    def on_save(self, trainer: Trainer, final: bool) -> None:
        path = checkpoint_path(self.run_dir, self.cfg.run.name, self.stage, None if final else trainer.step)
        save_checkpoint(path, {
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.to_state(),
            "data": {"sources": self.data_meta["sources"], "tokens": self.data_meta["tokens"],
                     **({"fingerprint": self.data_meta["fingerprint"]} if "fingerprint" in self.data_meta else {})},
            **self.extra,
            **trainer.state_dict(),
        })
        self.last_path = path
        if getattr(trainer, "save_reason", "schedule") == "eval":
            self._guards.add(trainer.step)
        self.prune(trainer, final)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.prune(trainer)  # this evaluation may have made another checkpoint the best

    def best_step(self, trainer: Trainer) -> int | None:
        return best_checkpoint_step(trainer.history, {s for s, _ in step_checkpoints(self.run_dir, self.stage)})

    def prune(self, trainer: Trainer, final: bool = False) -> None:
        """Drop eval-guard checkpoints once scored (unless best, or made redundant by the final
        one), then apply keep_last, never touching the best one or a guard awaiting its eval."""
        best = self.best_step(trainer)
        scored = {h["step"] for h in trainer.history}
        for step in sorted(self._guards):
            if (final and step == trainer.step) or (step in scored and step != best):
                with contextlib.suppress(OSError):
                    checkpoint_path(self.run_dir, self.cfg.run.name, self.stage, step).unlink()
                self._guards.discard(step)
        if self.keep_last > 0:
            best = self.best_step(trainer)
            prune_step_checkpoints(self.run_dir, self.stage, self.keep_last, {best} if best is not None else set(),
                                   ignore=self._guards)


def best_checkpoint_step(history: list[dict[str, Any]], steps: set[int]) -> int | None:
    """The step, among `steps` that have a checkpoint, whose evaluation had the lowest loss.

    An evaluation at step s runs right after the checkpoint of step s is saved, on the same
    weights, so it scores that checkpoint."""
    scored = [(h["val_loss"], h["step"]) for h in history
              if h["step"] in steps and isinstance(h.get("val_loss"), float) and math.isfinite(h["val_loss"])]
    return min(scored)[1] if scored else None


def prune_step_checkpoints(run_dir: Path, stage: str, keep_last: int, protect: set[int] = frozenset(),
                           ignore: set[int] = frozenset()) -> None:
    """Keep the `keep_last` newest step checkpoints of a stage, plus those at `protect` steps;
    steps in `ignore` neither count nor get deleted; final checkpoints are never touched."""
    if keep_last <= 0:
        return
    counted = [(step, path) for step, path in step_checkpoints(run_dir, stage) if step not in ignore]
    for step, old in counted[:-keep_last]:
        if step not in protect:
            with contextlib.suppress(OSError):
                old.unlink()
