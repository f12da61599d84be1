"""Render a job's loss curve (train and eval loss against step, learning rate on a second axis) as a PNG; below it,
for the preference and RL methods, the method's own curve (grpo's mean reward, the others' reward margin).

matplotlib with the headless Agg backend, imported only when a plot is asked for.
"""

from __future__ import annotations

import io
from typing import Any


def loss_curve_png(points: list[dict[str, Any]], *, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    method = _method_curve(points)
    fig = Figure(figsize=(7, 6.5 if method else 4), dpi=100)
    ax = fig.add_subplot(2, 1, 1) if method else fig.add_subplot()
    train = [(p["step"], p["loss"]) for p in points if p["loss"] is not None]
    evals = [(p["step"], p["eval_loss"]) for p in points if p["eval_loss"] is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(p["step"], p["learning_rate"]) for p in points if p["learning_rate"] is not None]
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lrs), "--", color="tab:gray", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        more_handles, more_labels = ax_lr.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    if method:
        name, curve = method
        ax_m = fig.add_subplot(2, 1, 2, sharex=ax)
        ax_m.plot(*zip(*curve), ".-", color="tab:green", label=name)
        ax_m.set_xlabel("step")
        ax_m.set_ylabel(name)
        ax_m.grid(alpha=0.3)
        ax_m.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _method_curve(points: list[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]] | None:
    """The method's headline metric against step: grpo's mean reward, or the reward margin of dpo, orpo, kto."""
    for name in ("reward", "rewards/margins"):
        curve = [(p["step"], p["metrics"][name]) for p in points if (p.get("metrics") or {}).get(name) is not None]
        if curve:
            return ("mean reward" if name == "reward" else "reward margin"), curve
    return None
