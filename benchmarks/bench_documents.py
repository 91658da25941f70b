"""Packed documents: what attention that skips other documents saves one pipeline stage.

One stage's attention (2 GPT layers, hidden 512 = 8 heads of 64, batch 1, fp32, one thread) over a
sequence of documents whose lengths are drawn log-normally (mean 512 tokens, sigma 1, the last one
cut at the sequence end), run the way the engine runs it: k slices, each slice's forwards inside its
``KVCache.slice``, then the backwards in reverse, each fed the dK/dV later slices left on its cache.
Variants, per sequence length and k:

- ``documents``: block attention per (document segment x cached block), ``attention/documents.py``;
- ``causal``: the same slicing with full causal attention (documents ignored), ``attention/blocks.py``;
- ``dense``: unsliced SDPA with the dense document mask (what Megatron-LM and stock DeepSpeed run).

Per variant: ``seconds`` (forward + backward of the attention core of both layers; after one
warm-up round, repetitions alternate over the variants and each keeps its fastest, since on a shared
machine other processes only ever add time), and ``pairs``: the (query, key) score pairs one layer's
kernels compute. Causal blocks count n(n + 1)/2, full blocks n_q x n_k, the dense mask every s^2 pair
(it masks, it does not skip).
``skipped`` is the share of the causal variant's pairs that ``documents`` never computes.

Usage: python benchmarks/bench_documents.py [--seqs 4096 8192] [--slices 1 4 8] [--repeats 3]
           [--out benchmarks/results/documents_cpu]     (writes OUT.txt and OUT.json)
       python benchmarks/bench_documents.py --corpus PREFIX [--documents N]
           (instead: writes a Megatron .bin/.idx corpus of N such documents, byte-level tokens, for the
           end-to-end runs of benchmarks/bench_documents_e2e.sh)
"""
import argparse
import json
import math
import time
from typing import List, Optional

import torch

HEADS, HEAD_DIM, LAYERS = 8, 64, 2


def lognormal(g: torch.Generator, mean: float = 512, sigma: float = 1.0) -> int:
    """One document length (at least 1 token), log-normal with the given mean."""
    mu = math.log(mean) - sigma ** 2 / 2  # the mean of a log-normal is exp(mu + sigma^2 / 2)
    return max(1, round(math.exp(mu + sigma * torch.randn(1, generator=g).item())))


def document_lengths(seq: int, mean: float = 512, seed: int = 0) -> List[int]:
    """Log-normal document lengths packed up to ``seq`` tokens (the last one cut at the end)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < seq:
        lengths.append(min(lognormal(g, mean), seq - sum(lengths)))
    return lengths


def starts_of(lengths: List[int]) -> torch.Tensor:
    """[1, seq] each token's document start, as ``seqpipe_ds.data.document_starts`` gives it."""
    return torch.cat([torch.full((n,), sum(lengths[:i])) for i, n in enumerate(lengths)])[None]


def write_corpus(prefix: str, count: int, mean: float = 512, seed: int = 0) -> None:
    """``count`` documents of random lowercase letters with log-normal token counts (the EOD included)."""
    from seqpipe_ds.data import ByteTokenizer, write_indexed_dataset
    g = torch.Generator().manual_seed(seed)
    docs = ["".join(chr(97 + c) for c in torch.randint(0, 26, (lognormal(g, mean) - 1,), generator=g).tolist())
            for _ in range(count)]
    write_indexed_dataset(docs, ByteTokenizer(), prefix)


