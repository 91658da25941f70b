"""Training runs side by side, from the JSON-lines logs examples/pretrain_gpt.py writes (--log-file):
what switching seqpipe on changed in loss, throughput and memory.

The first run is the reference: the per-step loss difference of every other run is taken against it
(on the iterations both logged). Mean tokens/s is time-weighted (tokens over seconds) and leaves out
the first iteration of a run, which pays for warm-up (allocations, first communication); with a
single iteration there is nothing else to count. A log appended to by a resumed run keeps the
last record of each iteration.
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

MIB = 2 ** 20
TRAINING_KEYS = ("loss", "seconds", "tokens_per_s")


@dataclass
class Run:
    name: str
    loss: Dict[int, float] = field(default_factory=dict)
    seconds: Dict[int, float] = field(default_factory=dict)
    tokens_per_s: Dict[int, float] = field(default_factory=dict)
    peak_memory_bytes: Dict[int, float] = field(default_factory=dict)
    valid_loss: Dict[int, float] = field(default_factory=dict)

    @property
    def iterations(self):
        return sorted(self.loss)


def read_run(path, name=None) -> Run:
    """A run from its log; a line that is not a JSON record with an iteration is a ValueError
    naming the file and line, as is a log without training records."""
    run = Run(name or os.path.splitext(os.path.basename(path))[0])
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{number}: not a run-log record (a JSON object with an iteration)") from None
            if "valid_loss" in record:
                run.valid_loss[iteration] = record["valid_loss"]
            if all(key in record for key in TRAINING_KEYS):
                for key in (*TRAINING_KEYS, "peak_memory_bytes"):
                    if key in record:
                        getattr(run, key)[iteration] = record[key]
    if not run.loss:
        raise ValueError(f"{path}: no training records (with {', '.join(TRAINING_KEYS)})")
    return run


def mean_tokens_per_s(run: Run) -> float:
    iterations = run.iterations[1:] or run.iterations
    tokens = sum(run.tokens_per_s[i] * run.seconds[i] for i in iterations)
    return tokens / sum(run.seconds[i] for i in iterations)


def loss_difference(run: Run, reference: Run) -> Dict[int, float]:
    """run's loss minus the reference's, per iteration both logged."""
    return {i: run.loss[i] - reference.loss[i] for i in run.iterations if i in reference.loss}


@dataclass
class Summary:
    name: str
    iterations: int
    final_loss: float
    mean_tokens_per_s: float
    speedup: float  # mean tokens/s over the reference's
    peak_memory_mib: Optional[float]
    max_abs_loss_difference: Optional[float]  # against the reference; None for the reference itself
    common_iterations: int


def summarize(runs: Sequence[Run]) -> List[Summary]:
    reference = runs[0]
    base = mean_tokens_per_s(reference)
    rows = []
    for k, run in enumerate(runs):
        diff = loss_difference(run, reference)
        rows.append(Summary(
            name=run.name, iterations=len(run.loss), final_loss=run.loss[run.iterations[-1]],
            mean_tokens_per_s=mean_tokens_per_s(run), speedup=mean_tokens_per_s(run) / base,
            peak_memory_mib=max(run.peak_memory_bytes.values()) / MIB if run.peak_memory_bytes else None,
            max_abs_loss_difference=max(map(abs, diff.values()), default=math.nan) if k else None,
            common_iterations=len(diff)))
    return rows


def format_table(rows: Sequence[Summary]) -> str:
    header = (f"{'run':<24} {'iters':>6} {'final loss':>11} {'tokens/s':>10} {'x first':>8} {'peak MiB':>9} "
              f"{'max |dloss|':>12}")
    lines = [header, "-" * len(header)]
    for row in rows:
        memory = f"{row.peak_memory_mib:9.0f}" if row.peak_memory_mib is not None else f"{'-':>9}"
        if row.max_abs_loss_difference is None:
            diff = f"{'(reference)':>12}"
        elif row.common_iterations:
            diff = f"{row.max_abs_loss_difference:12.3g}"
        else:
            diff = f"{'no common':>12}"
        lines.append(f"{row.name:<24} {row.iterations:>6} {row.final_loss:11.4f} {row.mean_tokens_per_s:10.0f} "
                     f"{row.speedup:7.2f}x {memory} {diff}")
    return "\n".join(lines)


def plot(runs: Sequence[Run], path):
    """Loss, tokens/s and the loss difference to the first run against the iteration, side by side."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training nodes
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax, diff_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, run in enumerate(runs):
        its = run.iterations
        (line,) = loss_ax.plot(its, [run.loss[i] for i in its], label=run.name)
        if run.valid_loss:
            valid = sorted(run.valid_loss)
            loss_ax.plot(valid, [run.valid_loss[i] for i in valid], "o--", color=line.get_color(),
                         label=f"{run.name} (validation)")
        speed_ax.plot(its, [run.tokens_per_s[i] for i in its], color=line.get_color(), label=run.name)
        if k:
            diff = loss_difference(run, runs[0])
            diff_ax.plot(sorted(diff), [diff[i] for i in sorted(diff)], color=line.get_color(), label=run.name)
    diff_ax.axhline(0.0, color="gray", linewidth=0.8)
    for ax, title in ((loss_ax, "loss"), (speed_ax, "tokens/s"), (diff_ax, f"loss - loss of {runs[0].name}")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines and (ax is not diff_ax or len(runs) > 1):
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
