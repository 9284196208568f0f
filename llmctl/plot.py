"""Loss curves as a PNG: training and validation loss against steps and against tokens.

One figure, two panels side by side (loss vs optimizer step, loss vs tokens seen), one
colour per run — training loss a solid line, validation loss dashed with markers — so
several runs overlay for comparison: steps compare schedules, tokens compare runs with
different batch sizes fairly. The data is each run's metrics.jsonl, read with
`llmctl.runs.read_metrics`.

matplotlib is an optional extra (`pip install "llmctl[plot]"`): a missing one is one line
naming the extra. Only the object-oriented API with the Agg canvas is used — no pyplot, no
global backend state, no display needed — and the PNG is written to a temporary file then
renamed, so an existing picture is replaced whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.atomic import atomic_write
from llmctl.errors import ConfigError, LlmctlError
from llmctl.runs import is_run_dir, read_metrics

EXTRA_HINT = 'pip install "llmctl[plot]"'
DEFAULT_RUNS_DIR = Path("experiments/runs")


@dataclass
class Curves:
    """One run's points: training loss at logged steps, validation loss at evaluations."""

    name: str
    train_steps: list[int] = field(default_factory=list)
    train_tokens: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_tokens: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_mixture_loss: list[float] = field(default_factory=list)  # with counts mixed in, where configured

    @property
    def points(self) -> int:
        return len(self.train_loss) + len(self.val_loss)


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise LlmctlError(f"plotting needs matplotlib, which is not installed: {EXTRA_HINT}") from None
    return matplotlib


def resolve_run(run: str | Path) -> Path:
    """A run directory, or a run name under experiments/runs."""
    path = Path(run).expanduser()
    if path.is_file() and path.name == "metrics.jsonl":
        path = path.parent
    if not path.exists() and (DEFAULT_RUNS_DIR / str(run)).is_dir():
        path = DEFAULT_RUNS_DIR / str(run)
    if not path.is_dir():
        raise ConfigError(f"run not found: {run}; pass a run directory (e.g. experiments/runs/demo) or a "
                          f"run name under {DEFAULT_RUNS_DIR}")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl, config.toml or status.json)")
    return path


def load_curves(run_dir: Path, name: str | None = None) -> Curves:
    train, evals = read_metrics(run_dir)
    curves = Curves(name or run_dir.name)
    for r in train:
        if isinstance(r.get("loss"), (int, float)):
            curves.train_steps.append(r["step"])
            curves.train_tokens.append(r.get("tokens", 0))
            curves.train_loss.append(float(r["loss"]))
    for r in evals:
        if isinstance(r.get("val_loss"), (int, float)):
            curves.val_steps.append(r["step"])
            curves.val_tokens.append(r.get("tokens", 0))
            curves.val_loss.append(float(r["val_loss"]))
            if isinstance(r.get("val_mixture_loss"), (int, float)):
                curves.val_mixture_loss.append(float(r["val_mixture_loss"]))
    return curves


def loss_figure(runs: list[Curves]) -> Any:
    """A matplotlib Figure: axes[0] loss vs step, axes[1] loss vs tokens; for run i the lines
    are `<name> train` then `<name> validation` (when it has evaluations), then
    `<name> validation, network + counts` when its config mixes counts in."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_tokens = fig.subplots(1, 2, sharey=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for ax, train_x, val_x in ((by_step, run.train_steps, run.val_steps),
                                   (by_tokens, run.train_tokens, run.val_tokens)):
            if run.train_loss:
                ax.plot(train_x, run.train_loss, color=color, linewidth=1.2, label=f"{run.name} train")
            if run.val_loss:
                ax.plot(val_x, run.val_loss, color=color, linestyle="--", marker="o", markersize=4,
                        linewidth=1.2, label=f"{run.name} validation")
            if len(run.val_mixture_loss) == len(run.val_loss) and run.val_mixture_loss:
                ax.plot(val_x, run.val_mixture_loss, color=color, linestyle=":", marker="s", markersize=4,
                        linewidth=1.2, label=f"{run.name} validation, network + counts")
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("tokens")
    by_tokens.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000
    by_step.set_ylabel("loss (nats per token)")
    for ax in (by_step, by_tokens):
        ax.grid(True, alpha=0.3)
    by_step.legend(fontsize="small")
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"{title}: training and validation loss")
    return fig


def save_png(fig: Any, out: Path) -> None:
    """Write the figure as PNG at `out`, atomically (temp file in the same folder, then rename)."""
    atomic_write(out, lambda f: fig.savefig(f, format="png"))


def plot_runs(runs: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Draw the loss curves of one or more runs into one PNG; returns what was drawn."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise ConfigError(f"-o {out}: the plot is a PNG; give a file name ending in .png")
    require_matplotlib()  # before reading anything: the one missing piece is named first
    if not runs:
        raise ConfigError("name at least one run directory to plot")
    dirs = [resolve_run(r) for r in runs]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):  # same-named runs from different folders: tell them apart
        names = [str(d) for d in dirs]
    curves = [load_curves(d, n) for d, n in zip(dirs, names)]
    empty = [c.name for c in curves if c.points == 0]
    if empty:
        raise LlmctlError(f"nothing to plot for {', '.join(empty)}: metrics.jsonl has no loss records yet")
    fig = loss_figure(curves)
    save_png(fig, out)
    return {"output": str(out), "runs": [{"name": c.name, "train_points": len(c.train_loss),
                                          "val_points": len(c.val_loss)} for c in curves]}
