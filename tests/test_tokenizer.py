"""Tokenizers (byte and Hugging Face) and chat templates: round trips, special-token parsing,
offsets, renders against transformers' own output, assistant masks, and the errors.

Fixtures: tests/fixtures/chat/ (README.md there): DeepSeek-V3's chat template as TRL keeps it, a
tiny byte-level BPE with DeepSeek's special tokens, and what transformers 5.25 renders (and
tokenizes) for six conversations, made by tests/fixtures/chat/make_chat_fixtures.py.
"""

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import tokenizers

from dsv3_jax.io import chat
from dsv3_jax.io.tokenizer import (BYTE_CHAT_TEMPLATE, ByteTokenizer, HFTokenizer, Tokenizer,
                                   load_tokenizer, tokenizer_for)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# sha256 of tests/fixtures/chat/deepseek_v3.jinja = TRL's trl/chat_templates/deepseekv3.jinja
TEMPLATE_SHA256 = "563b1ce7d61d50a9b4c7439a912a1116f095b712df5b5e4d3e1116049874eb64"


@pytest.fixture(scope="module")
def chat_dir(fixtures_dir):
    return fixtures_dir / "chat"


@pytest.fixture(scope="module")
def expected(chat_dir):
    return json.loads((chat_dir / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def hf(chat_dir):
    return load_tokenizer(chat_dir / "tiny_tokenizer")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


# ---------------------------------------------------------------------------- byte tokenizer
@pytest.mark.parametrize("text", ["plain ASCII, 123\n\t", "héllo 日本語 🙂 ✓", ""])
def test_byte_encode_is_utf8_plus_three_and_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.stop_ids == [2]


def test_byte_special_strings_are_parsed_only_when_asked():
    tok = ByteTokenizer()
    text = "a<|eos|>b<|bos|><|pad|>"
    plain = tok.encode(text)
    assert plain.tolist() == [b + 3 for b in text.encode()]  # 23 bytes, no id below 3
    parsed = tok.encode(text, special=True)
    assert parsed.tolist() == [ord("a") + 3, 2, ord("b") + 3, 1, 0]
    assert tok.decode(parsed) == "ab"  # specials skipped, as pretraining's decode did
    assert tok.decode(parsed, skip_special=False) == text
    assert tok.decode(plain) == text


def test_byte_offsets_point_at_each_tokens_character():
    tok = ByteTokenizer()
    text = "aé<|bos|>日x"
    ids, starts = tok.encode_with_offsets(text)
    # a: 1 byte at 0; é: 2 bytes at 1; <|bos|> at 2 (7 characters); 日: 3 bytes at 9; x at 10
    assert ids.tolist() == [100, 0xC3 + 3, 0xA9 + 3, 1, 0xE6 + 3, 0x97 + 3, 0xA5 + 3, 123]
    assert starts.tolist() == [0, 1, 1, 2, 9, 9, 9, 10]
    ids_plain, starts_plain = tok.encode_with_offsets("é<|eos|>", special=False)
    assert ids_plain.tolist() == tok.encode("é<|eos|>").tolist()
    assert starts_plain.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7]


def test_byte_chat_template_writes_the_documented_format():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    want = "<|bos|>System: S\nUser: U1\nAssistant: A1<|eos|>\nUser: U2\n"
    assert tok.apply_chat_template(msgs) == want
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == want + "Assistant: "
    assert tok.chat_template == BYTE_CHAT_TEMPLATE


def test_byte_tokenizer_is_still_the_one_pretraining_imports():
    from dsv3_jax.train import data

    assert data.ByteTokenizer is ByteTokenizer
    assert (data.PAD_ID, data.BOS_ID, data.EOS_ID, data.BYTE_OFFSET) == (0, 1, 2, 3)
    assert isinstance(ByteTokenizer(), Tokenizer)


# ---------------------------------------------------------------------------- HF tokenizer
def test_hf_fixture_loads_special_tokens_and_stop_ids(hf):
    assert isinstance(hf, HFTokenizer) and isinstance(hf, Tokenizer)
    assert hf.vocab_size == 384
    assert hf.special_tokens == {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 1)
    assert hf.stop_ids == [1]


@pytest.mark.parametrize("text", ["Hello! Who are you?", "Réponds en français. 日本語 🙂 ✓ °C",
                                  "unseen words: zyxwvut qq", ""])
def test_hf_round_trip(hf, text):
    ids = hf.encode(text)
    assert ids.dtype == np.int32 and (ids >= 0).all() and (ids < hf.vocab_size).all()
    assert hf.decode(ids) == text


def test_hf_special_tokens_parsed_only_when_asked(hf):
    text = f"{BOS}Hi<｜User｜>there{EOS}"
    parsed = hf.encode(text, special=True)
    assert parsed[0] == 0 and parsed[-1] == 1
    assert hf.decode(parsed) == "Hi<｜User｜>there"  # specials skipped; <｜User｜> is not special
    assert hf.decode(parsed, skip_special=False) == text
    plain = hf.encode(text, special=False)
    assert 0 not in plain.tolist() and 1 not in plain.tolist()
    assert len(plain) > len(parsed) + 10  # each special string spelled out in byte pieces
    assert hf.decode(plain) == text
    with pytest.raises(ValueError, match="id 384 is outside the vocabulary"):
        hf.decode([5, 384])


def test_hf_offsets_delimit_each_token(hf, chat_dir):
    text = f"{BOS}Hello world<｜User｜>What is 2 + 3?{EOS}"
    ids, starts = hf.encode_with_offsets(text)
    assert ids.tolist() == hf.encode(text, special=True).tolist()
    ends = [*starts[1:].tolist(), len(text)]
    pieces = [text[s:e] for s, e in zip(starts.tolist(), ends)]
    assert pieces == [hf.decode([i], skip_special=False) for i in ids.tolist()]
    # multi-byte characters: a byte-level token that begins inside a character starts at that
    # character. Independently: each token's bytes (its byte-level string, one character per
    # byte), accumulated, mapped back to the character holding the token's first byte.
    text = f"日本語 🙂 ok{EOS}é"
    ids, starts = hf.encode_with_offsets(text)
    raw = tokenizers.Tokenizer.from_file(str(chat_dir / "tiny_tokenizer" / "tokenizer.json"))
    added = {t.content for t in raw.get_added_tokens_decoder().values()}
    n_bytes = [len(t.encode()) if t in added else len(t)
               for t in map(raw.id_to_token, ids.tolist())]
    char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode()) for c in text])
    first_bytes = np.concatenate([[0], np.cumsum(n_bytes)[:-1]])
    assert sum(n_bytes) == len(text.encode())
    assert starts.tolist() == char_of_byte[first_bytes].tolist()
    assert len(set(starts.tolist())) < len(starts)  # some characters do span several tokens


