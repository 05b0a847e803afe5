"""SFT data: chat records -> token rows with an assistant-only loss mask, packed without
cross-conversation attention, sampled deterministically by step.

Records (JSONL, one per line): `{"messages": [{"role", "content"}, ...]}`, or
`{"prompt": ..., "completion": ...}` where the prompt is a string (one user message) or a list
of messages and the completion is the assistant's reply. Each becomes one conversation,
rendered with the tokenizer's chat template and tokenized once (`io.chat.tokenize_conversation`):
ids x [n] and a mask of the tokens inside assistant messages.

Rows: a conversation of n tokens gives n - 1 (input, target) pairs; the loss counts a pair
when its target is an assistant token (the prompt, the template's markers and other turns are
context only; TRL's `assistant_only_loss`). With packing, a row of `seq_len` pairs holds
several whole conversations, each its own segment: `segment_ids` 1, 2, ... (0 = padding) keep
attention inside a conversation and `positions` restart at 0 for each, so a packed
conversation computes exactly what it would alone (MaxText/grain's segment ids and positions;
TRL's padding-free packing resets position ids the same way). Without packing, one
conversation per row.

Order: epoch e visits the conversations in a permutation drawn from (seed, e), packed into
rows in that order (next fit: a conversation that does not fit the current row starts the
next one); the global batch of step s is rows s*B .. s*B+B-1 of the endless sequence of rows,
so the batch is a pure function of the step and a checkpoint's data position is its step.
"""

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from dsv3_jax.io import chat
from dsv3_jax.train.data import DataError

ROW_KEYS = ("inputs", "targets", "mask", "segment_ids", "positions")


def read_jsonl(path: str | pathlib.Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-empty line; errors name the file and line."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}: a record must be a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    if not out:
        raise DataError(f"{p}: no records")
    return out


def to_messages(rec: dict, where: str = "record") -> list[dict]:
    """A record's conversation as a list of messages (see the module docstring)."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        return msgs
    if "prompt" in rec and "completion" in rec:
        prompt, completion = rec["prompt"], rec["completion"]
        if not isinstance(completion, str):
            raise DataError(f"{where}: \"completion\" must be a string")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise DataError(f"{where}: \"prompt\" must be a string or a non-empty list of "
                            "messages")
        return list(prompt) + [{"role": "assistant", "content": completion}]
    raise DataError(f"{where}: a record needs \"messages\", or \"prompt\" and \"completion\" "
                    f"(it has {sorted(rec)})")


@dataclasses.dataclass
class Encoded:
    """Tokenized conversations, each at most seq_len + 1 tokens."""
    ids: list  # [np.ndarray int32 [n]]
    masks: list  # [np.ndarray bool [n]]: token is inside an assistant message
    truncated: int  # conversations cut to seq_len + 1 tokens
    dropped: int  # conversations with no assistant token left after the cut


def encode(conversations: list[list[dict]], tokenizer, seq_len: int,
           names: list[str] | None = None) -> Encoded:
    """Tokenize every conversation (cut to seq_len + 1 tokens, counted in `truncated`; one left
    with no assistant token to learn from is dropped, counted in `dropped`). A conversation
    with no assistant message at all is an error naming it."""
    ids, masks, truncated, dropped = [], [], 0, 0
    for i, msgs in enumerate(conversations):
        where = names[i] if names else f"conversation {i}"
        try:
            x, m = chat.tokenize_conversation(tokenizer, msgs)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if not m.any():
            raise DataError(f"{where}: no assistant message: nothing to learn from")
        if len(x) > seq_len + 1:
            x, m = x[:seq_len + 1], m[:seq_len + 1]
            truncated += 1
            if not m[1:].any():
                dropped += 1
                continue
        bad = x[(x < 0) | (x >= tokenizer.vocab_size)]
        if bad.size:
            raise DataError(f"{where}: token id {int(bad[0])} outside the tokenizer's vocabulary")
        ids.append(np.asarray(x, np.int32))
        masks.append(np.asarray(m, bool))
    if not ids:
        raise DataError("no conversation left to train on")
    return Encoded(ids, masks, truncated, dropped)


def layout(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict:
    """One row [seq_len] per call: the (ids, mask) conversations given, each a segment."""
    row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
           "mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32)}
    at = 0
    for seg, (x, m) in enumerate(examples, 1):
        n = len(x) - 1
        if at + n > seq_len:
            raise ValueError(f"conversations of {at + n} pairs do not fit a row of {seq_len}")
        row["inputs"][at:at + n] = x[:-1]
        row["targets"][at:at + n] = x[1:]
        row["mask"][at:at + n] = m[1:]
        row["segment_ids"][at:at + n] = seg
        row["positions"][at:at + n] = np.arange(n)
        at += n
    return row


class SFTDataset:
    """Rows of conversations for SFT, sampled by step (see the module docstring)."""

    def __init__(self, data: Encoded, seq_len: int, global_batch: int, seed: int,
                 packing: bool = True):
        self.data, self.seq_len, self.global_batch = data, seq_len, global_batch
        self.seed, self.packing = seed, packing
        self._epochs: list[list[list[int]]] = []  # per epoch: rows of conversation indices
        h = hashlib.sha256()
        for x, m in zip(data.ids, data.masks):
            h.update(x.tobytes())
            h.update(np.packbits(m).tobytes())
        self.fingerprint = h.hexdigest()[:16]
        self.assistant_tokens = int(sum(m[1:].sum() for m in data.masks))

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = np.random.default_rng([self.seed, e]).permutation(len(self.data.ids))
            rows, cur, used = [], [], 0
            for i in order.tolist():
                n = len(self.data.ids[i]) - 1
                if cur and (not self.packing or used + n > self.seq_len):
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += n
            rows.append(cur)
            self._epochs.append(rows)
        return self._epochs[epoch]

    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows(0))

    def _row(self, k: int) -> list[int]:
        """Conversation indices of global row k (epochs of different row counts chained)."""
        epoch = 0
        while k >= len(self._epoch_rows(epoch)):
            k -= len(self._epoch_rows(epoch))
            epoch += 1
        return self._epoch_rows(epoch)[k]

    def rows(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """{ROW_KEYS} [rows, seq_len] of the global batch of `step` (or of its `rows`)."""
        ks = np.arange(self.global_batch)[rows if rows is not None else slice(None)]
        ks = ks + step * self.global_batch
        out = [layout([(self.data.ids[i], self.data.masks[i]) for i in self._row(int(k))],
                      self.seq_len) for k in ks]
        return {key: np.stack([r[key] for r in out]) for key in ROW_KEYS}

    def state(self, step: int) -> dict:
        """What a checkpoint records of the data (the resume check compares it)."""
        return {"step": step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "packing": self.packing,
                "conversations": len(self.data.ids), "fingerprint": self.fingerprint}
