"""SFT: assistant-only loss tokens, packing that never leaks across conversations, the packed
and unpacked layouts agreeing, distillation toward an identical teacher, and the job's exact
resume through the shared loop."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.io.tokenizer import ByteTokenizer
from dsv3_jax.train import sft, sources
from dsv3_jax.train.data import DataError
from dsv3_jax.train.loss import LossWeights, loss_fn
from dsv3_jax.train.sft_data import SFTDataset, encode, layout, to_messages

CONVS = [
    [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "hi ü"}],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue"}],
]


@pytest.fixture(scope="module")
def tiny():
    cfg = dsv3_jax.get_config("tiny")
    return cfg, dsv3_jax.init_params(cfg, jax.random.key(0))


def test_loss_tokens_are_the_assistant_tokens():
    tok = ByteTokenizer()
    enc = encode(CONVS, tok, seq_len=256)
    ds = SFTDataset(enc, 256, global_batch=1, seed=0, packing=True)
    rows = ds.rows(0)
    # independent count: each assistant reply's UTF-8 bytes + its EOS + the newline after it
    # (the byte template's turn ends "<|eos|>\n"; the first token is BOS, never a target)
    want = sum(len(m["content"].encode()) + 2 for c in CONVS for m in c
               if m["role"] == "assistant")
    assert ds.assistant_tokens == want
    assert rows["mask"].sum() == want  # one epoch of 3 conversations packs into 1 row
    targets = rows["targets"][rows["mask"] > 0]
    # the masked targets, in order, are exactly the replies (+ EOS and newline)
    got = tok.decode(targets)
    assert sorted(got.split("\n")[:-1]) == sorted(["4", "hello there", "hi ü", "blue"])
    assert (targets == 2).sum() == 4  # one EOS per reply: the model learns to stop


def test_prompt_completion_records_and_errors():
    assert to_messages({"prompt": "a", "completion": "b"}) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="x.jsonl:3"):
        to_messages({"text": "a"}, "x.jsonl:3")
    with pytest.raises(DataError, match="no assistant message"):
        encode([[{"role": "user", "content": "a"}]], ByteTokenizer(), 64, ["f.jsonl:1"])


def test_truncation_is_counted_and_empty_cuts_dropped():
    tok = ByteTokenizer()
    long = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]
    enc = encode([long, CONVS[0]], tok, seq_len=30)
    assert enc.truncated == 1 and enc.dropped == 1 and len(enc.ids) == 1


def _packed_and_unpacked(seq_len=160):
    tok = ByteTokenizer()
    enc = encode(CONVS, tok, seq_len=seq_len)
    examples = list(zip(enc.ids, enc.masks))
    packed = layout(examples, seq_len)
    unpacked = [layout([e], seq_len) for e in examples]
    return ({k: jnp.asarray(v[None]) for k, v in packed.items()},
            {k: jnp.asarray(np.stack([u[k] for u in unpacked])) for k in packed})


def test_packed_and_unpacked_layouts_give_the_same_loss(tiny):
    cfg, params = tiny
    packed, unpacked = _packed_and_unpacked()
    assert packed["mask"].sum() == unpacked["mask"].sum()
    w = LossWeights(mtp=0.0, balance=0.0)
    lp, mp = loss_fn(params, packed, cfg, weights=w)
    lu, mu = loss_fn(params, unpacked, cfg, weights=w)
    np.testing.assert_allclose(float(lp), float(lu), rtol=2e-6)
    # positions restart per conversation: the third conversation starts at 0 in its segment
    seg = np.asarray(packed["segment_ids"][0])
    assert np.asarray(packed["positions"][0])[np.argmax(seg == 3)] == 0


def test_changing_one_packed_conversation_leaves_the_others_bitwise(tiny):
    cfg, params = tiny
    packed, _ = _packed_and_unpacked()
    seg = np.asarray(packed["segment_ids"][0])
    inputs = np.asarray(packed["inputs"]).copy()
    a = np.flatnonzero(seg == 2)
    inputs[0, a] = (inputs[0, a] * 7 + 11) % 259  # rewrite conversation 2 entirely
    kw = dict(positions=packed["positions"], segment_ids=packed["segment_ids"])
    la, _ = dsv3_jax.forward(params, packed["inputs"], cfg, **kw)
    lb, _ = dsv3_jax.forward(params, jnp.asarray(inputs), cfg, **kw)
    others = (seg == 1) | (seg == 3)
    assert np.array_equal(np.asarray(la)[0, others], np.asarray(lb)[0, others])
    assert not np.allclose(np.asarray(la)[0, a], np.asarray(lb)[0, a])


def test_distilling_toward_an_identical_teacher_adds_zero_loss_and_gradient(tiny):
    cfg, params = tiny
    packed, _ = _packed_and_unpacked()
    rt = dsv3_jax.resolve_runtime(cfg)
    s = sft.SFTSettings(teacher="unused", kd_beta=0.5, kd_chunk=32)
    w = LossWeights(mtp=0.0, balance=1e-4)
    plain = sft.sft_objective(cfg, rt, None, w)
    with_kd = sft.sft_objective(cfg, rt, None, w, sources.Source(cfg, params, None, "t"), s)

    def grads(obj, *extra):
        return jax.grad(lambda wts: obj({"weights": wts, "router_state": params["router_state"]},
                                        packed, *extra)[0])(params["weights"])

    (l0, _), (l1, m1) = plain(params, packed), with_kd(params, packed, params)
    assert abs(float(m1["kd_loss"])) < 1e-6
    np.testing.assert_allclose(float(l1), float(l0), atol=1e-6)
    g0, g1 = grads(plain), grads(with_kd, params)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0),
                                                             jax.tree.leaves(g1)))
    assert diff < 1e-6
    # and a different teacher does pull
    other = dsv3_jax.init_params(cfg, jax.random.key(1))
    assert float(with_kd(params, packed, other)[1]["kd_loss"]) > 1e-3


@pytest.mark.slow
def test_sft_job_resumes_bitwise_and_exports(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS * 6) + "\n")
    base = dict(data=[str(data)], steps=4, global_batch=2, seq_len=64, log_every=1, mesh="none",
                progress=False, sample_tokens=4, checkpoint_every=2, async_checkpoint=False)
    straight = sft.run(sft.SFTSettings(**base))
    ck = str(tmp_path / "ck")
    first = sft.run(sft.SFTSettings(**{**base, "steps": 2, "checkpoint_dir": ck}))
    rest = sft.run(sft.SFTSettings(**{**base, "checkpoint_dir": ck,
                                      "export_hf": str(tmp_path / "hf")}))
    assert rest["start_step"] == 2
    losses = [h["loss"] for h in first["history"] + rest["history"]]
    assert losses == [h["loss"] for h in straight["history"]]
    a = jax.tree.leaves(straight["state"]["params"])
    b = jax.tree.leaves(rest["state"]["params"])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    cfg, _ = dsv3_jax.load_hf_checkpoint(str(tmp_path / "hf"))
    assert cfg.dim == 64 and cfg.n_routed_experts == 8
    # logit-level distillation from a checkpoint of ours: the teacher enters the compiled step
    # as an argument; the metrics carry the KD term (> 0: teacher and fresh student differ)
    m = tmp_path / "kd.jsonl"
    sft.run(sft.SFTSettings(**{**base, "steps": 2, "teacher": ck, "kd_weight": 0.5,
                               "metrics_file": str(m), "sample_tokens": 0}))
    recs = [json.loads(line) for line in m.read_text().splitlines()]
    assert len(recs) == 2 and all(r["kd_loss"] > 0 and r["assistant_tokens"] > 0 for r in recs)
    # a resume with other data is an error naming the flag
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    with pytest.raises(ValueError, match="--data"):
        sft.run(sft.SFTSettings(**{**base, "data": [str(other)], "steps": 6,
                                   "checkpoint_dir": ck}))


@pytest.mark.slow
def test_sft_and_grpo_start_from_a_hugging_face_folder_with_its_tokenizer(tmp_path, tiny):
    """--hf: a DeepSeek-V3 folder (our tiny model exported) with a real tokenizer.json and
    DeepSeek's chat template: SFT renders and masks with them, GRPO samples and stops with the
    folder's stop ids, and the export carries the tokenizer files along."""
    import shutil

    from dsv3_jax.io.hf import save_hf_checkpoint
    from dsv3_jax.train import grpo

    cfg, params = tiny
    hf = tmp_path / "hf"
    save_hf_checkpoint(params, cfg, str(hf))
    tok_dir = pathlib.Path(__file__).parent / "fixtures" / "chat" / "tiny_tokenizer"
    for f in tok_dir.iterdir():
        shutil.copy(f, hf / f.name)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": c, "answer": c})
                              for p, c in [("1+1=", "2"), ("2+2=", "4"), ("3+1=", "4")]) + "\n")
    out = sft.run(sft.SFTSettings(hf=str(hf), data=[str(data)], steps=2, global_batch=2,
                                  seq_len=32, mesh="none", progress=False, sample_tokens=3,
                                  export_hf=str(tmp_path / "out")))
    assert type(out["tokenizer"]).__name__ == "HFTokenizer" and len(out["history"]) == 2
    assert (tmp_path / "out" / "tokenizer.json").exists()
    g = grpo.run(grpo.GRPOSettings(hf=str(tmp_path / "out"), data=[str(data)], steps=1,
                                   global_batch=2, num_generations=2, max_completion_length=3,
                                   eval_prompts=0, progress=False))
    assert g["steps_run"] == 1