def _copy_tokenizer(chat_dir, tmp_path, config: dict | None = None):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(chat_dir / "tiny_tokenizer" / "tokenizer.json", folder)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_hf_chat_template_sources(chat_dir, tmp_path):
    folder = _copy_tokenizer(chat_dir, tmp_path, {
        "bos_token": {"__type": "AddedToken", "content": BOS}, "eos_token": EOS,
        "chat_template": [{"name": "default", "template": "D{{ bos_token }}"},
                          {"name": "tool_use", "template": "T"}]})
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template([]) == "D" + BOS
    assert sorted(tok.chat_templates) == ["default", "tool_use"]
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}", encoding="utf-8")
    assert load_tokenizer(folder).apply_chat_template([]) == "J" + EOS  # the .jinja file wins
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no chat template named 'default' \(it has \['rag'\]\)"):
        load_tokenizer(folder).apply_chat_template([])


def test_hf_stop_ids_from_generation_config(chat_dir, tmp_path):
    folder = _copy_tokenizer(chat_dir, tmp_path, {"eos_token": EOS})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 371]}))
    tok = load_tokenizer(folder)
    assert tok.stop_ids == [1, 371] and tok.eos_id == 1 and tok.bos_id is None
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9999}))
    with pytest.raises(ValueError, match="stop id 9999 is outside the vocabulary"):
        load_tokenizer(folder)


