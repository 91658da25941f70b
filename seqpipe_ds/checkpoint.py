"""Checkpoints with Megatron-LM's semantics on top of DeepSpeed's: every rank's RNG state, a manifest
of the files, and a collective check that turns a damaged checkpoint into one clear error.

Why each piece:

- RNG state. DeepSpeed saves weights, optimizer and schedule but no generator state, so a resumed run
  draws other dropout masks than the uninterrupted one. As Megatron-LM's ``get_rng_state``, ``save``
  gathers python's, numpy's, torch's (and CUDA's) generators and megatron-core's RNG tracker states
  over the data-parallel group into the client state; DeepSpeed writes it into the model-states file
  of each model-parallel rank (``mp_rank_XX_model_states.pt``, written by DP rank 0), as a list
  indexed by DP rank. On load every rank reads its own model-parallel rank's file, so it finds its
  own state at its DP rank.
- Manifest. ``<save_dir>/<tag>/seqpipe_manifest.json`` lists every file of the tag with its size and
  sha256, and ``latest`` is only pointed at the tag once the manifest is in place, so ``latest``
  never names a checkpoint that was not completely written.
- Collective check. A rank that fails to read a file inside DeepSpeed's ``load_checkpoint`` exits
  while its peers wait in the next collective, and they die with the transport's "Connection closed
  by peer" instead of the cause. ``load`` therefore checks the files before DeepSpeed touches them
  (sizes on every rank, the expensive reads split among the ranks), gathers what every rank found
  and raises the same error on every rank.
"""
import hashlib
import json
import os
import random
import zipfile
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

MANIFEST = "seqpipe_manifest.json"
RNG_STATE_KEY = "rng_state"  # Megatron-LM's key in the checkpoint
_MANIFEST_FORMAT = 1
_HASH_CHUNK = 16 << 20


class Loaded(NamedTuple):
    """What ``load`` restored: the model-states file DeepSpeed read (None when there was no checkpoint
    to load), the iteration to continue after, and the rest of the saved client state."""
    path: Optional[str]
    iteration: int
    client_state: Optional[Dict[str, Any]]


def save(engine, save_dir: str, save_rng: bool = True, client_state: Optional[Dict[str, Any]] = None) -> str:
    """Saves a checkpoint of ``engine`` (every rank must call it) under the tag ``global_step<N>``,
    DeepSpeed's default, and returns the tag's directory. With ``save_rng`` the client state also
    holds every rank's RNG state (see the module docstring). Then the manifest is written, and only
    then ``latest`` pointed at the tag."""
    if engine.checkpoint_engine.is_decoupled():
        # Its files are written after save_checkpoint returns, so the manifest would hash partial files.
        raise ValueError("seqpipe_ds.checkpoint.save needs DeepSpeed's synchronous checkpoint engine, "
                         f"not {type(engine.checkpoint_engine).__name__}")
    state = dict(client_state or {})
    if save_rng:
        if RNG_STATE_KEY in state:
            raise ValueError(f"client_state must not hold {RNG_STATE_KEY!r}: save_rng stores the RNG state there")
        state[RNG_STATE_KEY] = _gather_rng_states()
    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False)
    tag_dir = os.path.join(save_dir, tag)
    write_manifest(tag_dir)
    _write_on_rank0(os.path.join(save_dir, "latest"), tag, f"checkpoint {tag_dir}: saved, but `latest` not set")
    return tag_dir


def load(engine, load_dir: str, load_rng: bool = True) -> Loaded:
    """Checks (``verify``) and loads the checkpoint ``latest`` names into ``engine`` (every rank must
    call it); with ``load_rng`` restores this rank's RNG state from it. A directory without
    ``latest`` loads nothing, as in Megatron-LM: the run starts from its initialisation."""
    latest = "latest_universal" if engine.load_universal_checkpoint() else "latest"
    tag = verify(load_dir, latest)
    if tag is None:
        if dist.get_rank() == 0:
            print(f"checkpoint: no {latest} file in {load_dir}; nothing loaded, starting from scratch", flush=True)
        return Loaded(None, engine.global_steps, None)
    # The tag verified, not whatever `latest` says by now.
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if load_rng:
        _restore_rng(client_state, os.path.join(load_dir, tag))
    return Loaded(path, engine.global_steps, client_state)


