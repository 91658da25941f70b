"""``seqpipe-compare``: training runs side by side from examples/pretrain_gpt.py's --log-file logs, e.g.
stock DeepSpeed pipelining against seqpipe:

    seqpipe-compare runs/stock.jsonl runs/seqpipe.jsonl --png runs/compare.png

prints a summary table (iterations, final loss, mean tokens/s and its ratio to the first run, peak
memory, the largest per-step loss difference to the first run) and with --png draws the loss and
tokens/s curves and the per-step loss difference side by side. The work is seqpipe_ds.compare's.
"""
import argparse

from seqpipe_ds.compare import format_table, plot, read_run, summarize


def build_parser():
    parser = argparse.ArgumentParser(prog="seqpipe-compare", allow_abbrev=False,
                                     description="Compare training runs from their JSON-lines logs; the first "
                                                 "is the reference.")
    parser.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="--log-file of examples/pretrain_gpt.py")
    parser.add_argument("--labels", nargs="+", default=None, help="names for the runs (default: file names)")
    parser.add_argument("--png", default=None, help="write the curves to this PNG file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels names {len(args.labels)} runs, but {len(args.runs)} were given")
    try:
        runs = [read_run(path, name) for path, name in zip(args.runs, args.labels or [None] * len(args.runs))]
    except (OSError, ValueError) as error:
        parser.exit(2, f"seqpipe-compare: error: {error}\n")
    print(format_table(summarize(runs)))
    print("mean tokens/s leaves out each run's first (warm-up) iteration; peak MiB is rank 0's")
    if args.png:
        plot(runs, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
