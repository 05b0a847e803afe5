"""Tokenizers: the project's byte tokenizer and Hugging Face `tokenizer.json` folders, behind one
surface that pretraining, SFT, GRPO and generation share.

Both implement (see `Tokenizer`):
    vocab_size                       ids lie in [0, vocab_size)
    bos_id, eos_id, pad_id           int or None
    special_tokens                   {"bos_token": "...", "eos_token": "...", ...}: the strings
                                     a chat template calls bos_token, eos_token, ...
    chat_template                    Jinja source, or None
    stop_ids                         ids that end an assistant turn during generation
    encode(text, special=False)      int32 ids; special=True turns special-token strings in `text`
                                     into their ids, special=False keeps them as plain text
    encode_with_offsets(text)        (ids, starts): starts[i] = the character offset where
                                     token i begins
    decode(ids, skip_special=True)   text
    apply_chat_template(messages)    the rendered conversation (`chat.render` with this tokenizer's
                                     template and special tokens)

`ByteTokenizer`: UTF-8 bytes shifted by 3 (0 pad, 1 BOS, 2 EOS), 259 ids, no training, exact round
trip. Its `encode(text)` and `decode(ids)` are the pretraining tokenizer, unchanged. With
special=True the strings "<|pad|>", "<|bos|>" and "<|eos|>" become ids 0, 1 and 2. Its built-in
chat template (`BYTE_CHAT_TEMPLATE`) renders, for a system, a user and an assistant message:

    <|bos|>System: {system}\\n
    User: {user}\\n
    Assistant: {assistant}<|eos|>\\n

that is "<|bos|>" once, then "System: {content}\\n", "User: {content}\\n" or
"Assistant: {content}<|eos|>\\n" per message, and "Assistant: " at the end when
add_generation_prompt is set. Any other role is an error naming it.

`HFTokenizer`: a folder the way `transformers` reads it (its tokenization_utils_base.py): the
vocabulary and merges from `tokenizer.json` through the `tokenizers` library; bos/eos/pad/unk/...
from `tokenizer_config.json`, each either a string or an AddedToken object {"content": ...};
`chat_template` from `chat_template.jinja` when that file exists (transformers >= 4.43 saves it
there), else from tokenizer_config.json, where it is a string or a list of {"name", "template"}
(the one named "default" is used; the others stay in `chat_templates`). Encoding never inserts a
BOS by itself (add_special_tokens=False): chat templates write their own. Not read:
special_tokens_map.json and added_tokens.json (the legacy slow-tokenizer files) and the
"add_bos_token" switch.
"""

import dataclasses
import json
import os
import re
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dsv3_jax.io import chat

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # BOS 0 / EOS 1 would collide with bytes; ours are offsets
BYTE_OFFSET = 3
BYTE_SPECIALS = {"<|pad|>": PAD_ID, "<|bos|>": BOS_ID, "<|eos|>": EOS_ID}
_BYTE_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in BYTE_SPECIALS))

# The byte tokenizer's chat format (module docstring). Jinja source, rendered by chat.render.
BYTE_CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'system' -%}\n"
    "    {{- 'System: ' + message['content'] + '\\n' -}}\n"
    "  {%- elif message['role'] == 'user' -%}\n"
    "    {{- 'User: ' + message['content'] + '\\n' -}}\n"
    "  {%- elif message['role'] == 'assistant' -%}\n"
    "    {{- 'Assistant: ' + message['content'] + eos_token + '\\n' -}}\n"
    "  {%- else -%}\n"
    "    {{- raise_exception('the byte tokenizer chat template has no role ' ~ message['role'] ~"
    " ' (message ' ~ loop.index0 ~ '); use system, user or assistant') -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- 'Assistant: ' -}}\n"
    "{%- endif -%}\n"
)

HF_INSTALL_HINT = "pip install 'dsv3-jax[hf]'"
# The named special tokens transformers hands a chat template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


@runtime_checkable
class Tokenizer(Protocol):
    """What SFT, GRPO and generation may rely on, whichever tokenizer they were given."""

    vocab_size: int
    special_tokens: dict[str, str]
    chat_template: str | None

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...

    @property
    def stop_ids(self) -> list[int]: ...

    def encode(self, text: str, *, special: bool = False) -> np.ndarray: ...

    def encode_with_offsets(self, text: str, *,
                            special: bool = True) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, ids, *, skip_special: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            **kwargs: Any) -> str: ...