def verify(load_dir: str, latest: str = "latest") -> Optional[str]:
    """The tag ``<load_dir>/<latest>`` names, after checking its files on every rank (a collective):
    against the manifest when there is one (sizes on every rank, sha256 split among the ranks),
    otherwise by opening every ``.pt`` file with torch.load (split among the ranks). Raises the same
    ValueError on every rank, naming each bad file; returns None on every rank if there is no
    ``latest`` file."""
    latest_path = os.path.join(load_dir, latest)
    tag, problems = None, []
    try:
        if os.path.isfile(latest_path):
            with open(latest_path, encoding="utf-8") as f:
                tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"cannot read {latest_path}: {e}")
    gathered = _all_gather((tag, problems))
    _raise_if_any([p for _, p in gathered], f"checkpoint {load_dir}")
    tags = {t for t, _ in gathered}
    if len(tags) > 1:  # e.g. a save replacing `latest` while this run started
        raise ValueError(f"checkpoint {load_dir}: the ranks read different tags from {latest_path}: "
                         f"{sorted(map(str, tags))}")
    if tag is None:
        return None
    tag_dir = os.path.join(load_dir, tag)
    _raise_if_any(_all_gather(_tag_problems(tag_dir)), f"checkpoint {tag_dir}")
    return tag


def write_manifest(tag_dir: str) -> None:
    """Writes ``<tag_dir>/seqpipe_manifest.json``: every file under ``tag_dir`` with its size and
    sha256 (a collective; the hashing is split among the ranks, global rank 0 writes the file
    atomically once every rank has hashed its share, i.e. after every rank's files are written)."""
    names = [_list_files(tag_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing, so the ranks split the same list
    entries, problems = {}, []
    for name in _share(names[0]):
        try:
            path = os.path.join(tag_dir, name)
            entries[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        except OSError as e:
            problems.append(f"cannot hash {name}: {e}")
    gathered = _all_gather((entries, problems))
    _raise_if_any([p for _, p in gathered], f"checkpoint {tag_dir}: no manifest written")
    files = {name: entry for rank_entries, _ in gathered for name, entry in rank_entries.items()}
    manifest = json.dumps({"format": _MANIFEST_FORMAT, "files": dict(sorted(files.items()))}, indent=1)
    _write_on_rank0(os.path.join(tag_dir, MANIFEST), manifest, f"checkpoint {tag_dir}: no manifest written")


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory and os.replace, so a
    reader sees the old content or the new, never a part; a failure removes the temporary file.
    (A plain open, unlike mkstemp's private mode, gives the file the permissions torch.save's get.)"""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def get_rng_state() -> Dict[str, Any]:
    """This rank's generator states, as Megatron-LM's get_rng_state collects them. The CUDA state only
    where CUDA is available: on CPU megatron-core's tracker runs on torch's CPU generator."""
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what get_rng_state returned."""
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _gather_rng_states() -> List[Dict[str, Any]]:
    group = parallel_state.get_data_parallel_group()
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, get_rng_state(), group=group)
    return states


def _restore_rng(client_state: Dict[str, Any], tag_dir: str) -> None:
    """Sets this rank's RNG state from the loaded client state. Every rank decides from its own
    model-states file, so the verdicts are gathered first: one rank's problem stops every rank."""
    states = (client_state or {}).get(RNG_STATE_KEY)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    problem = None
    if states is None:
        problem = "it holds none (saved with --no-save-rng, or not by seqpipe_ds.checkpoint.save)"
    elif len(states) != dp_size:
        problem = f"it holds the states of {len(states)} data-parallel ranks, this run has {dp_size}"
    elif ("cuda_rng_state" in states[dp_rank]) != torch.cuda.is_available():
        saved, now = ("CPU", "CUDA") if torch.cuda.is_available() else ("CUDA", "CPU")
        problem = f"its generator states are {saved} ones, this run is on {now}"
    found = sorted({p for p in _all_gather(problem) if p})
    if found:
        raise ValueError(f"Unable to load rng state from checkpoint {tag_dir}: {'; '.join(found)}. Specify "
                         "--no-load-rng (load_rng=False) to start the generators from the seed instead")
    set_rng_state(states[dp_rank])


def _tag_problems(tag_dir: str) -> List[str]:
    """This rank's findings about the tag's files: what the manifest says, or what torch.load says."""
    if not os.path.isdir(tag_dir):
        return ["no such directory"]
    manifest_path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        names = [name for name in _list_files(tag_dir) if name.endswith(".pt")]
        if not names:
            return ["no .pt files in it"]
        return [p for name in _share(names) for p in _load_problems(tag_dir, name)]
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in json.load(f)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"file {MANIFEST} is unreadable ({type(e).__name__}: {e})"]
    problems, intact = [], []
    for name, (expected, _) in files.items():
        try:
            size = os.path.getsize(os.path.join(tag_dir, name))
        except OSError:
            problems.append(f"file {name} is missing")
            continue
        if size < expected:
            problems.append(f"file {name} is truncated ({size} bytes, manifest says {expected})")
        elif size > expected:
            problems.append(f"file {name} has {size} bytes, manifest says {expected}")
        else:
            intact.append(name)
    for name in _share(intact):
        try:
            digest = _sha256(os.path.join(tag_dir, name))
        except OSError as e:
            problems.append(f"file {name} cannot be read ({e})")
            continue
        if digest != files[name][1]:
            problems.append(f"file {name} is corrupted (sha256 {digest[:16]}..., "
                            f"manifest says {files[name][1][:16]}...)")
    return problems


def _load_problems(tag_dir: str, name: str) -> List[str]:
    """Opens one file as DeepSpeed will. mmap reads only the zip index and the pickle; a file that is
    no intact zip archive (damaged, or torch's legacy format) is loaded in full, which fails on
    damage."""
    path = os.path.join(tag_dir, name)
    try:
        torch.load(path, mmap=zipfile.is_zipfile(path), map_location="cpu", weights_only=False)
    except Exception as e:  # whatever torch.load raises is the file's problem
        return [f"file {name} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    return []


def _list_files(root: str) -> List[str]:
    """Every file under root, relative and sorted, without the manifest and temporary files."""
    names = []
    for folder, _, files in os.walk(root):
        for file in files:
            name = os.path.relpath(os.path.join(folder, file), root)
            if name != MANIFEST and not file.startswith(f".{MANIFEST}."):
                names.append(name)
    return sorted(names)


def _share(items: List[str]) -> List[str]:
    """This rank's share of items: every world-size-th, so a large checkpoint is read once in all."""
    return items[dist.get_rank()::dist.get_world_size()]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _all_gather(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _raise_if_any(problems_by_rank: List[List[str]], what: str) -> None:
    """Raises one ValueError listing every rank's problems (each once); the same on every rank, since
    every rank holds the same gathered list."""
    problems = sorted({p for problems in problems_by_rank for p in problems})
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}")


def _write_on_rank0(path: str, text: str, what: str) -> None:
    """Global rank 0 writes path atomically. Its failure is gathered, so that every rank raises it
    instead of the others waiting for rank 0 in their next collective; the gather is also the
    barrier after the write."""
    problem = []
    if dist.get_rank() == 0:
        try:
            write_atomic(path, text)
        except OSError as e:
            problem = [f"cannot write {path}: {e}"]
    _raise_if_any(_all_gather(problem), what)