def uniform(seq: int, k: int) -> List[int]:
    return [seq // k + (i < seq % k) for i in range(k)]


def run(tensors, slices: Optional[List[int]], starts: Optional[torch.Tensor]) -> None:
    """Forward + backward of every layer's attention; ``slices`` None: unsliced, no cache (dense mask)."""
    from seqpipe_ds.attention import KVCache, attend
    if slices is None:
        for q, k, v, grad in tensors:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            attend(q, k, v, None, 0, starts=starts).backward(grad)
        return
    cache, outputs, grads = KVCache(), [], []
    pieces = [[t.split(slices, dim=2) for t in layer] for layer in tensors]
    for j in range(len(slices)):
        part = None if starts is None else starts.split(slices, dim=1)[j]
        with cache.slice(j):
            outputs.append([attend(*(p[j].detach().requires_grad_() for p in layer[:3]), cache, n, starts=part)
                            for n, layer in enumerate(pieces)])
        grads.append([layer[3][j] for layer in pieces])
    for j in reversed(range(len(slices))):
        torch.autograd.backward(*cache.backward_args(j, outputs[j], grads[j]))
        cache.release(j)


def pairs(seq: int, slices: Optional[List[int]], starts: Optional[torch.Tensor]) -> int:
    """(query, key) pairs one layer's kernels compute."""
    from seqpipe_ds.attention.documents import segment_blocks
    if slices is None:
        return seq * seq
    total = 0
    for j, n in enumerate(slices):
        offset = sum(slices[:j])
        if starts is None:
            total += n * (n + 1) // 2 + n * offset
            continue
        for _, qs, qe, _, ks, ke, causal in segment_blocks(starts[:, offset:offset + n], offset, slices[:j]):
            total += (qe - qs) * (qe - qs + 1) // 2 if causal else (qe - qs) * (ke - ks)
    return total


def measure(seq: int, counts: List[int], repeats: int, mean: float = 512) -> dict:
    lengths = document_lengths(seq, mean)
    starts = starts_of(lengths)
    g = torch.Generator().manual_seed(1)
    tensors = [[torch.randn(1, HEADS, seq, HEAD_DIM, generator=g) for _ in range(4)] for _ in range(LAYERS)]
    variants = {"dense": (None, starts)}
    for k in counts:
        variants[f"documents k={k}"] = (uniform(seq, k), starts)
        variants[f"causal k={k}"] = (uniform(seq, k), None)
    best = {name: math.inf for name in variants}
    for repeat in range(repeats + 1):  # the first round warms the kernels up (seconds for a first masked SDPA)
        for name, (slices, part) in variants.items():
            start = time.perf_counter()
            run(tensors, slices, part)
            if repeat:
                best[name] = min(best[name], time.perf_counter() - start)
    out = {"documents": len(lengths), "mean_length": seq / len(lengths), "variants": {}}
    for name, (slices, part) in variants.items():
        out["variants"][name] = {"seconds": best[name], "pairs": pairs(seq, slices, part)}
    for k in counts:
        docs, causal = out["variants"][f"documents k={k}"], out["variants"][f"causal k={k}"]
        docs["skipped"] = 1 - docs["pairs"] / causal["pairs"]
        docs["vs_causal"] = docs["seconds"] / causal["seconds"]
        docs["vs_dense"] = docs["seconds"] / out["variants"]["dense"]["seconds"]
    return out


def table(results: dict) -> str:
    lines = [f"attention of one stage ({LAYERS} layers, {HEADS} heads x {HEAD_DIM}, batch 1, fp32, "
             f"{torch.get_num_threads()} thread(s)), forward + backward, best of the repetitions; document "
             "lengths log-normal (distribution mean 512, sigma 1), the last one cut at the sequence end",
             f"{'seq':>5}  {'variant':<16} {'seconds':>8} {'pairs (M)':>10} {'skipped':>8} {'x causal':>9} "
             f"{'x dense':>8}"]
    for seq, r in results.items():
        for name, v in r["variants"].items():
            extra = (f"{v['skipped']:>8.1%} {v['vs_causal']:>9.3f} {v['vs_dense']:>8.3f}" if "skipped" in v
                     else f"{'':>8} {'':>9} {'':>8}")
            lines.append(f"{seq:>5}  {name:<16} {v['seconds']:>8.3f} {v['pairs'] / 1e6:>10.2f} {extra}")
        lines.append(f"{'':>5}  ({r['documents']} documents, mean {r['mean_length']:.0f} tokens)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="writes OUT.txt and OUT.json")
    parser.add_argument("--corpus", default=None, help="only write a corpus of such documents to this prefix")
    parser.add_argument("--documents", type=int, default=3000, help="documents in --corpus")
    args = parser.parse_args()
    if args.corpus:
        write_corpus(args.corpus, args.documents)
        return
    torch.set_num_threads(args.threads)
    results = {seq: measure(seq, args.slices, args.repeats) for seq in args.seqs}
    text = table(results)
    print(text)
    if args.out:
        with open(args.out + ".txt", "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(args.out + ".json", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
