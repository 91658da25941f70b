"""The planner's packed documents (planner/documents.py): the expected same-document context of a slice
against the pairs the block attention's ``segment_blocks`` computes on packed sequences, the lengths
measured from a Megatron dataset, the prices (late slices no dearer with short documents; stock's dense
mask), and ``seqpipe-plan solve --documents`` through plan file, ``show`` and the hook."""
import json
import re

import numpy as np
import pytest
import torch

import launcher
from seqpipe_ds.attention.documents import segment_blocks
from seqpipe_ds.data import ByteTokenizer, document_starts, packed_stream, write_indexed_dataset
from seqpipe_ds.planner import CostModel
from seqpipe_ds.planner.documents import DocumentLatencyModel, DocumentLengths, PackedDocuments
from seqpipe_ds.planner.fit import fit_profile, read_model_file
from seqpipe_ds.planner.plan_file import read_plans
from seqpipe_ds.planner.planning import dp_plan, simulate_entry
from test_planner_fit import synthetic_profile
from test_planner_plan_file import resolve_for_models, tiny_plan_file

EOD = ByteTokenizer.eod
EPS = np.finfo(np.float64).eps


def counted(starts: torch.Tensor, lengths):
    """Per slice of ``lengths``: (pairs within the slice, pairs with cached keys, queries reading cached
    keys, cached keys read), counted from the blocks the attention computes."""
    out = []
    for j, l in enumerate(lengths):
        offset = sum(lengths[:j])
        blocks = segment_blocks(starts[:, offset:offset + l], offset, list(lengths[:j]))
        own = [(qe - qs) * (qe - qs + 1) // 2 for _, qs, qe, _, _, _, causal in blocks if causal]
        cached = [(qe - qs, ke - ks) for _, qs, qe, _, ks, ke, causal in blocks if not causal]
        queries = len({(b, qs) for b, qs, _, _, _, _, causal in blocks if not causal})
        first = next((q for q, _ in cached), 0)  # a segment reads every cached block: count its queries once
        out.append((sum(own), sum(q * k for q, k in cached), first * (queries > 0), sum(k for _, k in cached)))
    return np.array(out, dtype=float)


def expected(packed: PackedDocuments, lengths):
    rows = []
    for j, l in enumerate(lengths):
        c = sum(lengths[:j])
        rows.append((packed.in_slice_pairs(l), packed.cached_pairs(l, c), packed.cached_queries(l, c),
                     packed.cached_keys(c) if c else 0.0))
    return np.array(rows, dtype=float)


SLICINGS = ([40], [16, 8, 16], [4, 9, 27], [10, 10, 10, 10], [1, 38, 1])


@pytest.mark.parametrize("n", [1, 3, 7, 40, 41, 97])
def test_expected_context_equals_every_phase_of_equal_documents(n):
    """Documents of n tokens each: packing is periodic and a sample starts at a uniform phase, so
    averaging over the n phases is the exact expectation. The model sums at most 2 * horizon terms
    of at most horizon^2 in float64, hence the bound of 4 * horizon ulps relative."""
    seq = 40
    packed = PackedDocuments(DocumentLengths.of([n] * 3, seq))
    for slicing in SLICINGS:
        total = np.zeros((len(slicing), 4))
        for phase in range(n):  # position 0 sits phase tokens into its document
            positions = torch.arange(seq) + phase
            starts = torch.clamp(positions // n * n - phase, min=0)[None]
            total += counted(starts, slicing)
        np.testing.assert_allclose(expected(packed, slicing), total / n, rtol=4 * seq * EPS, atol=4 * seq * EPS)


def _lognormal_dataset(path, count, mean, seed):
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, np.round(rng.lognormal(np.log(mean) - 0.5, 1.0, count))).astype(int)
    write_indexed_dataset(["a" * (n - 1) for n in sizes], ByteTokenizer(), str(path))
    return sizes


def test_lengths_measured_from_the_dataset(tmp_path):
    sizes = _lognormal_dataset(tmp_path / "docs", 300, 24, seed=1)
    measured = DocumentLengths.measure(str(tmp_path / "docs"), EOD, horizon=64)
    assert measured.documents == sizes.size and measured.mean == pytest.approx(sizes.mean(), rel=1e-12)
    # kept exactly up to the horizon, the longer ones as one entry of their mean
    assert dict(zip(measured.lengths, measured.counts)) == {
        **{float(v): int(c) for v, c in zip(*np.unique(sizes[sizes <= 64], return_counts=True))},
        float(sizes[sizes > 64].mean()): int((sizes > 64).sum())}
    assert DocumentLengths.from_dict(json.loads(json.dumps(measured.to_dict()))) == measured
    write_indexed_dataset(["no end"], type("NoEod", (ByteTokenizer,), {"eod": 300})(), str(tmp_path / "none"))
    with pytest.raises(ValueError, match="no documents measured"):
        DocumentLengths.measure(str(tmp_path / "none"), EOD, horizon=64)


def test_expected_context_matches_sampled_packed_sequences(tmp_path):
    """Samples cut from the dataset's documents shuffled and packed back to back (as GPTDataset does,
    ``packed_stream``), every other one so that neighbours share no document; the model must lie within
    5 standard errors of the sample means (a normal deviate beyond 5 has probability 6e-7)."""
    seq = 64
    _lognormal_dataset(tmp_path / "docs", 2000, 20, seed=2)
    packed = PackedDocuments(DocumentLengths.measure(str(tmp_path / "docs"), EOD, seq))
    stream = torch.from_numpy(np.concatenate([packed_stream(str(tmp_path / "docs"), seed=s) for s in range(1, 6)]))
    samples = stream[:stream.numel() // (2 * seq) * 2 * seq].view(-1, 2, seq)[:, 0]
    starts = document_starts(samples, EOD)
    assert samples.shape[0] > 1400
    for slicing in SLICINGS:
        counts = np.stack([counted(row[None], slicing) for row in starts])
        mean, error = counts.mean(axis=0), counts.std(axis=0, ddof=1) / np.sqrt(len(counts))
        model = expected(packed, slicing)
        assert (np.abs(model - mean) <= 5 * error + 4 * seq * EPS * np.abs(model)).all(), (slicing, model, mean, error)
        assert (model[1:, 1] < np.array([l * sum(slicing[:j]) for j, l in enumerate(slicing)][1:])).all()  # < l c


@pytest.fixture
def model():
    return fit_profile(synthetic_profile(noise=0.0, seq_length=1024, granularity=64)).model


def test_short_documents_make_late_slices_as_cheap_as_early_ones(model):
    """With causal attention a slice's cost grows with its context; with documents of ~32 tokens a
    slice's context is its first document's earlier tokens, so every slice after the first costs about
    the same and less than its causal price, and TeraPipe's DP cuts the sequence more evenly."""
    packed = PackedDocuments(DocumentLengths.of(np.full(100, 32), 1024))
    documents = DocumentLatencyModel.of(model, packed)
    c = np.array([0, 256, 512, 768])
    causal, docs = model.compute_time(1, 256, c), documents.compute_time(1, 256, c)
    assert (np.diff(causal) > 0).all() and (docs[1:] < causal[1:]).all()
    assert np.ptp(docs[1:]) < 1e-9 and docs[0] < causal[0]  # the first slice's own causal block shrinks too
    # the prices are the latency model's terms at the expected counts
    a0, a1, a2, a3 = model.context_coef
    l, k = 256, 512
    assert docs[2] == pytest.approx(model.compute_time(1, l, 0) - a3 * (l * (l + 1) / 2 - packed.in_slice_pairs(l))
                                    + a0 * packed.reads_cache(k) + a1 * packed.cached_queries(l, k)
                                    + a2 * packed.cached_keys(k) + a3 * packed.cached_pairs(l, k), rel=1e-12)
    # stock DeepSpeed's dense mask computes the whole square: l (l - 1) / 2 pairs more than causal
    dense = DocumentLatencyModel.of(model, packed.dense_mask()).compute_time(1, 1024, 0)
    assert dense == pytest.approx(model.compute_time(1, 1024, 0) + a3 * 1024 * 1023 / 2, rel=1e-12)
    plans = {name: dp_plan(CostModel.identical_stages(latency, 2, 64), 1, 1024, 64).plan.seq_slices[0]
             for name, latency in (("causal", model), ("documents", documents))}
    assert np.ptp(plans["documents"]) < np.ptp(plans["causal"]), plans


@pytest.fixture
def model_file(tmp_path):
    from seqpipe_ds.cli.plan import main
    (tmp_path / "profile.json").write_text(json.dumps(synthetic_profile(noise=0.0)))
    assert main(["fit", str(tmp_path / "profile.json"), "--out", str(tmp_path / "model.json")]) == 0
    return tmp_path / "model.json"


def test_solve_with_documents_records_them_and_show_reproduces_the_latency(tmp_path, model_file, capsys):
    from seqpipe_ds.cli.plan import main
    _lognormal_dataset(tmp_path / "docs", 500, 16, seed=3)
    plans = {}
    for name, flags in (("causal", []), ("documents", ["--documents", str(tmp_path / "docs"), "--eod", str(EOD)])):
        path = tmp_path / f"{name}.json"
        assert main(["solve", str(model_file), "--num-stages", "2", "--batch-size", "2", "--plan-file", str(path),
                     *flags]) == 0
        plans[name] = read_plans(str(path))[0]
    printed = capsys.readouterr().out
    assert re.search(r"packed documents: 500 documents, mean 1\d tokens", printed) and "packed documents" in printed
    causal, documents = plans["causal"], plans["documents"]
    assert causal.documents is None and documents.documents["counts"] and documents.documents["horizon"] == 256
    assert documents.latency < causal.latency  # short documents: less attention
    found = read_model_file(str(model_file))
    for entry in (causal, documents):
        assert simulate_entry(found, entry).makespan == pytest.approx(entry.latency, rel=1e-9)
    assert main(["solve", str(model_file), "--num-stages", "2", "--documents", str(tmp_path / "docs")]) == 1
    assert "give the end-of-document id of its tokenizer (--eod)" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_hook_refuses_a_plan_made_for_the_other_attention(tmp_path):
    lengths = DocumentLengths.of([5, 9], 16).to_dict()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    documents = tiny_plan_file(tmp_path / "a", [8, 8], schedule="slice-1f1b", documents=lengths)
    causal = tiny_plan_file(tmp_path / "b", [8, 8], schedule="slice-1f1b")
    refused, accepted = launcher.run(resolve_for_models, 1, plan_path=documents,
                                     models=[{"reset_attention_mask": f} for f in (False, True)])[0]
    assert "was made for packed documents, but the model is built without reset_attention_mask" in refused
    assert accepted == [8, 8]
    refused, accepted = launcher.run(resolve_for_models, 1, plan_path=causal,
                                     models=[{"reset_attention_mask": f} for f in (True, False)])[0]
    assert "was made for causal attention, but the model is built with reset_attention_mask" in refused
    assert "--documents DATA" in refused and accepted == [8, 8]
