"""Benchmark scripts run end to end on the CPU (small shapes), and the profile attribution."""

import json
import pathlib
import sys

import numpy as np

import pytest

from dsv3_jax import profiling

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_op_scopes_and_parts_from_hlo_text():
    hlo = '\n'.join([
        '  %fusion.3 = bf16[8,8]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(step)/'
        'transpose(jvp(moe_layers))/moe/experts/expert_gemms/dot_general" source_file="x.py"}',
        '  ROOT %custom-call.1 = f32[4]{0} custom-call(%a), metadata={op_name="jit(step)/'
        'moe_layers/moe/experts/dispatch/sort"}',
        '  %add.2 = f32[4]{0} add(%a, %b), metadata={op_name="jit(step)/optimizer/add"}',
        '  %dot.9 = f32[4]{0} dot(%a, %b), metadata={op_name="jit(step)/mla/attention_core/dot"}',
        '  %copy.1 = f32[4]{0} copy(%a)',
    ])
    scopes = profiling.op_scopes(hlo)
    assert set(scopes) == {"fusion.3", "custom-call.1", "add.2", "dot.9"}
    parts = profiling.breakdown({"fusion.3": 5.0, "custom-call.1": 2.0, "add.2": 1.0,
                                 "dot.9": 4.0, "copy.1": 3.0, "fusion.4": 7.0}, scopes)
    assert parts == {"expert GEMMs": 5.0, "MoE route/dispatch/combine": 2.0, "optimizer": 1.0,
                     "attention core": 4.0, profiling.UNATTRIBUTED: 10.0}
    assert profiling.part_of("jit(step)/transpose(jvp(head))/btv,dv->btd/dot_general") == \
        "output head + softmax"  # autodiff's wrappers are seen through
    # a scope name only counts as a whole path component
    assert profiling.part_of("jit(step)/attention_core_like/dot") == profiling.OTHER