class _ChatTemplated:
    """`apply_chat_template` shared by both tokenizers: chat.render with the tokenizer's own
    template and special-token strings."""

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        """The conversation rendered with this tokenizer's chat template (text, not ids)."""
        if self.chat_template is None:
            raise ValueError(f"apply_chat_template: {self!r} has no chat template"
                             f"{_template_names_hint(self)}; pass one to chat.render instead")
        return chat.render(self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **kwargs)


def _template_names_hint(tok) -> str:
    names = sorted(getattr(tok, "chat_templates", {}) or {})
    return f" named 'default' (it has {names})" if names else ""


# ---------------------------------------------------------------------------- bytes
@dataclasses.dataclass(frozen=True)
class ByteTokenizer(_ChatTemplated):
    """UTF-8 bytes shifted by 3 (0 pad, 1 BOS, 2 EOS): 259 ids, no training, exact round trip."""
    vocab_size: int = 256 + BYTE_OFFSET

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    chat_template = BYTE_CHAT_TEMPLATE

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}

    @property
    def stop_ids(self) -> list[int]:
        return [EOS_ID]

    def encode(self, text: str, *, special: bool = False) -> np.ndarray:
        """int32 ids of `text`'s UTF-8 bytes + 3; with special=True, "<|pad|>", "<|bos|>" and
        "<|eos|>" inside `text` become ids 0, 1, 2 (special=False: the pretraining encoding)."""
        if not special:
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + BYTE_OFFSET
        return self.encode_with_offsets(text, special=True)[0]

    def encode_with_offsets(self, text: str, *,
                            special: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], starts int64 [n]): every byte of a character starts at that
        character's offset; a special token starts where its string starts."""
        ids, starts = [], []
        pos = 0
        pieces = _BYTE_SPECIAL_RE.finditer(text) if special else iter(())
        for m in pieces:
            _append_bytes(text[pos:m.start()], pos, ids, starts)
            ids.append(np.array([BYTE_SPECIALS[m.group()]], np.int32))
            starts.append(np.array([m.start()], np.int64))
            pos = m.end()
        _append_bytes(text[pos:], pos, ids, starts)
        return np.concatenate(ids), np.concatenate(starts)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Text of the byte ids; ids 0-2 are dropped (skip_special) or written as their strings.
        Invalid UTF-8 (a cut multi-byte character) decodes to U+FFFD."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if skip_special:
            data = (ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).clip(0, 255).astype(np.uint8)
            return data.tobytes().decode("utf-8", errors="replace")
        names = {v: k for k, v in BYTE_SPECIALS.items()}
        out, run = [], []
        for i in ids.tolist():
            if i in names:
                out.append(self.decode(run))
                out.append(names[i])
                run = []
            else:
                run.append(i)
        out.append(self.decode(run))
        return "".join(out)


def _append_bytes(piece: str, offset: int, ids: list, starts: list) -> None:
    """Byte ids of `piece` and, for each, the offset of the character it belongs to."""
    data = piece.encode("utf-8")
    ids.append(np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET)
    codepoints = np.frombuffer(piece.encode("utf-32-le"), np.uint32)
    n_bytes = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    starts.append(np.repeat(offset + np.arange(len(piece), dtype=np.int64), n_bytes))


# ---------------------------------------------------------------------------- Hugging Face
def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"Hugging Face tokenizers need the `tokenizers` package: "
                          f"{HF_INSTALL_HINT}") from e
    return tokenizers


def _token_content(value: Any, field: str, path: str) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, an AddedToken object
    {"content": ...} (with or without "__type"), or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {field} must be a string or an object with a string 'content', "
                     f"got {value!r}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _chat_templates(folder: str, config: dict, config_path: str) -> dict[str, str]:
    """Every chat template of the folder by name, "default" being the one apply_chat_template
    uses: chat_template.jinja wins over tokenizer_config.json's chat_template field."""
    raw = config.get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for n, entry in enumerate(raw):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{config_path}: chat_template[{n}] must be an object with "
                                 "string 'name' and 'template'")
            templates[entry["name"]] = entry["template"]
    elif raw is not None:
        raise ValueError(f"{config_path}: chat_template must be a string or a list of "
                         f"{{name, template}}, got {type(raw).__name__}")
    extra = os.path.join(folder, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra, name), encoding="utf-8") as fh:
                    templates[name[:-len(".jinja")]] = fh.read()
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as fh:
            templates["default"] = fh.read()
    return templates


