"""Pretraining data: a byte-level tokenizer, packed fixed-length sequences, and a deterministic,
resumable sampler whose whole state is the step number.

Corpus: text files or JSONL files (one document per file, or per JSONL line's text field), or the
embedded default, the Python standard library's own sources, which every machine with Python
has. Documents become [BOS] bytes [EOS] and are concatenated into one token stream (V3
pre-training packs documents with no cross-document masking, [PAPER] §4.1), cut into windows of
seq_len + 1 tokens (inputs and next-token targets).

Order: epoch e visits the windows in a permutation drawn from (seed, e); the global batch of step
s holds samples s*B .. s*B+B-1 of that endless sequence. The sampler state is just the step,
stored in every checkpoint: resuming replays exactly the batches an uninterrupted run would see.
Several processes: each process materialises only the rows of the global batch its own devices
hold (`rows`), so hosts read disjoint rows, none twice, none skipped.

Why not grain: its iterator state is per process (`process_{i}-of-{n}.json`) and restoring with a
different process count needs a separate path; an index permutation keyed by the step is
deterministic under any process count and trivially checkpointed (training_systems.md §8).
"""

import hashlib
import json
import os
import pathlib
import sysconfig

import numpy as np

# The byte tokenizer lives with the other tokenizers in io/tokenizer.py; re-exported here.
from dsv3_jax.io.tokenizer import BOS_ID, BYTE_OFFSET, EOS_ID, PAD_ID, ByteTokenizer  # noqa: F401


class DataError(ValueError):
    """Bad training data: empty corpus, undecodable file, impossible sequence length."""


def embedded_corpus_files(limit_bytes: int | None = None) -> list[pathlib.Path]:
    """The standard library's top-level .py files, sorted (same list on every machine with the
    same Python), up to about `limit_bytes`."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        files.append(path)
        total += path.stat().st_size
        if limit_bytes is not None and total >= limit_bytes:
            break
    if not files:
        raise DataError(f"no Python sources under {root} for the embedded corpus")
    return files


def _read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason}); convert it or "
                        "leave it out") from None


def read_documents(paths: list[str | os.PathLike], text_field: str = "text") -> list[str]:
    """Documents from .txt-like files (one per file) and .jsonl files (one per line's field)."""
    docs = []
    for p in map(pathlib.Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such data file")
        if p.suffix == ".jsonl":
            for n, line in enumerate(_read_text(p).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{p}:{n}: no string field {text_field!r}")
                docs.append(record[text_field])
        else:
            docs.append(_read_text(p))
    return [d for d in docs if d]


def pack(docs: list[str], tokenizer: ByteTokenizer) -> np.ndarray:
    """One int32 stream of [BOS] doc [EOS] for every document."""
    parts = []
    for d in docs:
        parts += [np.array([BOS_ID], np.int32), tokenizer.encode(d), np.array([EOS_ID], np.int32)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class PackedDataset:
    """Fixed windows of seq_len + 1 tokens over a packed stream, sampled deterministically."""

    def __init__(self, stream: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if seq_len < 1 or global_batch < 1:
            raise DataError(f"seq_len ({seq_len}) and global_batch ({global_batch}) must be >= 1")
        self.stream, self.seq_len, self.global_batch, self.seed = stream, seq_len, global_batch, seed
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the corpus has {len(stream)} tokens: not enough for one sequence of "
                            f"{seq_len} + 1 tokens")
        self.fingerprint = hashlib.sha256(stream.tobytes()).hexdigest()[:16]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def sample_ids(self, step: int, rows: slice | None = None) -> np.ndarray:
        """Window ids of the global batch of `step` (or of its `rows`)."""
        start = step * self.global_batch
        idx = np.arange(self.global_batch)[rows if rows is not None else slice(None)] + start
        epochs, pos = np.divmod(idx, self.n_windows)
        out = np.empty(len(idx), np.int64)
        for e in np.unique(epochs):
            out[epochs == e] = self._epoch_order(int(e))[pos[epochs == e]]
        return out

    def rows(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """{"inputs", "targets"} [rows, seq_len] int32 of the global batch of `step`."""
        ids = self.sample_ids(step, rows)
        offsets = ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None]
        windows = self.stream[offsets]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def state(self, step: int) -> dict:
        """What a checkpoint records of the data: enough to check a resume is consistent."""
        return {"step": step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "n_windows": self.n_windows,
                "fingerprint": self.fingerprint, "tokens_consumed": step * self.global_batch * self.seq_len}


def build_dataset(paths: list[str] | None, *, seq_len: int, global_batch: int, seed: int,
                  vocab_size: int, max_seq_len: int, text_field: str = "text",
                  embedded_bytes: int | None = None) -> tuple[PackedDataset, ByteTokenizer]:
    """The training set from `paths`, or the embedded corpus when None."""
    tok = ByteTokenizer()
    if tok.vocab_size > vocab_size:
        raise DataError(f"the byte tokenizer needs vocab_size >= {tok.vocab_size}; the preset "
                        f"has {vocab_size}")
    if seq_len > max_seq_len:
        raise DataError(f"--seq_len {seq_len} is above the preset's maximum of {max_seq_len} "
                        "positions")
    files = paths if paths else embedded_corpus_files(embedded_bytes)
    docs = read_documents(files, text_field)
    if not docs:
        raise DataError(f"the corpus is empty: no text in {len(files)} file(s)")
    return PackedDataset(pack(docs, tok), seq_len, global_batch, seed), tok