def test_bench_train_runs_and_attributes_the_profile(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_train

    out = tmp_path / "bench.json"
    rec = bench_train.main(["--preset", "tiny", "--batch", "2", "--seq_len", "32", "--steps", "2",
                            "--warmup", "1", "--profile_steps", "1", "--data", "corpus",
                            "--json", str(out)])
    assert json.loads(out.read_text())["tokens_per_s"] == rec["tokens_per_s"] > 0
    assert rec["data"] == "corpus" and rec["load_max_over_mean"] >= 1.0
    assert rec["warmup_s_compile_included"] > 0
    assert rec["grouped_impl"] == "ragged_dot" and rec["attention_impl"] == "xla"  # CPU: auto
    assert rec["fp8_impl"] is None and rec["fp8_quant_impl"] is None  # bf16: no FP8
    assert bench_train.parse_args(["--precision", "fp8", "--fp8_quant_impl", "pallas"]
                                  ).fp8_quant_impl == "pallas"
    parts = rec["profile_ms_per_step"]
    for part in ("attention core", "expert GEMMs", "MoE route/dispatch/combine", "optimizer",
                 "dense + shared FFN", "output head + softmax", "MLA projections, norms, RoPE",
                 "embedding"):
        assert parts.get(part, 0) > 0, parts
    # almost all op time carries a scope of ours
    assert parts.get(profiling.UNATTRIBUTED, 0) < 0.2 * sum(parts.values()), parts


def test_bench_train_corpus_batches_are_pretrains_steps_in_order():
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_train
    from dsv3_jax.config import get_config
    from dsv3_jax.train import data as data_lib

    cfg = get_config("tiny")
    got = bench_train.corpus_batches(cfg, 2, 32, 3)
    dataset, _ = data_lib.build_dataset(None, seq_len=32, global_batch=2, seed=0,
                                        vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                                        embedded_bytes=4_000_000)  # pretrain's default
    for i, b in enumerate(got):
        np.testing.assert_array_equal(np.asarray(b["inputs"]), dataset.rows(i)["inputs"])
        np.testing.assert_array_equal(np.asarray(b["targets"]), dataset.rows(i)["targets"])
    assert not np.array_equal(np.asarray(got[0]["inputs"]), np.asarray(got[1]["inputs"]))
    batches = bench_train.Batches(got)
    assert [batches.next() is got[i % 3] for i in range(4)] == [True] * 4


def test_peak_tflops_reads_the_device_kind_by_whole_words():
    from types import SimpleNamespace as NS

    from dsv3_jax.train.metrics import peak_tflops

    assert peak_tflops(None, NS(device_kind="NVIDIA H100 80GB HBM3")) == 989.0
    assert peak_tflops(None, NS(device_kind="NVIDIA A100-SXM4-80GB")) == 312.0
    assert peak_tflops(None, NS(device_kind="NVIDIA H20")) == 148.0  # not H200's 989
    assert peak_tflops(None, NS(device_kind="cpu")) is None
    assert peak_tflops(500.0, NS(device_kind="NVIDIA H200")) == 500.0


def test_lowering_stats_counts_shared_kernels(tmp_path):
    """experiments/lowering_stats.py lowers `small`'s bf16 step for CUDA on the CPU: the
    grouped kernels' call sites are counted and equal calls share a kernel (fewer distinct
    kernels than sites: forward and backward reuse shapes)."""
    import json
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    import lowering_stats

    recs = lowering_stats.main(["--precision", "bf16", "--batch", "1", "--seq_len", "128",
                                "--json", str(tmp_path / "l.json")])
    (rec,) = recs
    assert 0 < rec["distinct_kernels"] < rec["mosaic_gpu_call_sites"], rec
    assert json.loads((tmp_path / "l.json").read_text())[0]["run"]["command"]


def test_bench_generate_prints_the_table_and_profiles(tmp_path):
    """bench_generate end to end on `tiny`: every batch x mode case timed, speculative cases
    with their acceptance and speed-up, the batch-1 profile, the record written."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_generate

    out = tmp_path / "gen.json"
    rec = bench_generate.main(["--preset", "tiny", "--batches", "1", "2", "--max_new_tokens",
                               "4", "--prompt_len", "8", "--repeats", "1", "--profile",
                               "--json", str(out)])
    assert json.loads(out.read_text())["cases"] == rec["cases"]
    cases = {(c["batch"], c["mode"]): c for c in rec["cases"]}
    assert set(cases) == {(b, m) for b in (1, 2) for m in bench_generate.MODES}
    for (b, mode), c in cases.items():
        assert c["tokens"] == 4 * b and c["ms_per_token"] > 0
        assert ("acceptance" in c) == mode.endswith("speculative")
        assert ("speedup_over_plain" in c) == mode.endswith("speculative")
    assert rec["profile_batch1_greedy"]["device_ms_per_token"] > 0
    assert "unrolled layers" in rec["runtime"]  # generate's default decode layout


def test_compile_time_records_each_depth_and_mode(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import compile_time

    out = tmp_path / "ct.json"
    rec = compile_time.main(["--preset", "tiny", "--layers", "3", "--batch", "1", "--seq_len",
                             "16", "--json", str(out)])
    assert [(c["layers"], c["mode"]) for c in rec["cases"]] == [(3, "scan"), (3, "unrolled")]
    assert all(c["compile_s"] > 0 and c["hlo_chars"] > 0 for c in rec["cases"])
    assert json.loads(out.read_text())["cases"] == rec["cases"]


def test_determinism_compares_runs_bit_for_bit():
    sys.path.insert(0, str(ROOT / "experiments"))
    import determinism

    runs = [[{"step": 1, "loss": 2.0, "grad_norm": 1.0},
             {"step": 2, "loss": 1.5, "grad_norm": 1.0}]]
    assert determinism.compare(runs * 2)["identical"]
    other = [{"step": 1, "loss": 2.0, "grad_norm": 1.0},
             {"step": 2, "loss": 1.5 + 1.5 * 2**-23, "grad_norm": 1.0}]  # one float32 ulp
    res = determinism.compare(runs + [other])
    assert not res["identical"] and res["first_differing_step"] == 2
    assert 0 < res["max_rel_loss_diff"] < 1e-6
    with pytest.raises(SystemExit):
        determinism.parse_args(["--runs", "1"])


@pytest.mark.slow
def test_bench_pipeline_runs_every_layout_on_fake_devices(tmp_path, capsys):
    """The multi-GPU pipeline script end to end on this process's 8 CPU devices: the plain
    step, FSDP over all, the executor on one rank and pipeline=2 beside fsdp=4, with the
    measured bubble against the formula."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_pipeline

    out = tmp_path / "pipe.json"
    rec = bench_pipeline.main(["--presets", "tiny", "--precision", "fp32", "--batch", "8",
                               "--seq_len", "16", "--steps", "1", "--warmup", "1", "--micro", "2",
                               "--schedules", "1f1b", "--ranks", "1", "2", "--json", str(out)])
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain (1 device)", "fsdp=8", "P=1 (1 device)", "pipeline=2,fsdp=4"}
    assert all(r["step_ms"] > 0 for r in rows.values())
    pipe = rows["pipeline=2,fsdp=4"]
    assert pipe["theory_bubble"] == pytest.approx(1 / 3)  # (p - 1) / (M + p - 1)
    assert "measured_bubble" in pipe and pipe["ticks_bubble"] >= pipe["theory_bubble"]
    # the same model, init and batch: every layout's first-step loss agrees
    losses = [r["loss"] for r in rec["rows"]]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
    assert "bubble" in capsys.readouterr().out


def test_bench_dispatch_checks_and_times_each_round_trip(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_dispatch

    rec = bench_dispatch.main(["--tokens", "16", "--dim", "8", "--experts", "16", "--topk", "2",
                               "--dispatch", "a2a", "allgather", "--iters", "1", "--warmup", "1",
                               "--json", str(tmp_path / "d.json")])
    cases = {(c["dispatch"], c["routing"]): c for c in rec["cases"]}
    assert set(cases) == {(d, r) for d in ("a2a", "allgather") for r in bench_dispatch.ROUTINGS}
    assert all(c["max_rel_error"] < 1e-6 and c["ms"] > 0 for c in cases.values())
    assert cases[("a2a", "one_device")]["overflowed"]  # 32 pairs to one peer > capacity 8
    assert not cases[("a2a", "uniform")]["overflowed"]  # at most 8 pairs to a peer (seeded)
    experts = bench_dispatch.routing("zipf", 4096, 16, 2, 8)
    assert (experts[:, 0] != experts[:, 1]).all()  # distinct experts per token
    assert np.bincount(experts.reshape(-1), minlength=16).max() > 2 * 4096 * 2 / 16  # a hot few


def test_bench_scaling_rows_run_in_their_own_processes(tmp_path):
    """The weak-scaling script end to end on fake devices: EP x pipeline on 4 (a2a dispatch,
    1F1B) in a child process, with the plan's prediction beside it; 2 devices are too few."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_scaling

    rec = bench_scaling.main(["--presets", "tiny", "--precisions", "bf16", "--batch_per_device",
                              "2", "--seq_len", "16", "--steps", "1", "--warmup", "1",
                              "--device_counts", "2", "4", "--layouts", "ep_pipeline",
                              "--json", str(tmp_path / "s.json")])
    rows = {(r["devices"], r["layout"]): r for r in rec["rows"]}
    assert "at least 4 devices" in rows[(2, "ep_pipeline")]["skipped"]
    four = rows[(4, "ep_pipeline")]
    assert "error" not in four, four
    assert four["step_ms"] > 0 and np.isfinite(four["loss"])
    assert four["mesh"] == "pipeline=2,expert=2" and four["plan_gib"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == rec["rows"]
    assert "even --batch_per_device" in bench_scaling.layout_mesh("ep_pipeline", 8, 1)[3]
