"""PNG plots of a migrate-test (matplotlib, Agg backend: no display on a lab controller)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(path: Path, rounds: list[dict[str, Any]], title: str) -> None:
    """Dirty pages and MiB sent per round (log scale: round 0 dwarfs the rest)."""
    plt = _plt()
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    xs = list(range(len(rounds)))
    labels = [("F" if r["kind"] == "final" else str(r["round"])) for r in rounds]
    colors = ["tab:red" if r["kind"] == "final" else "tab:blue" for r in rounds]
    ax1.bar(xs, [max(r["pages"], 0.5) for r in rounds], color=colors, alpha=0.8)
    ax1.set_yscale("log")
    ax1.set_xticks(xs, labels)
    ax1.set_xlabel("round (F = final, source frozen)")
    ax1.set_ylabel("pages sent")
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["bytes"] / 2**20 for r in rounds], "k.-", label="MiB")
    ax2.set_yscale("symlog", linthresh=0.01)
    ax2.set_ylabel("MiB sent")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(path: Path, rounds: list[dict[str, Any]], freeze_t: float | None,
                  resumed_t: float | None, title: str,
                  stall: list[float] | None = None) -> None:
    """One bar per round from command to applied on the destination; the downtime span shaded;
    with --tcp, the client's longest stall (no record arriving) hatched beside it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for i, r in enumerate(rounds):
        start, end = r.get("t_start"), r.get("t_end")
        if start is None or end is None:
            continue
        color = "tab:red" if r["kind"] == "final" else "tab:blue"
        ax.barh(i, max(end - start, 1e-4), left=start, color=color, alpha=0.8)
    if freeze_t is not None and resumed_t is not None:
        ax.axvspan(freeze_t, resumed_t, color="orange", alpha=0.35,
                   label=f"downtime {1000 * (resumed_t - freeze_t):.1f} ms")
    if stall:
        ax.axvspan(stall[0], stall[1], ymin=0.0, ymax=0.5, facecolor="none",
                   edgecolor="tab:purple", hatch="//",
                   label=f"TCP client stall {1000 * (stall[1] - stall[0]):.1f} ms")
    if (freeze_t is not None and resumed_t is not None) or stall:
        ax.legend(loc="upper left")
    ax.set_yticks(range(len(rounds)),
                  [("final" if r["kind"] == "final" else f"round {r['round']}") for r in rounds])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the start of the run")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matrix(path: Path, rows: list[dict[str, Any]]) -> None:
    """Downtime (pre-copy vs stop-and-copy) and rounds per grid cell."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    xs = list(range(len(rows)))
    w = 0.38
    pre = [r.get("downtime_ms") or 0 for r in rows]
    sc = [r.get("stop_copy_downtime_ms") or 0 for r in rows]
    ax.bar([x - w / 2 for x in xs], pre, w, label="pre-copy downtime")
    ax.bar([x + w / 2 for x in xs], sc, w, label="stop-and-copy downtime")
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_xticks(xs, [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r.get('rounds', '?')} rd", (x - w / 2, max(pre[x], 0.1)),
                    ha="center", va="bottom", fontsize=7)
    ax.legend()
    ax.set_title("migrate-test matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