class HFTokenizer(_ChatTemplated):
    """A Hugging Face tokenizer: `tokenizers.Tokenizer` + the special tokens and chat template of
    its folder. Build it with `load_tokenizer(folder)`."""

    def __init__(self, tokenizer, *, special_tokens: dict[str, str] | None = None,
                 chat_templates: dict[str, str] | None = None,
                 extra_stop_ids: list[int] | tuple[int, ...] = (), name: str = "tokenizer"):
        tokenizers = _import_tokenizers()
        self.name = name
        # Two copies: one parses special-token strings, the other (encode_special_tokens) keeps
        # them as text; the switch is state of the Tokenizer object, so it is never flipped.
        self._parse = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._parse.encode_special_tokens = False
        self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self.vocab_size = int(self._parse.get_vocab_size(with_added_tokens=True))
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates = dict(chat_templates or {})
        self.chat_template = self.chat_templates.get("default")
        self._ids = {k: self._token_id(k, v) for k, v in self.special_tokens.items()}
        stops = ([self.eos_id] if self.eos_id is not None else []) + list(extra_stop_ids)
        for i in stops:
            if not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise ValueError(f"{name}: stop id {i!r} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        self._stop_ids = sorted(set(stops))

    def _token_id(self, field: str, token: str) -> int:
        i = self._parse.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.name}: {field} {token!r} is not in tokenizer.json's "
                             "vocabulary or added tokens")
        return int(i)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"

    @property
    def bos_id(self) -> int | None:
        return self._ids.get("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._ids.get("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._ids.get("pad_token")

    @property
    def stop_ids(self) -> list[int]:
        return list(self._stop_ids)

    def encode(self, text: str, *, special: bool = False) -> np.ndarray:
        """int32 ids of `text`, no BOS added. special=True: special-token strings (and the
        folder's other added tokens) become their ids; special=False: special tokens are text
        (added tokens that are not special, like DeepSeek's "<｜User｜>", are matched either way,
        as in tokenizers)."""
        return self.encode_with_offsets(text, special=special)[0]

    def encode_with_offsets(self, text: str, *,
                            special: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [n], starts int64 [n]): starts[i] is the character offset of token i as
        the tokenizers library reports it (a byte-level token that begins inside a multi-byte
        character starts at that character)."""
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        enc = (self._parse if special else self._plain).encode(text, add_special_tokens=False)
        starts = np.array([s for s, _ in enc.offsets], np.int64).reshape(-1)
        return np.array(enc.ids, np.int32).reshape(-1), starts

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens left out when skip_special. Ids outside the vocabulary
        are an error."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"decode: id {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.vocab_size}) of {self.name}")
        return self._parse.decode(ids.tolist(), skip_special_tokens=skip_special)


def load_tokenizer(folder: str | os.PathLike) -> HFTokenizer:
    """The Hugging Face tokenizer of `folder`: tokenizer.json (required), tokenizer_config.json
    (special tokens, chat template; optional), chat_template.jinja (optional, wins) and
    generation_config.json's eos_token_id (int or list: extra stop ids; optional)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"load_tokenizer: {folder} is not a folder")
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise ValueError(f"load_tokenizer: {folder} has no tokenizer.json (the Hugging Face fast "
                         "tokenizer file); copy it from the model's repository")
    tokenizers = _import_tokenizers()
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type for malformed files
        raise ValueError(f"{path}: the tokenizers library cannot read it ({e})") from None
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.exists(config_path) else {}
    special = {k: _token_content(config.get(k), k, config_path) for k in SPECIAL_TOKEN_NAMES}
    extra = []
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_path):
        eos = _read_json(gen_path).get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else list(eos or [])
    return HFTokenizer(tok, special_tokens=special,
                       chat_templates=_chat_templates(folder, config, config_path),
                       extra_stop_ids=extra, name=folder)


def tokenizer_for(hf_folder: str | os.PathLike | None, vocab_size: int) -> Tokenizer:
    """The tokenizer of a model: its folder's Hugging Face tokenizer when the folder has a
    tokenizer.json, else the byte tokenizer. Either must fit the model's `vocab_size`."""
    if hf_folder is not None and os.path.exists(os.path.join(hf_folder, "tokenizer.json")):
        tok = load_tokenizer(hf_folder)
        if tok.vocab_size > vocab_size:
            raise ValueError(f"tokenizer_for: {hf_folder}'s tokenizer has {tok.vocab_size} ids "
                             f"but the model's vocab_size is {vocab_size}")
        return tok
    byte = ByteTokenizer()
    if vocab_size < byte.vocab_size:
        where = f" ({hf_folder} has no tokenizer.json)" if hf_folder is not None else ""
        raise ValueError(f"tokenizer_for: the model's vocab_size is {vocab_size}, below the "
                         f"byte tokenizer's {byte.vocab_size} ids{where}; use a model with "
                         f"vocab_size >= {byte.vocab_size} or a folder with tokenizer.json")
    return byte
