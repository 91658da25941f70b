"""The planner's view of packed documents (Megatron's ``--reset-attention-mask``): how much same-document
context a slice has, in expectation over the dataset's measured document lengths.

With packed documents a query sees only the earlier tokens of its own document, and the block
attention (``attention/documents.py``) computes nothing else: per slice, each document segment's own
causal block, and for the first segment, when its document began in an earlier slice, the cached
keys of that document. So a slice of l tokens after c tokens of context computes far fewer than the
l * c + l (l + 1) / 2 pairs of causal attention, and a late slice is no dearer than an early one once
documents are shorter than the context.

**One plan from the distribution, not a plan per batch.** What a given batch computes depends on
where its documents end, which differs batch by batch. Planning per batch would need a plan per
batch and a new lowering of the schedule each step, on every rank alike; the expectation over the
measured lengths gives one plan, made once, that the hook applies as before, and a batch's cost
differs from it only by where its boundaries fall. The expectation is exact (no sampling): the
documents of a GPTDataset sample are the dataset's documents in a shuffled order, back to back, cut
at the sample's start and end, i.e. a stationary renewal process of the measured lengths. For that
process the age A of a position (tokens since its document began) has P(A >= a) = G(a) = 1 - sum_{j <
a} P(L > j) / E[L]; within a sample it is cut at the sample's start, min(A, p) at position p. Then,
per sequence, with H(k) = sum_{a=1..k} G(a) and K(n) = sum_{k=0..n-1} H(k):

* pairs within the slice (each segment's causal block): l + K(l), whatever c is;
* pairs with cached keys: K(c + l) - K(c) - K(l);
* queries that read cached keys: H(l) (c > 0), the first segment's length when its document began earlier;
* cached keys read: H(c), that document's tokens before the slice; a slice reads any with
  probability G(1) = 1 - 1 / E[L] (c > 0).

Without documents (G = 1) these are the causal l (l + 1) / 2, l * c, l, c and 1.
``tests/test_planner_documents.py`` checks them against the pairs ``segment_blocks`` computes on
packed samples.

**Prices.** The latency model (``fit.py``) charges a slice t0(b, l) (the plain causal kernel over its
own tokens) plus, with context, a0 + a1 b l + a2 b c + a3 b l c: a3 is the seconds of one (query,
cached key) pair. ``DocumentLatencyModel`` keeps those terms with the expected counts above and takes
the pairs a slice no longer computes within itself off t0 at that same a3, the one per-pair cost the
profile measured. Stock DeepSpeed runs the unsliced SDPA with the dense mask (``dense``): it computes
every pair of the square and masks, a3 for each of the l (l - 1) / 2 pairs above the diagonal that the
causal kernel skips. ``planning.cost_model(..., documents=)`` builds ``costs.CostModel`` on it, so the
DP's grid, the search, the calibration and the bench's predictions all price documents the same way;
the memory model is unchanged (the KV cache still holds every earlier slice).
"""
import functools
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .fit import LatencyModel


@dataclass(frozen=True)
class DocumentLengths:
    """A measured distribution of document lengths (tokens, the EOD included): ``counts[i]`` documents
    of ``lengths[i]`` tokens. Only lengths up to ``horizon`` (the sequence length) matter to a plan, so
    the documents longer than it are kept as one entry of their mean length: the same mean, and the same
    P(L > j) for every j < horizon."""
    lengths: Tuple[float, ...]
    counts: Tuple[int, ...]
    horizon: int
    source: str = ""

    def __post_init__(self):
        if not self.counts or sum(self.counts) < 1 or min(self.counts) < 1 or min(self.lengths) < 1:
            raise ValueError(f"no documents measured{f' in {self.source}' if self.source else ''}: packed "
                             "documents need end-of-document tokens in the data (write it with --append-eod)")

    @classmethod
    def of(cls, lengths: Sequence[int], horizon: int, source: str = "") -> "DocumentLengths":
        """The distribution of a sample of document lengths, for sequences of ``horizon`` tokens."""
        lengths = np.asarray(lengths, dtype=np.int64)
        values, counts = np.unique(lengths[lengths <= horizon], return_counts=True)
        long = lengths[lengths > horizon]
        pairs = list(zip(values.tolist(), counts.tolist())) + ([(float(long.mean()), int(long.size))] if long.size
                                                               else [])
        return cls(tuple(float(v) for v, _ in pairs), tuple(int(n) for _, n in pairs), horizon, source)

    @classmethod
    def measure(cls, prefix: str, eod: int, horizon: int, tokens: Optional[int] = 1 << 24,
                seed: int = 0) -> "DocumentLengths":
        """The EOD-separated documents of a Megatron indexed dataset, read in a seeded random order up to
        ``tokens`` tokens (``data.packed_stream``; None: all of it)."""
        from ..data import eod_document_lengths, packed_stream
        return cls.of(eod_document_lengths(packed_stream(prefix, tokens, seed), eod), horizon, prefix)

    @property
    def documents(self) -> int:
        return sum(self.counts)

    @property
    def mean(self) -> float:
        return float(np.dot(self.lengths, self.counts)) / self.documents

    def describe(self) -> str:
        return (f"{self.documents} documents, mean {self.mean:.0f} tokens"
                + (f" ({self.source})" if self.source else ""))

    def to_dict(self) -> Dict:
        return {"lengths": list(self.lengths), "counts": list(self.counts), "horizon": self.horizon,
                "source": self.source, "mean_length": self.mean}

    @classmethod
    def from_dict(cls, data: Dict) -> "DocumentLengths":
        return cls(tuple(float(v) for v in data["lengths"]), tuple(int(n) for n in data["counts"]),
                   int(data["horizon"]), data.get("source", ""))


