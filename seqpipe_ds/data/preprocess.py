"""Raw JSON-lines text to Megatron ``.bin``/``.idx`` datasets, as Megatron-LM's tools/preprocess_data.py
makes them (that tool is not part of megatron-core): one dataset per JSON key,
``{output_prefix}_{key}_document``, each line a document, written by megatron-core's
IndexedDatasetBuilder.

Lines are read in order by this process and encoded by ``workers`` processes, a chunk of lines at a
time (one call into the Rust tokenizer per chunk and key). Each worker encodes on one thread, so the
worker count is the number of cores encoding. Output goes to temporary files renamed into place
only when the whole input has been read: a malformed line stops the run with an error naming it,
and leaves no half-written dataset behind.
"""
import json
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

from seqpipe_ds.data.tokenizer import build_tokenizer

# Lines per task sent to a worker: large enough that pickling and scheduling cost little per line,
# small enough that two workers share a small corpus.
CHUNK_LINES = 64
MB = 1e6


class PreprocessError(ValueError):
    """Bad input: a line that is not a JSON object with string values under every key."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to build the same tokenizer itself (a tokenizer object is not sent)."""

    tokenizer_type: str
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None

    def build(self):
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file, self.tokenizer_model)


@dataclass
class Progress:
    """Counts so far; ``documents_per_s`` and ``mb_per_s`` over the input read (MB = 10^6 bytes)."""

    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0
    empty: int = 0  # (document, key) pairs with no token, left out of that key's dataset
    outputs: List[str] = field(default_factory=list)

    @property
    def documents_per_s(self):
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self):
        return self.bytes / MB / self.seconds if self.seconds else 0.0


def output_prefixes(output_prefix, json_keys):
    return [f"{output_prefix}_{key}_document" for key in json_keys]


_worker = {}


def _init_worker(spec, json_keys, append_eod, dtype):
    # One thread per worker: --workers then says how many cores encode, and the tokenizers
    # library's own thread pool does not oversubscribe the cores the other workers use.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=spec.build(), json_keys=json_keys, append_eod=append_eod, dtype=dtype)


def _parse(number, raw, json_keys):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PreprocessError(f"line {number}: not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PreprocessError(f"line {number}: not JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(record, dict):
        raise PreprocessError(f"line {number}: a JSON {type(record).__name__}, not an object")
    texts = []
    for key in json_keys:
        if key not in record:
            raise PreprocessError(f"line {number}: no key {key!r} (--json-keys {' '.join(json_keys)})")
        if not isinstance(record[key], str):
            raise PreprocessError(f"line {number}: {key!r} is a JSON {type(record[key]).__name__}, not a string")
        texts.append(record[key])
    return texts


def _encode_chunk(chunk):
    """(per key: one id array per line, bytes of each line) for a chunk of (line number, raw line);
    a bad line comes back as its PreprocessError, raised by the reading process so that it cleans up."""
    tokenizer, json_keys = _worker["tokenizer"], _worker["json_keys"]
    try:
        texts = [_parse(number, raw, json_keys) for number, raw in chunk]
    except PreprocessError as error:
        return error, None
    encoded = []
    for k in range(len(json_keys)):
        ids = tokenizer.tokenize_batch([line_texts[k] for line_texts in texts])
        if _worker["append_eod"]:
            ids = [doc + [tokenizer.eod] for doc in ids]
        encoded.append([numpy.array(doc, dtype=_worker["dtype"]) for doc in ids])
    return encoded, [len(raw) for _, raw in chunk]


def _chunks(lines):
    chunk = []
    for number, line in enumerate(lines, start=1):
        chunk.append((number, line))
        if len(chunk) == CHUNK_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def preprocess(input_path, output_prefix, spec: TokenizerSpec, json_keys: Sequence[str] = ("text",),
               append_eod=False, workers=1, log_interval=1000,
               progress: Optional[Callable[[Progress], None]] = None) -> Progress:
    """Writes ``{output_prefix}_{key}_document.bin/.idx`` for each key and returns the final counts;
    ``progress`` is called every ``log_interval`` documents. A bad argument or line raises
    ValueError (PreprocessError for a line) and leaves no output file."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if log_interval < 1:
        raise ValueError(f"--log-interval must be at least 1, got {log_interval}")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must name distinct keys, got {list(json_keys)}")
    if not os.path.isfile(input_path):
        raise ValueError(f"--input {input_path} is not a file")
    tokenizer = spec.build()  # here first: a bad tokenizer argument fails before any worker starts
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    finals = output_prefixes(output_prefix, json_keys)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    temps = [f"{prefix}.{uuid.uuid4().hex}.tmp" for prefix in finals]
    done = Progress(outputs=finals)
    builders = []
    try:
        builders = [IndexedDatasetBuilder(get_bin_path(temp), dtype=dtype) for temp in temps]
        # Read as bytes: the workers decode, so a line that is not UTF-8 is reported by its number.
        with open(input_path, "rb") as lines, multiprocessing.Pool(
                workers, _init_worker, (spec, tuple(json_keys), append_eod, dtype)) as pool:
            start = time.perf_counter()
            for encoded, sizes in pool.imap(_encode_chunk, _chunks(lines)):
                if isinstance(encoded, PreprocessError):
                    raise PreprocessError(f"{input_path}: {encoded}")
                for line, size in enumerate(sizes):
                    for builder, docs in zip(builders, encoded):
                        if docs[line].size:
                            builder.add_document(docs[line], [docs[line].size])
                        else:
                            done.empty += 1
                    done.documents += 1
                    done.bytes += size
                    if progress and done.documents % log_interval == 0:
                        done.seconds = time.perf_counter() - start
                        progress(done)
            done.seconds = time.perf_counter() - start
        for builder, temp in zip(builders, temps):
            builder.finalize(get_idx_path(temp))
        for temp, final in zip(temps, finals):
            # .idx last: megatron-core's IndexedDataset.exists looks for both files.
            os.replace(get_bin_path(temp), get_bin_path(final))
            os.replace(get_idx_path(temp), get_idx_path(final))
    except BaseException:
        for builder in builders:
            builder.data_file.close()
        for temp in temps:
            for path in (get_bin_path(temp), get_idx_path(temp)):
                if os.path.exists(path):
                    os.remove(path)
        raise
    return done
