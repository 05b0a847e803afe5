"""FP8 against BF16 training: the same model, init and batches, two precisions, loss curves.

Command:   python experiments/fp8_vs_bf16.py                  (tiny, 250 steps of 8 x 128 tokens)
           python experiments/fp8_vs_bf16.py --preset small --steps 500 --batch 8 --seq_len 2048
Hardware:  any CPU for `tiny` (the result below); a GPU for larger presets.
What it measures: two runs of the pretraining job (`dsv3_jax.train.pretrain.run`, exactly what
`experiments/pretrain.py --precision ...` runs, through the one training loop) from one
initialisation on the same batches of the embedded corpus (`dsv3_jax.train.data`): `bf16` (bf16
activations and matmul inputs) and `fp8` (the same, with e4m3 GEMM inputs in the MLA
projections, dense FFN, shared and routed experts: `Runtime.fp8`, dsv3_jax/fp8.py). Only
non-finite steps are skipped (the loop's spike and update guards are off, so both runs apply the same
steps unless one of them produces a NaN; the record counts skipped steps). It reports
the training loss of both at a few steps and the relative difference |fp8 - bf16| / bf16 at the
last step and averaged over the last 10% of steps (the V3 report §3.3 claims under 0.25% for
its FP8 runs against BF16, at 16B and 230B over ~1T tokens). On CPU the FP8 GEMMs run on the
XLA reference path (dequantize + float32 matmul): the numerics of FP8, not its speed.
With --fp32 (default) a third run in fp32 gives the yardstick: how far bf16 itself lands from
fp32 on the same batches, i.e. how much any change of GEMM precision moves the loss at this size.
Output: the table on stdout, a JSON record (--json) and a PNG of both loss curves (--png).
Result (2026-12-01, this project's 2-core CPU, jax 0.11.2, defaults):
experiments/results/fp8_vs_bf16_tiny_cpu.json and .png; 9 min wall (bf16 64 s, fp8 347 s on
the XLA reference path, fp32 110 s, compile included, while CI shared the 2 cores):

    step   bf16 loss  fp8 loss  fp8/bf16   fp32 loss  bf16/fp32
       1   8.1585     8.1583    0.003%     8.1586     0.001%
      25   4.2506     4.2675    0.398%     4.2637     0.308%
     125   3.0463     3.0119    1.131%     3.0414     0.160%
     250   2.9662     2.9238    1.428%     2.9512     0.508%
    mean of the last 25 steps: fp8 1.30% off bf16; bf16 0.60% off fp32

The 0.25% of the V3 report does not hold here: the two runs agree within 0.45% (fp8 slightly
above) for the first 28 steps, then separate as any change of rounding makes them at this size
and learning rate (bf16 against fp32 too, up to 2.6% on single steps), and single steps differ
by up to 6% either way. Over the last 100 steps fp8's mean loss is 1.1% *below* bf16's, not
above; a second seed (--seed 1,
no fp32 run, an earlier revision of the grouped path with the same quantization) gave 0.30% at
step 250 and 0.93% below bf16 over the last 25 steps. One tiny model on a CPU says FP8 does not
hurt this training; it cannot confirm a 0.25% bound, which needs larger models and long runs.
Three more seeds with the fp32 yardstick (2026-12-02, `--seed 1|2|3`, while CI shared the
cores; experiments/results/fp8_vs_bf16_tiny_cpu_seed{1,2,3}.json and .png), signed differences
of the mean loss over the last 25 steps, seeds 0-3: fp8 against bf16 -1.30%, -0.99%, -1.62%,
-0.69% (fp8 lower in all four); bf16 against fp32 +0.60%, -0.28%, +0.78%, +1.12%; fp8 against
fp32 -0.72%, -1.27%, -0.85%, +0.43%. Here the FP8 recipe (on the XLA reference path: e4m3
inputs, float32 products) never trains worse than bf16, and bf16 lands up to 1.1% from fp32 on
its own, four times the bound to be tested.

`small` on one H200 (2026-12-02, 05:14 UTC; --preset small --steps 200 --batch 8 --seq_len
1024 --lr 1e-3 --embedded_bytes 16000000; experiments/results/fp8_vs_bf16_small_h200_fp32.json
and .png; FP8 on our Mosaic GPU kernels; bf16 ~123 ms a step here, fp8 ~145, fp32 ~1,610):
mean loss over steps 101-200 fp32 3.2571, bf16 3.1423 (3.52% below fp32), fp8 3.2576 (0.01%
above fp32, 3.67% above bf16); at step 200 fp8 is 6.3% off bf16 and 1.6% off fp32, bf16 4.4% off
fp32. An earlier run of the same command with --no-fp32 (fp8_vs_bf16_small_h200.json, 02:50
UTC) put its bf16 3.95% above this one's over steps 101-200: the bf16 step's GPU reductions
are not deterministic (the step-1 losses differ in the seventh significant digit; the two fp8
runs agree bit for bit for two steps) and 200 steps amplify that to a few percent. The
report's 0.25% is below what this size and length can resolve; FP8 lies inside the spread of
bf16 against itself and against fp32.
The same at a lower learning rate, twice the steps (2026-12-02, evening, one H200, the command
`--preset small --steps 400 --batch 8 --seq_len 1024 --lr 3e-4 --embedded_bytes 16000000
--no-fp32 --log_every 100` twice in one device call; experiments/results/
fp8_vs_bf16_small_h200_lr3e-4.json and ..._repeat.json, .png): mean loss over the last 40 steps,
bf16 2.0950 and fp8 2.0600 (-1.67%) in the first call, 2.2056 and 2.1424 (-2.86%) in the second;
the same command 5.28% (bf16) and 4.00% (fp8) apart across the calls.
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.train import pretrain  # noqa: E402
from dsv3_jax.train.settings import Settings  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="config preset")
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps of each run")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="peak learning rate (pretrain's default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init and the data order")
    ap.add_argument("--mtp_depth", type=int, default=None,
                    help="MTP modules (default: the preset's; 0 compiles faster)")
    ap.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=True,
                    help="also train in fp32 and report bf16's own distance from it: the yardstick "
                         "for how far a change of GEMM precision moves the loss at this size")
    ap.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                    help="bitwise-reproducible programs (pretrain's --deterministic), so that a "
                         "difference between the runs is the precision's, not the GPU's "
                         "reduction order (a CPU is deterministic either way)")
    ap.add_argument("--embedded_bytes", type=int, default=1_000_000,
                    help="bytes of the embedded corpus (the standard library's sources) to read")
    ap.add_argument("--log_every", type=int, default=50,
                    help="print a run's loss and step time every N steps (0: only at the end)")
    ap.add_argument("--json", default=None, help="where to write the record (default: "
                    "experiments/results/fp8_vs_bf16_<preset>_<platform>.json)")
    ap.add_argument("--png", default=None, help="where to plot the loss curves (default: the "
                    "--json path with .png; 'none': no plot)")
    return ap.parse_args(argv)


def train_run(precision: str, a) -> dict:
    """Loss, main loss and grad norm per step of one pretraining run at `precision`."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = pathlib.Path(tmp) / "metrics.jsonl"
        s = Settings(preset=a.preset, precision=precision, steps=a.steps, global_batch=a.batch,
                     seq_len=a.seq_len, lr=a.lr, seed=a.seed, mtp_depth=a.mtp_depth,
                     embedded_bytes=a.embedded_bytes, log_every=a.log_every or a.steps,
                     progress=False, sample_tokens=0, metrics_file=str(metrics),
                     spike_loss_factor=0.0, spike_grad_factor=0.0, max_update_ratio=0.0,
                     deterministic=a.deterministic)
        t0 = time.perf_counter()
        summary = pretrain.run(s)
        seconds = time.perf_counter() - t0
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rt = summary["runtime"]
    out = {k: [r[k] for r in records] for k in ("loss", "main_loss", "grad_norm")}
    out["skipped_steps"] = [r["step"] for r in records if r["skipped"]]
    out["seconds"] = seconds  # compile included
    out["runtime"] = {"dtype": rt.dtype, "fp8": None if rt.fp8 is None else rt.fp8._asdict(),
                      "grouped": rt.grouped, "mtp_depth": summary["config"].mtp_depth}
    return out