def test_hf_loading_errors(chat_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        load_tokenizer(tmp_path / "missing")
    folder = _copy_tokenizer(chat_dir, tmp_path, {"eos_token": "<|not-a-token|>"})
    with pytest.raises(ValueError, match="eos_token '<|not-a-token|>' is not in"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": 7}))
    with pytest.raises(ValueError, match="bos_token must be a string or an object"):
        load_tokenizer(folder)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the package were missing
    with pytest.raises(ImportError, match=r"pip install 'dsv3-jax\[hf\]'"):
        load_tokenizer(folder)


def test_tokenizer_for_picks_by_folder_and_checks_vocab(chat_dir, tmp_path):
    assert isinstance(tokenizer_for(chat_dir / "tiny_tokenizer", 400), HFTokenizer)
    assert isinstance(tokenizer_for(None, 259), ByteTokenizer)
    assert isinstance(tokenizer_for(tmp_path, 1000), ByteTokenizer)  # no tokenizer.json
    with pytest.raises(ValueError, match="vocab_size is 100, below the byte tokenizer's 259"):
        tokenizer_for(None, 100)
    with pytest.raises(ValueError, match="has 384 ids but the model's vocab_size is 300"):
        tokenizer_for(chat_dir / "tiny_tokenizer", 300)


# ---------------------------------------------------------------------------- rendering
def test_fixture_template_is_trls_copy(chat_dir):
    data = (chat_dir / "deepseek_v3.jinja").read_bytes()
    assert hashlib.sha256(data).hexdigest() == TEMPLATE_SHA256
    config = json.loads((chat_dir / "tiny_tokenizer" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == data.decode("utf-8")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_deepseek_renders_and_ids_equal_transformers(hf, expected, generation_prompt):
    suffix = "_generation_prompt" if generation_prompt else ""
    for name, want in expected["deepseek_v3"].items():
        messages = expected["conversations"][name]
        text = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert text == want["render" + suffix], name
        assert hf.encode(text, special=True).tolist() == want["ids" + suffix], name
        direct = chat.render(hf.chat_template, messages, add_generation_prompt=generation_prompt,
                             special_tokens=hf.special_tokens)
        assert direct == text


def test_byte_template_renders_equal_transformers(expected):
    tok = ByteTokenizer()
    for name, want in expected["byte"].items():
        messages = expected["conversations"][name]
        assert tok.apply_chat_template(messages) == want["render"], name
        assert (tok.apply_chat_template(messages, add_generation_prompt=True)
                == want["render_generation_prompt"]), name


def test_render_environment_features():
    msgs = [{"role": "user", "content": "x", "tool_calls": None}]
    template = ("{{ messages[0] | tojson }}|{{ {'b': 'é', 'a': 1} | tojson(sort_keys=True) }}|"
                "{% generation %}G{{ bos_token }}{% endgeneration %}|"
                "{{ 'tool_calls' in messages[0] }}|"
                "{{ tools is none }}|{{ extra }}|{% for i in range(5) %}{% if i == 2 %}{% break %}"
                "{% endif %}{{ i }}{% endfor %}|{{ strftime_now('%Y') | length }}")
    out = chat.render(template, msgs, special_tokens={"bos_token": "<s>"}, extra="kw")
    assert out == '{"role": "user", "content": "x"}|{"a": 1, "b": "é"}|G<s>|False|True|kw|01|4'
    # trim_blocks drops the newline after a tag, lstrip_blocks the indentation before one
    assert chat.render("{% if true %}\nx\n  {% endif %}\ny", []) == "x\ny"
    # keyword arguments override a special token of the same name, as in transformers
    assert chat.render("{{ bos_token }}", [], special_tokens={"bos_token": "<s>"},
                       bos_token="B") == "B"
    with pytest.raises(ValueError, match="rejected the conversation: no way"):
        chat.render("{{ raise_exception('no way') }}", [])
    with pytest.raises(ValueError, match="Jinja syntax error at line 1"):
        chat.render("{% if %}", [])
    with pytest.raises(ValueError, match="the chat template failed: SecurityError"):
        chat.render("{{ messages.append(1) }}", [])


@pytest.mark.parametrize("messages, match", [
    ({"role": "user", "content": "x"}, "messages must be a list"),
    ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
     r"messages\[1\]\['content'\] must be a string, got NoneType"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\] must be a string"),
])
def test_bad_messages_name_the_index(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.render(BYTE_CHAT_TEMPLATE, messages)


def test_byte_template_rejects_unknown_roles():
    msgs = [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]
    with pytest.raises(ValueError, match="has no role tool \\(message 1\\)"):
        ByteTokenizer().apply_chat_template(msgs)


# ---------------------------------------------------------------------------- assistant masks
def test_byte_mask_covers_exactly_assistant_content_and_eos(expected):
    tok = ByteTokenizer()
    messages = expected["conversations"]["unicode_two_systems"][:4] + [
        {"role": "user", "content": "Encore ?"}, {"role": "assistant", "content": "Oui — 🙂"}]
    ids, mask = chat.tokenize_conversation(tok, messages)
    text = tok.apply_chat_template(messages)
    assert ids.tolist() == tok.encode(text, special=True).tolist() and mask.dtype == bool
    runs = [tok.decode(ids[s:e], skip_special=False) for s, e in _runs(mask)]
    assert runs == ["こんにちは — bonjour ! 🙂<|eos|>\n", "Oui — 🙂<|eos|>\n"]
    # everything else is the prompt: the unmasked tokens spell the rest of the render
    rest = tok.decode(ids[~mask], skip_special=False)
    assert rest == text.replace(runs[0], "").replace(runs[1], "")


def test_deepseek_mask_covers_exactly_assistant_content_and_eos(hf, expected):
    for name, messages in expected["conversations"].items():
        ids, mask = chat.tokenize_conversation(hf, messages)
        assert ids.tolist() == expected["deepseek_v3"][name]["ids"], name
        runs = [hf.decode(ids[s:e], skip_special=False) for s, e in _runs(mask)]
        replies = [m["content"].split("</think>")[-1] for m in messages
                   if m["role"] == "assistant"]
        if name == "tool_call":  # the reply is the tool call the template writes
            replies[0] = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                          'get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>'
                          "<｜tool▁calls▁end｜>")
        assert runs == [r + EOS for r in replies], name
        for s, _ in _runs(mask):  # the prompt side ends with the assistant header or tool outputs
            assert hf.decode(ids[s - 1:s], skip_special=False) in ("<｜Assistant｜>",
                                                                  "<｜tool▁outputs▁end｜>")


def test_deepseek_generation_prompt_prefill_is_cut_at_the_header(hf):
    """The template's generation prompt is "<｜Assistant｜><think>\\n" but a finished turn is
    "<｜Assistant｜>" + reply: the span starts after the header even when the reply itself
    begins like "<think>\\n" does."""
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<thin ice"}]
    text, spans = chat.assistant_spans(hf.chat_template, msgs, special_tokens=hf.special_tokens)
    assert [text[s:e] for s, e in spans] == ["<thin ice" + EOS]
    assert text[:spans[0][0]] == BOS + "<｜User｜>Q<｜Assistant｜>"


def test_templates_that_are_not_prefix_consistent_are_errors():
    drops_old_replies = ("{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}"
                         "{% elif loop.last %}A:{{ m['content'] }};{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    msgs = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "2"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match=r"messages\[1\] \(assistant\) renders differently"):
        chat.assistant_spans(drops_old_replies, msgs)
    assert chat.assistant_spans(drops_old_replies, msgs[:2]) == ("U:1A:a;", [(5, 7)])
    other_header = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
                    "{% if add_generation_prompt %}bot:{% endif %}")
    with pytest.raises(ValueError, match=r"messages\[1\] \(assistant\): the generation prompt "
                                         r"'bot:' is not how"):
        chat.assistant_spans(other_header, msgs[:2])


def test_tokenize_prompt(hf, expected):
    msgs = expected["conversations"]["prompt_only"]
    ids = chat.tokenize_prompt(hf, msgs)
    assert ids.tolist() == expected["deepseek_v3"]["prompt_only"]["ids_generation_prompt"]
    text_ids = chat.tokenize_prompt(hf, f"1 + 1 ={EOS}")
    assert 1 not in text_ids.tolist() and hf.decode(text_ids) == f"1 + 1 ={EOS}"
    byte = ByteTokenizer()
    assert (byte.decode(chat.tokenize_prompt(byte, msgs), skip_special=False)
            == "<|bos|>System: Answer in one word.\nUser: Capital of France?\nAssistant: ")
    assert chat.tokenize_prompt(byte, "ab").tolist() == [100, 101]
