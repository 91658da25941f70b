"""The comparison a memory-bound user faces (``seqpipe-bench --memory-limit``): under one per-stage
limit on model states plus activations, the fastest configuration each side is predicted to fit,
and what each gave up against its own fastest configuration without the limit.

* Stock DeepSpeed pipelining runs unsliced 1F1B; it chooses the micro-batch size and the
  recomputation mode (``search.stock_candidates``).
* seqpipe chooses the schedule, the micro-batch split, the slicing and the recomputation mode
  (``search.search``).

Both are priced by the one (calibrated) cost model and the memory model of each mode
(``planning.cost_model``, ``planning.memory_by_mode``). seqpipe's side is offered "none" and
"selective" by default: under "full" its KV cache keeps every layer's K/V outside autograd (the
memory model counts it), which the bench's saved-tensor meter would not see, so the measured peak
would not be the whole peak.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .costs import Candidate
from .fit import ModelFile
from .planning import cost_model, makespan_plan, memory_by_mode, measured_modes, timed_micro_batches
from .search import SCHEDULE_NAMES, fastest_fitting, stock_candidates

SEQPIPE_MODES = ("none", "selective")  # the modes whose activations SavedTensorMeter sees whole on seqpipe's side


@dataclass(frozen=True)
class Pick:
    """One side's fastest configuration within the limit, and without it."""
    within: Candidate
    unlimited: Candidate

    def gave_up(self) -> str:
        """What fitting cost: the choices that differ from the unlimited pick, and the predicted time."""
        a, b = self.within, self.unlimited
        changes = [f"recompute {a.recompute}" if a.recompute != b.recompute else "",
                   f"micro-batches of {a.micro_batch_size} (not {b.micro_batch_size})"
                   if a.micro_batch_size != b.micro_batch_size else "",
                   "its slicing or schedule" if (a.schedule, a.plan) != (b.schedule, b.plan)
                   and a.micro_batch_size == b.micro_batch_size else ""]
        changes = [c for c in changes if c]
        if not changes:
            return "nothing"
        return f"{', '.join(changes)}: predicted {a.makespan / b.makespan - 1:+.0%} step time"


@dataclass(frozen=True)
class Budget:
    limit: float  # bytes per stage
    stock: Pick
    seqpipe: Pick


def stock_need(found: ModelFile, stages: int, batch_size: int, num_model_layers: Optional[int] = None) -> float:
    """The per-stage peak of stock's fastest configuration without recomputation: what it needs
    before a limit forces a trade (``--memory-limit 0.85x`` is 0.85 of it)."""
    seq_len = found.config["seq_length"]
    memory = memory_by_mode(found, stages, seq_len, ("none",), num_model_layers)
    if memory is None:
        raise ValueError("the latency model records no saved bytes per token: re-profile (seqpipe-plan profile) to "
                         "compare under a memory limit")
    return fastest_fitting(stock_candidates(cost_model(found, stages), memory, batch_size, seq_len, ("none",),
                                            timed_micro_batches(found, batch_size)), None).peak


def budget(found: ModelFile, stages: int, batch_size: int, limit: float, num_model_layers: Optional[int] = None,
           schedules: Sequence[str] = SCHEDULE_NAMES, stock_modes: Optional[Sequence[str]] = None,
           seqpipe_modes: Sequence[str] = SEQPIPE_MODES,
           progress: Optional[Callable[[str], None]] = None) -> Budget:
    """Both sides' picks at the profiled sequence length and granularity. ``stock_modes`` default:
    every mode the profile measured. Raises ``search.NoFit`` (naming the side's smallest peak) when
    nothing of a side fits, ValueError for a limit below the model states alone."""
    stock_modes = tuple(stock_modes or measured_modes(found))
    seqpipe_modes = tuple(m for m in seqpipe_modes if m in measured_modes(found))
    config = found.config
    seq_len, granularity = config["seq_length"], config["granularity"]
    memory = memory_by_mode(found, stages, seq_len, sorted(set(stock_modes) | set(seqpipe_modes)), num_model_layers)
    if memory is None:
        raise ValueError("the latency model records no saved bytes per token: re-profile (seqpipe-plan profile) to "
                         "compare under a memory limit")
    memory["none"].check_limit(limit)  # the model states alone: the same in every mode
    stock = stock_candidates(cost_model(found, stages), memory, batch_size, seq_len, stock_modes,
                             timed_micro_batches(found, batch_size))

    def seqpipe(memory_limit):
        return makespan_plan(found, stages, batch_size, seq_len, granularity, schedules, memory, memory_limit,
                             progress=progress, recompute_modes=seqpipe_modes).best
    return Budget(limit, Pick(fastest_fitting(stock, limit), fastest_fitting(stock, None)),
                  Pick(seqpipe(limit), seqpipe(None)))