def rel_diff(a, b) -> float:
    return abs(a - b) / abs(b)


def compare(runs: dict, steps: int, run: str = "fp8", ref: str = "bf16") -> dict:
    """Relative differences of `run` against `ref`: last step, and mean of the last 10%."""
    tail = max(1, steps // 10)
    out = {"tail_steps": tail}
    for key in ("loss", "main_loss"):
        f, b = runs[run][key], runs[ref][key]
        out[f"{key}_rel_diff_last"] = rel_diff(f[-1], b[-1])
        out[f"{key}_rel_diff_tail_mean"] = rel_diff(np.mean(f[-tail:]), np.mean(b[-tail:]))
        out[f"{key}_rel_diff_max_over_tail"] = max(rel_diff(x, y) for x, y in
                                                   zip(f[-tail:], b[-tail:]))
    return out


def table(runs: dict, steps: int) -> list[dict]:
    marks = sorted({1, max(1, steps // 10), steps // 4, steps // 2, 3 * steps // 4, steps} - {0})
    rows = []
    for k in marks:
        row = {"step": k, **{p: r["loss"][k - 1] for p, r in runs.items()}}
        row["rel_diff"] = rel_diff(row["fp8"], row["bf16"])
        if "fp32" in runs:
            row["bf16_vs_fp32"] = rel_diff(row["bf16"], row["fp32"])
        rows.append(row)
    return rows


def plot(runs: dict, out: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    steps = np.arange(1, len(runs["bf16"]["loss"]) + 1)
    for name, style in (("fp32", ":"), ("bf16", "-"), ("fp8", "--")):
        if name in runs:
            ax.plot(steps, runs[name]["loss"], style, lw=1.0, label=f"{name}: total loss")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    f, b = np.array(runs["fp8"]["loss"]), np.array(runs["bf16"]["loss"])
    ax_d.plot(steps, 100 * (f - b) / b, lw=0.8, label="fp8 vs bf16")
    if "fp32" in runs:
        r = np.array(runs["fp32"]["loss"])
        ax_d.plot(steps, 100 * (b - r) / r, lw=0.6, alpha=0.7, label="bf16 vs fp32")
    ax_d.axhline(0.25, color="r", lw=0.6, ls=":")
    ax_d.axhline(-0.25, color="r", lw=0.6, ls=":", label="V3 report: 0.25%")
    ax_d.set_ylabel("relative difference (%)")
    ax_d.set_xlabel("step")
    ax_d.legend(fontsize=8)
    ax_d.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _record(a, argv, dev, runs: dict) -> dict:
    """The JSON record of the runs so far; the comparisons once bf16 and fp8 have run."""
    head = {
        "command": "python experiments/fp8_vs_bf16.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "device": dev.device_kind,
        "platform": dev.platform, "jax": jax.__version__, "host": platform.machine(),
        "preset": a.preset, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
        "seed": a.seed, "data": f"embedded corpus, {a.embedded_bytes} bytes",
    }
    pending = [p for p in ("bf16", "fp8") + (("fp32",) if a.fp32 else ()) if p not in runs]
    head["pending"] = pending  # runs not (yet) done: a record cut short by a time limit says so
    if "fp8" not in runs:
        return {**head, "runs": runs}
    yard = ({"bf16_vs_fp32": compare(runs, a.steps, "bf16", "fp32")} if "fp32" in runs else {})
    return {**head, "table": table(runs, a.steps), **compare(runs, a.steps), **yard, "runs": runs}


def main(argv=None) -> dict:
    a = parse_args(argv)
    dev = jax.devices()[0]
    print(f"fp8_vs_bf16: {a.preset}, {a.steps} steps of {a.batch} x {a.seq_len} tokens on "
          f"{dev.device_kind}", flush=True)
    out = (pathlib.Path(a.json) if a.json
           else RESULTS / f"fp8_vs_bf16_{a.preset}_{dev.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    for p in ("bf16", "fp8") + (("fp32",) if a.fp32 else ()):
        runs[p] = train_run(p, a)
        print(f"{p}: {a.steps} steps in {runs[p]['seconds']:.0f} s (compile included)",
              flush=True)
        # each run is on disk as soon as it ends: a time limit that cuts the (slow) fp32
        # yardstick, or fp8, keeps what ran
        record = _record(a, argv, dev, runs)
        out.write_text(json.dumps(record, indent=1) + "\n")
        if p == "fp8":
            print(f"fp8 against bf16: last step {record['loss_rel_diff_last']:.3%}, mean of the "
                  f"last {record['tail_steps']} steps {record['loss_rel_diff_tail_mean']:.3%}",
                  flush=True)
    rows, diff = record["table"], compare(runs, a.steps)
    yard = {"bf16_vs_fp32": record["bf16_vs_fp32"]} if a.fp32 else {}
    head = f"{'step':>6} {'bf16 loss':>10} {'fp8 loss':>10} {'fp8/bf16':>9}"
    print("\n" + head + (f" {'fp32 loss':>10} {'bf16/fp32':>9}" if a.fp32 else ""))
    for r in rows:
        print(f"{r['step']:>6} {r['bf16']:>10.4f} {r['fp8']:>10.4f} {r['rel_diff']:>9.3%}"
              + (f" {r['fp32']:>10.4f} {r['bf16_vs_fp32']:>9.3%}" if a.fp32 else ""))
    print(f"relative difference of the loss: last step {diff['loss_rel_diff_last']:.3%}, mean of "
          f"the last {diff['tail_steps']} steps {diff['loss_rel_diff_tail_mean']:.3%} (main loss: "
          f"{diff['main_loss_rel_diff_last']:.3%}, {diff['main_loss_rel_diff_tail_mean']:.3%})")
    if a.fp32:
        y = yard["bf16_vs_fp32"]
        print(f"yardstick, bf16 against fp32: last step {y['loss_rel_diff_last']:.3%}, mean of "
              f"the last {y['tail_steps']} steps {y['loss_rel_diff_tail_mean']:.3%}")
    print("run time (compile included): " + ", ".join(f"{p} {r['seconds']:.0f} s"
                                                      for p, r in runs.items()))
    print(f"wrote {out}")
    if a.png != "none":
        png = pathlib.Path(a.png) if a.png else out.with_suffix(".png")
        plot(runs, png, f"{a.preset}, {a.batch} x {a.seq_len} tokens/step, {dev.device_kind}; "
                        f"last step: fp8 {diff['loss_rel_diff_last']:.3%} off bf16")
        print(f"wrote {png}")
    return record


if __name__ == "__main__":
    main()
