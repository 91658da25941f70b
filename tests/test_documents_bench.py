"""benchmarks/bench_documents.py runs, and its pair counts say what the block attention computes: for
every slicing exactly the pairs within documents, sum n(n + 1)/2, against the causal s(s + 1)/2."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_documents  # noqa: E402


@pytest.mark.timeout(120)
def test_bench_documents_counts_only_pairs_within_documents():
    seq = 640
    lengths = bench_documents.document_lengths(seq, mean=64)
    assert sum(lengths) == seq and len(lengths) > 3
    within = sum(n * (n + 1) // 2 for n in lengths)
    result = bench_documents.measure(seq, [1, 3, 8], repeats=1, mean=64)
    for k in (1, 3, 8):
        docs, causal = result["variants"][f"documents k={k}"], result["variants"][f"causal k={k}"]
        assert docs["pairs"] == within < causal["pairs"] == seq * (seq + 1) // 2
        assert docs["seconds"] > 0 and docs["skipped"] == 1 - within / causal["pairs"]
    assert result["variants"]["dense"]["pairs"] == seq * seq
    assert "documents k=8" in bench_documents.table({seq: result})
