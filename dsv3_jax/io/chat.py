"""Chat templates: render a conversation the way Hugging Face transformers does, find the
characters that belong to assistant turns (what SFT trains on) and tokenize conversations and
prompts.

Rendering follows transformers' `utils/chat_template_utils.py` (`_compile_jinja_template`,
`render_jinja_template`) and `tokenization_utils_base.py` (`apply_chat_template`), in our own
code: a jinja2 ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols
extension; a `tojson` filter that is `json.dumps` with ensure_ascii=False (indent, separators and
sort_keys may be passed); the globals `raise_exception(message)` (here a ValueError carrying the
template's message) and `strftime_now(format)`; the `{% generation %}...{% endgeneration %}` tag
accepted and rendered as its body; variables `messages`, `add_generation_prompt`, `tools` and
`documents` (None unless given), the special-token strings (bos_token, eos_token, pad_token,
unk_token, ...) and any keyword arguments, which override a special token of the same name.
Message keys whose value is None are dropped first, as transformers does. Stricter than
transformers: every message needs a string role and a string content (a tool-call turn with no
text has content ""; list-of-blocks multimodal content is refused). Not reproduced: the aliasing
of reasoning fields (reasoning_content / thinking / reasoning); transformers' hardened
`namespace` and `dict` globals (jinja2's own serve, inside its sandbox); and the "control
token" sanitizing of transformers 5, which encodes special-token strings found inside message
contents as plain text: here the whole render is tokenized with special tokens parsed (see
`tokenize_conversation`).
"""

import functools
import json
from datetime import datetime
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Tokenizer(Protocol):
    """The part of io.tokenizer.Tokenizer this module uses."""
    special_tokens: dict[str, str]
    chat_template: str | None

    def encode(self, text: str, *, special: bool = False) -> np.ndarray: ...

    def encode_with_offsets(self, text: str, *,
                            special: bool = True) -> tuple[np.ndarray, np.ndarray]: ...


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders as body. transformers uses the tag to
    record assistant character spans; `assistant_spans` finds them by prefix renders instead, so
    templates with and without the tag give the same spans."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: Any):
    raise ValueError(f"the chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template: Jinja syntax error at line {e.lineno}: {e.message}") \
            from None


def _checked_messages(messages: Any) -> list[dict]:
    """Copies of the messages without None values, after checking each is a dict with a string
    role and a string content."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                         f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got "
                             f"{type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{i}]['{key}'] must be a string, got "
                                 f"{type(m.get(key)).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
           special_tokens: dict[str, str] | None = None, **kwargs: Any) -> str:
    """The conversation rendered by the chat `template` (Jinja source), as transformers'
    apply_chat_template(..., tokenize=False) renders it (module docstring)."""
    if not isinstance(template, str) or not template:
        raise ValueError("render: template must be a non-empty string of Jinja source")
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    variables["messages"] = _checked_messages(messages)
    variables["add_generation_prompt"] = bool(add_generation_prompt)
    try:
        return _compile(template).render(**variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"render: the chat template failed: {type(e).__name__}: {e}") from None


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix (a binary search over slice comparisons, which run
    in C: renders are long and this runs twice per assistant turn of some templates)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def assistant_spans(template: str, messages: list[dict], *,
                    special_tokens: dict[str, str] | None = None,
                    **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the whole conversation rendered, and for each assistant message the
    character span [start, end) of `text` that the model must learn to write.

    For assistant message i: P = render(messages[:i], add_generation_prompt=True) is the prompt
    the model is given at generation time, F = render(messages[:i + 1]) the conversation up to
    and including the reply; the span is text[len(P):len(F)]. So the span holds what the
    template writes for the reply after its generation prompt: the content and the template's
    end-of-turn markers. Byte template: content + "<|eos|>" + "\\n" (the EOS, so the model learns
    to stop, and the newline the template puts after it). DeepSeek-V3: content +
    "<｜end▁of▁sentence｜>".

    Checks, each a ValueError naming the message index:
    - F must be a prefix of the whole render. A template that renders earlier turns differently
      once later ones follow (some drop earlier assistant turns' reasoning, e.g. everything before
      "</think>") is not prefix-consistent: no span of the whole text is what the model wrote.
    - P must be a prefix of F, with one exception: a generation prompt that ends with text the
      template never writes into a finished turn, like the "<think>\\n" DeepSeek-R1's template
      (and TRL's copy of DeepSeek-V3's) adds after "<｜Assistant｜>". Then the span starts where
      P and F part (after "<｜Assistant｜>"); the part point is measured against both F and a
      render whose reply is "\\0", so a reply that happens to begin like the extra text cannot
      move it. A P and F that already part at the start of the assistant turn (the generation
      prompt and the finished turn share no header) are an error.
    """
    text = render(template, messages, special_tokens=special_tokens, **kwargs)
    msgs = _checked_messages(messages)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(template, msgs[:i], add_generation_prompt=True,
                        special_tokens=special_tokens, **kwargs)
        upto = render(template, msgs[:i + 1], special_tokens=special_tokens, **kwargs)
        if not text.startswith(upto):
            at = _common_prefix_len(text, upto)
            raise ValueError(
                f"assistant_spans: messages[{i}] (assistant) renders differently once later "
                f"messages follow (the renders part at character {at}: "
                f"{upto[at:at + 40]!r} alone vs {text[at:at + 40]!r} in the whole conversation); "
                "the chat template is not prefix-consistent (some templates drop earlier turns' "
                "reasoning or rewrite earlier turns), so no part of the conversation is the "
                "reply as the model wrote it. Train on conversations that end at this reply, "
                "or use a template that renders every turn the same way")
        if upto.startswith(prompt):
            start = len(prompt)
        else:
            start = _header_end(template, msgs, i, prompt, upto, special_tokens, kwargs)
        spans.append((start, len(upto)))
    return text, spans