@dataclass(frozen=True)
class PackedDocuments:
    """Expected attention of one sequence's slice of packed documents drawn from ``lengths`` (see the
    module's docstring); every method takes numbers or numpy arrays, inf beyond the horizon. ``dense``:
    priced as stock DeepSpeed's dense mask instead of the block attention."""
    lengths: DocumentLengths
    dense: bool = False

    def dense_mask(self) -> "PackedDocuments":
        return replace(self, dense=True)

    @functools.cached_property
    def _tables(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """G(a), H(k), K(n) for 0..horizon + 1, in float64."""
        n = self.lengths.horizon + 2
        counts = np.cumsum(self.lengths.counts, dtype=float)  # documents of at most lengths[i] tokens (ascending)
        at_most = np.searchsorted(self.lengths.lengths, np.arange(n), side="right")
        survival = 1.0 - np.concatenate([[0.0], counts])[at_most] / counts[-1]  # P(L > j), j = 0..n-1
        g = 1.0 - np.concatenate([[0.0], np.cumsum(survival[:-1])]) / self.lengths.mean  # G(0..n-1)
        h = np.concatenate([[0.0], np.cumsum(g[1:])])  # H(0..n-1)
        k = np.concatenate([[0.0], np.cumsum(h[:-1])])  # K(0..n-1)
        return g, h, k

    def _at(self, table: np.ndarray, index) -> np.ndarray:
        index = np.asarray(index)
        inside = (index >= 0) & (index < table.size)
        return np.where(inside, table[np.clip(index, 0, table.size - 1).astype(np.int64)], np.inf)

    def in_slice_pairs(self, l) -> np.ndarray:
        """(query, key) pairs of the slice's own causal segment blocks."""
        return np.asarray(l, dtype=float) + self._at(self._tables[2], l)

    def cached_pairs(self, l, c) -> np.ndarray:
        """Pairs of the slice's queries with cached keys (of their own documents)."""
        k = self._tables[2]
        return self._at(k, np.asarray(l) + c) - self._at(k, c) - self._at(k, l)

    def cached_queries(self, l, c) -> np.ndarray:
        """Queries that read cached keys."""
        return np.where(np.asarray(c) > 0, self._at(self._tables[1], l), 0.0)

    def cached_keys(self, c) -> np.ndarray:
        """Cached keys read (one document's tokens before the slice)."""
        return self._at(self._tables[1], c)

    def reads_cache(self, c) -> np.ndarray:
        """The probability that the slice reads any cached key."""
        return np.where(np.asarray(c) > 0, self._tables[0][1], 0.0)


@dataclass(frozen=True)
class DocumentLatencyModel(LatencyModel):
    """A latency model whose slices attend within packed documents (``packed``): the compute of a slice
    is the profile's with the expected pairs of the module's docstring instead of the causal ones, so
    everything built on ``compute_time`` (a stage's compute, the recomputation's rerun, the DP's grid)
    prices documents."""
    packed: Optional[PackedDocuments] = None

    @classmethod
    def of(cls, model: LatencyModel, packed: PackedDocuments) -> "DocumentLatencyModel":
        base = {name: getattr(model, name) for name in LatencyModel.__dataclass_fields__}
        return cls(**base, packed=packed)

    def compute_time(self, b, l, c) -> np.ndarray:
        causal = super().compute_time(b, l, c)
        b, l, c = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(b, l, c))
        a0, a1, a2, a3 = self.context_coef
        causal_in_slice = l * (l + 1) / 2
        if self.packed.dense:  # the square of every (query, key) pair, masked: l (l - 1) / 2 more than causal
            return causal + a3 * b * (l * l - causal_in_slice)
        plain = self._no_context(b, l) - a3 * b * (causal_in_slice - self.packed.in_slice_pairs(l))
        context = (a0 * self.packed.reads_cache(c) + a1 * b * self.packed.cached_queries(l, c)
                   + a2 * b * self.packed.cached_keys(c) + a3 * b * self.packed.cached_pairs(l, c))
        return plain + np.where(c > 0, context, 0.0)


EMBEDDED = "embedded"  # the data name of the embedded corpus, byte-level tokenized (what seqpipe-bench trains on)


def document_data(data: str, eod: Optional[int] = None) -> Tuple[str, int]:
    """(Megatron indexed dataset prefix, end-of-document id) of ``data``: a prefix (``--data-path``) whose
    tokenizer's end-of-document id is ``eod``, or ``EMBEDDED``, the embedded corpus tokenized byte-level
    (``eod`` defaults to the byte-level tokenizer's)."""
    from ..data import ByteTokenizer, embedded_corpus_prefix
    if data == EMBEDDED:
        tokenizer = ByteTokenizer()
        return embedded_corpus_prefix(tokenizer), tokenizer.eod if eod is None else eod
    if eod is None:
        raise ValueError(f"packed documents of {data}: give the end-of-document id of its tokenizer (--eod)")
    return data, eod


def measured_documents(data: str, horizon: int, eod: Optional[int] = None) -> PackedDocuments:
    """The packed documents of ``data`` (``document_data``) for sequences of ``horizon`` tokens."""
    return PackedDocuments(DocumentLengths.measure(*document_data(data, eod), horizon))
