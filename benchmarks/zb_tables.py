"""Deeper pipelines than this machine can run, simulated from its own profile: stock 1F1B (slice-1f1b
with one slice per micro-batch), unsliced ZB-H1 (slice-zb with one slice), slice-1f1b and slice-zb
with k uniform slices, at 4 and 8 stages; each step as a fraction of the bubble-free ideal.

    python benchmarks/zb_tables.py runs/bench-b1/latency_model.json [--stages 4 8] [--micro-batches 1 8]

The latency model is the one ``seqpipe-bench`` (or ``seqpipe-plan fit``) fitted on this machine, with
its measured W. Every stage runs the profiled stage's layers, the first adds the embedding and the
last the LM head and loss (``CostModel.from_latency_model``); sends are the measured p2p times. The
ideal is the fullest stage's compute alone (every F, B and W of the step, no sends, no waiting), of
the row's own slicing (slices cost a little more in all than the whole sequence: "x stock" compares
the steps themselves); the optimizer step is left out. These are predictions of the one cost model,
not measurements.
"""
import argparse
from dataclasses import replace

from seqpipe_ds.planner.costs import CostModel
from seqpipe_ds.planner.fit import read_model_file
from seqpipe_ds.slicing import make_plan

ROWS = [("stock 1F1B", "slice-1f1b", False), ("ZB-H1 (unsliced)", "slice-zb", False),
        ("slice-1f1b", "slice-1f1b", True), ("slice-zb", "slice-zb", True)]


def table(costs: CostModel, seq_length: int, micro_batches: int, slices) -> list:
    """(row name, k, fraction of the ideal, makespan, ideal) for every row of ROWS and slice count."""
    out = []
    for name, schedule, sliced in ROWS:
        for k in (slices if sliced else [1]):
            plan = make_plan(1, k, micro_batch_size=1, seq_length=seq_length)
            times = costs.unit_times(plan)
            ideal = micro_batches * max(sum(sum(times[stage, unit]) for unit in plan.units())
                                        for stage in range(costs.stages))
            makespan = costs.simulate(schedule, micro_batches, plan).makespan
            out.append((name, k, ideal / makespan, makespan, ideal))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file")
    p.add_argument("--stages", type=int, nargs="+", default=[4, 8])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--slices", type=int, nargs="+", default=[4, 8])
    args = p.parse_args(argv)
    found = read_model_file(args.model_file)
    config = found.config
    seq = config["seq_length"]
    print(f"profiled stage: {config['num_layers']} layers, hidden {config['hidden_size']}, seq {seq}; device "
          f"{found.device}; W measured: {found.model.weight_time(1, 1, False) is not None}")
    for stages in args.stages:
        costs = replace(CostModel.from_latency_model(found.model, stages, config["hidden_size"]), step=0.0)
        for m in args.micro_batches:
            print(f"\n{stages} stages, {m} micro-batch(es) of one sequence")
            print(f"{'schedule':<18} {'slices':>6} {'of ideal':>9} {'x stock':>8} {'step s':>9} {'ideal s':>9}")
            rows = table(costs, seq, m, args.slices)
            for name, k, fraction, makespan, ideal in rows:
                print(f"{name:<18} {k:>6} {fraction:>9.3f} {rows[0][3] / makespan:>7.2f}x {makespan:>9.3f} "
                      f"{ideal:>9.3f}")


if __name__ == "__main__":
    main()