def _header_end(template, msgs, i, prompt, upto, special_tokens, kwargs) -> int:
    """Where the reply of message i starts when the generation prompt P is not a prefix of the
    render F up to the reply (assistant_spans' docstring)."""
    before = render(template, msgs[:i], special_tokens=special_tokens, **kwargs)
    probe = render(template, msgs[:i] + [{**msgs[i], "content": "\0"}],
                   special_tokens=special_tokens, **kwargs)
    if not (prompt.startswith(before) and upto.startswith(before) and probe.startswith(before)):
        raise ValueError(
            f"assistant_spans: messages[{i}] (assistant): the conversation before it renders "
            "differently with and without the generation prompt; the chat template is not "
            "prefix-consistent")
    start = min(_common_prefix_len(prompt, upto), _common_prefix_len(prompt, probe))
    if start <= len(before):
        raise ValueError(
            f"assistant_spans: messages[{i}] (assistant): the generation prompt "
            f"{prompt[len(before):]!r} is not how the template begins a finished assistant turn "
            f"({upto[len(before):len(before) + 40]!r}...); the chat template is not "
            "prefix-consistent")
    return start


def tokenize_conversation(tokenizer: _Tokenizer, messages: list[dict],
                          **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], assistant_mask bool [n]) of a whole conversation: the tokenizer's chat
    template renders it once, the text is tokenized once with special-token strings parsed, and
    mask[i] is True when token i starts inside an assistant span (`assistant_spans`). Special
    token strings written inside message contents are parsed too (transformers 5 would keep
    them as text)."""
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenize_conversation: {tokenizer!r} has no chat template")
    text, spans = assistant_spans(tokenizer.chat_template, messages,
                                  special_tokens=tokenizer.special_tokens, **kwargs)
    ids, starts = tokenizer.encode_with_offsets(text, special=True)
    inside = np.zeros(len(text) + 1, bool)
    for s, e in spans:
        inside[s:e] = True
    return np.asarray(ids, np.int32), inside[np.asarray(starts, np.int64)]


def tokenize_prompt(tokenizer: _Tokenizer, messages_or_text: list[dict] | str,
                    **kwargs: Any) -> np.ndarray:
    """int32 ids to start generation from: a list of messages is rendered by the tokenizer's
    chat template with add_generation_prompt=True and tokenized with special tokens parsed;
    a string is encoded as is (special-token strings stay text, no BOS is added)."""
    if isinstance(messages_or_text, str):
        return np.asarray(tokenizer.encode(messages_or_text), np.int32)
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenize_prompt: {tokenizer!r} has no chat template; pass plain text")
    text = render(tokenizer.chat_template, messages_or_text, add_generation_prompt=True,
                  special_tokens=tokenizer.special_tokens, **kwargs)
    return np.asarray(tokenizer.encode(text, special=True), np.int32)