@pytest.mark.slow
def test_sft_and_distillation_on_a_pipeline_mesh_give_the_unpipelined_losses(tmp_path):
    """SFT's packed, masked rows with a distillation term through a 1F1B pipeline
    (pipeline=2 x fsdp=4) give the one-device run's losses, KD terms and assistant-token
    counts (fp32); the teacher (another seed, one step of SFT) reaches the last stage's
    loss as an untrained argument."""
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS * 6) + "\n")
    base = dict(data=[str(data)], steps=2, global_batch=8, seq_len=64, log_every=1,
                progress=False, sample_tokens=0, precision="fp32")
    teacher = tmp_path / "teacher"
    sft.run(sft.SFTSettings(**{**base, "steps": 1}, mesh="none", seed=1,
                            checkpoint_dir=str(teacher), async_checkpoint=False))
    kd = dict(teacher=str(teacher), kd_weight=0.5, kd_beta=0.5)
    recs = {}
    for name, flags in (("plain", dict(mesh="none")),
                        ("piped", dict(mesh="pipeline=2,fsdp=4", pipeline_schedule="1f1b",
                                       microbatches=2))):
        out = tmp_path / f"{name}.jsonl"
        sft.run(sft.SFTSettings(**base, **kd, **flags, metrics_file=str(out)))
        recs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    for a, b in zip(recs["plain"], recs["piped"], strict=True):
        for key in ("loss", "main_loss", "kd_loss"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
        assert a["kd_loss"] > 1e-3 and b["assistant_tokens"] == a["assistant_tokens"] > 0
