"""Block attention of packed documents equals SDPA with Megatron's dense reset-attention mask, in value
and in the gradients of Q and every block's K/V, sliced and unsliced; blocks of other documents are
never computed."""
import pytest
import torch
import torch.nn.functional as F

from common import rel_err
from seqpipe_ds.attention import KVCache, attend
from seqpipe_ds.attention.documents import document_mask, segment_blocks
from seqpipe_ds.data import document_starts

HEAD_DIM = 8
EOD = 0

# name: (slice lengths, per row: the document lengths, each ended by an EOD except maybe the last)
CASES = {
    "slices cut documents": ([6, 6, 6, 6], [[5, 9, 3, 7]]),
    "single-token documents": ([3, 5, 4], [[1, 1, 3, 1, 1, 5]]),
    "a document spans every slice": ([4, 4, 4, 4], [[2, 13, 1]]),
    "no EOD": ([5, 7, 4], [[16], [3, 13]]),
    "rows differ, gqa": ([7, 5, 6], [[18], [1, 4, 1, 12]]),
    "unsliced": ([17], [[4, 8, 5], [17]]),
}


def _tokens(rows):
    """[B, s] tokens whose documents have the given lengths: EOD closes each but the last."""
    g = torch.Generator().manual_seed(3)
    out = []
    for lengths in rows:
        row = []
        for n, length in enumerate(lengths):
            row += torch.randint(1, 50, (length,), generator=g).tolist()
            if n + 1 < len(lengths):
                row[-1] = EOD
        out.append(row)
    return torch.tensor(out)


def _tensors(batch, seq, heads, kv_heads, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, h, seq, HEAD_DIM, generator=g, dtype=dtype) for h in (heads, kv_heads, kv_heads, heads)]


def _dense(q, k, v, grad, starts):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(starts, 0, k.shape[2]),
                                         enable_gqa=q.shape[1] != k.shape[1])
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _sliced(q, k, v, grad, starts, lengths):
    """The slices run in order through attend() with one cache; out and the gradients of q, k, v."""
    cache, outs, leaves = KVCache(), [], []
    pieces = [t.split(lengths, dim=2) for t in (q, k, v, grad)]
    for i, (qi, ki, vi, _) in enumerate(zip(*pieces)):
        qi, ki, vi = (t.clone().requires_grad_() for t in (qi, ki, vi))
        with cache.slice(i):
            outs.append(attend(qi, ki, vi, cache, 0, starts=starts.split(lengths, dim=1)[i]))
        leaves.append((qi, ki, vi))
    for i in reversed(range(len(lengths))):  # backward in reverse slice order, as the engine does
        tensors, grads = cache.backward_args(i, [outs[i]], [pieces[3][i]])
        torch.autograd.backward(tensors, grads)
    out = torch.cat([o.detach() for o in outs], dim=2)
    return (out, *[torch.cat([leaf[j].grad for leaf in leaves], dim=2) for j in range(3)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CASES)
def test_document_blocks_equal_dense_mask(name, dtype):
    lengths, rows = CASES[name]
    tokens = _tokens(rows)
    starts = document_starts(tokens, EOD)
    heads, kv_heads = (4, 2) if "gqa" in name else (4, 4)
    q, k, v, grad = _tensors(tokens.shape[0], tokens.shape[1], heads, kv_heads, dtype)
    expected = _dense(q, k, v, grad, starts)
    actual = _sliced(q, k, v, grad, starts, lengths)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for what, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert rel_err(a, e) <= tol, f"{name} {what}: {rel_err(a, e)}"


def test_unsliced_reference_is_the_dense_mask():
    """Outside a slice (stock DeepSpeed, one process) attend() runs SDPA with the dense mask."""
    tokens = _tokens([[4, 8, 5]])
    starts = document_starts(tokens, EOD)
    q, k, v, grad = _tensors(1, 17, 4, 4, torch.float64)
    out = attend(q, k, v, None, 0, starts=starts)
    assert rel_err(out, _dense(q, k, v, grad, starts)[0]) <= 1e-14


def test_other_documents_are_never_computed():
    """Blocks only where the segment's document has keys: a slice starting a new document reads no
    cached block, one continuing a document reads only the cached slices it spans."""
    starts = document_starts(torch.tensor([[1, 2, EOD, 3, 4, 5, 6, 7, EOD, 8, 9, 10]]), EOD)
    assert starts.tolist() == [[0, 0, 0, 3, 3, 3, 3, 3, 3, 9, 9, 9]]
    # slice 2 = positions 8..11 after cached slices [0, 4) and [4, 8): the first segment (position 8,
    # document from 3) reads cached slice 0 from 3 and all of slice 1; the second only itself
    assert segment_blocks(starts[:, 8:], 8, [4, 4]) == [
        (0, 0, 1, 0, 0, 1, True), (0, 0, 1, 1, 3, 4, False), (0, 0, 1, 2, 0, 4, False), (0, 1, 4, 0, 1, 4, True)]


def test_bad_starts_are_an_error():
    q, k, v, _ = _tensors(1, 4, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="cannot start after its token"):
        attend(q, k, v, None, 0, starts=torch.tensor([[0, 0, 3, 1]]))


def test_slice_mask_is_the_rows_of_the_whole_mask():
    """The dense mask of a slice at offset o (attention dropout's fallback over the concatenated K/V)
    is rows o.. of the whole sequence's mask, which is causal within each document."""
    tokens = _tokens([[5, 9, 3, 7], [1, 1, 3, 1, 1, 5, 12]])
    starts = document_starts(tokens, EOD)
    whole = document_mask(starts, 0, 24)
    for offset, n in ((0, 6), (6, 7), (13, 11)):
        assert torch.equal(document_mask(starts[:, offset:offset + n], offset, offset + n),
                           whole[:, :, offset:offset + n, :offset + n])
    first_doc = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(whole[0, 0, :5, :5], first_doc) and not whole[0, 0, 5:, :5].any()
