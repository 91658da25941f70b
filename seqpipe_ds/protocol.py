"""What a pipeline model must offer to be run slice by slice.

A layer can take a sequence slice when it is position-wise or, like attention, finds earlier
positions through ``attention.current()``. Nothing in a layer list says which is which, so layers
declare it with ``@sliceable``; the loss must accept the normalizer of the whole micro-batch.

A split-backward (zero-bubble) schedule runs each backward as B, the input gradients, and later W,
the weight gradients that ``model.wgrad.deferring`` queued. A layer declares with
``@splits_backward`` that this is sound for it: its heavy weight-gradient GEMMs defer (its linear
layers are ``wgrad``'s), and whatever else it computes in B (embedding, norms, biases) is complete
and correct without waiting for W.

Stages pass one activation tensor, or a tuple of the activation and integer per-token metadata
[batch, tokens] that gets no gradient (the GPT's document starts with packed documents): seqpipe
sends it with every slice, as stock DeepSpeed's pipeline sends a tuple's integer members.

What else the runtime reads from a pipeline module, all optional:

- ``gpt_config``: its ``GPTConfig`` (plans, position checks, the attention-dropout notice);
- ``activation_dims(batch, tokens)``: leading dims of the tensors passed between stages;
- ``dropout_seed``: the seed of the hidden-dropout masks (``model.dropout``; 0 if absent). The
  engines key every forward with its samples' global numbers (``model.dropout.samples``).
"""
from deepspeed.pipe import LayerSpec, TiedLayerSpec

MARK = "supports_sequence_slices"
SPLIT_MARK = "splits_backward"


def sliceable(obj):
    """Class or function decorator: this layer gives the same result run slice by slice."""
    setattr(obj, MARK, True)
    return obj


def is_sliceable(obj) -> bool:
    return bool(getattr(obj, MARK, False))


def splits_backward(obj):
    """Class or function decorator: this layer's backward may run as B now and its deferred W later."""
    setattr(obj, SPLIT_MARK, True)
    return obj


def is_split(obj) -> bool:
    return bool(getattr(obj, SPLIT_MARK, False))


def name(obj) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def problems(layer_specs, loss_fn) -> list:
    """Reasons the model cannot be sliced (empty when it can)."""
    found = []
    for idx, spec in enumerate(layer_specs):
        target = _target(spec)
        if not is_sliceable(target):
            found.append(f"layer {idx} ({name(target)}) is not marked @seqpipe_ds.sliceable")
    if not callable(getattr(loss_fn, "normalizer", None)):
        found.append(f"loss_fn {name(loss_fn)} has no normalizer(labels) method, so per-slice losses cannot be "
                     "scaled to the micro-batch mean")
    return found


def backward_split_problems(layer_specs) -> list:
    """Reasons the model cannot run under a split-backward schedule (empty when it can)."""
    return [f"layer {idx} ({name(target)}) is not marked @seqpipe_ds.splits_backward, so its backward cannot be "
            "split into B and a deferred W" for idx, target in enumerate(map(_target, layer_specs))
            if not is_split(target)]


def _target(spec):
    """What a layer spec runs: a tied layer's forward_fn, a LayerSpec's class, or the module or function itself."""
    if isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None:
        return spec.forward_fn
    if isinstance(spec, LayerSpec):
        return spec.typename
    return spec
