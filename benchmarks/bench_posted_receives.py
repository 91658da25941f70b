"""How long a receive waits for a message that was sent while the receiver computed: posted only
when the receiver gets to it (DeepSpeed's ``p2p.recv``) against posted ahead (``irecv`` before
the compute, as ``lowering.receive_posts`` has the engine do).

    python benchmarks/bench_posted_receives.py [--messages 30] [--repeats 2] [--out FILE]

Two gloo processes, one thread each. Stage 0 computes ~30 ms and sends a 512 KiB activation
(256 tokens x 512 hidden, fp32: one slice of seqpipe-bench's model), ``--messages`` times; stage
1 computes a little longer between its receives, so each message is on its way before the receive.
Prints the receive's wait per message (median, min-max) for each way, the two alternating.
"""
import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS, HIDDEN = 256, 512


def _compute(ms, a, w):
    start = time.perf_counter()
    while time.perf_counter() - start < ms / 1e3:
        a.matmul(w)


def _worker(rank, port, messages, posted, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    a, w = torch.randn(TOKENS, 1536), torch.randn(1536, 1536)
    dist.barrier()
    if rank == 0:
        message, works = torch.randn(TOKENS, HIDDEN), []
        for _ in range(messages):
            _compute(30, a, w)
            works.append(dist.isend(message, 1))
        for work in works:
            work.wait()
    else:
        buffers = [torch.empty(TOKENS, HIDDEN) for _ in range(messages)]
        works = [dist.irecv(b, 0) for b in buffers] if posted else None
        waits = []
        _compute(35, a, w)
        for i in range(messages):
            start = time.perf_counter()
            works[i].wait() if posted else dist.recv(buffers[i], 0)
            waits.append(1e3 * (time.perf_counter() - start))
            _compute(32, a, w)
        queue.put(waits)
    dist.barrier()
    dist.destroy_process_group()


def _run(messages, posted, port):
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_worker, args=(r, port, messages, posted, queue)) for r in (0, 1)]
    for p in processes:
        p.start()
    waits = queue.get(timeout=300)
    for p in processes:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"a worker failed (exit {p.exitcode})")
    return waits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    lines = [f"$ python benchmarks/bench_posted_receives.py --messages {args.messages} --repeats {args.repeats}",
             f"machine: {cpu}, {os.cpu_count()} cores; {TOKENS}x{HIDDEN} fp32 messages, gloo, 1 thread per process",
             "receive wait per message, ms: median (min-max)"]
    port = 29700 + os.getpid() % 200
    for repeat in range(args.repeats):
        for posted in (False, True):
            waits = _run(args.messages, posted, port)
            port += 1
            label = "posted ahead (irecv before the compute)" if posted else "posted on arrival (recv)"
            lines.append(f"  run {repeat + 1}, {label:<42} {statistics.median(waits):6.2f} "
                         f"({min(waits):.2f}-{max(waits):.2f})")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
