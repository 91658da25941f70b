"""PNG Gantt chart of a timeline, predicted or measured (one row per stage)."""
import textwrap
from typing import Sequence, Tuple

from ..schedules import Segment
from ..schedules.actions import BACKWARD, FORWARD, STEP, WEIGHT

COLORS = {FORWARD: ("tab:blue", "forward"), BACKWARD: ("tab:orange", "backward"),
          WEIGHT: ("tab:green", "weight gradient (W)"), STEP: ("tab:gray", "step")}


def draw_gantt(panels: Sequence[Tuple[str, Sequence[Segment]]], path: str) -> None:
    """One panel per (title, segments), stacked on a shared time axis (e.g. measured over simulated)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stages = 1 + max(s.stage for _, segments in panels for s in segments)
    height = max(2.0, 0.3 * stages + 1.2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, height * len(panels)), sharex=True, squeeze=False)
    for ax, (title, segments) in zip(axes[:, 0], panels):
        for kind, (color, label) in COLORS.items():
            bars = [(s.start, s.end - s.start) for s in segments if s.kind == kind]
            rows = [s.stage for s in segments if s.kind == kind]
            for row in sorted(set(rows)):
                ax.broken_barh([bar for bar, r in zip(bars, rows) if r == row], (row - 0.4, 0.8), facecolors=color,
                               edgecolors="white", linewidth=0.3, label=label if row == min(rows) else None)
        ax.set_ylim(stages - 0.5, -0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("stage")
        ax.set_title("\n".join(textwrap.fill(line, 110) for line in title.splitlines()), fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0))
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
