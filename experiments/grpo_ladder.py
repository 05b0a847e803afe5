"""The post-training ladder on the embedded arithmetic task: SFT a model from random weights,
then GRPO it, and record the held-out accuracy before and after GRPO.

Command:   python experiments/grpo_ladder.py                      (tiny, CPU: ~13 + ~6 minutes)
           python experiments/grpo_ladder.py --preset small --precision bf16 \
               --out experiments/results/grpo_arithmetic_small_h100.json   (one GPU)
Hardware:  any; the defaults are sized for a 2-core CPU (tiny).
What it does: (1) experiments/sft.py's job on the task's training split (chat records, the
answer as the assistant's reply) into <work_dir>/sft; (2) experiments/grpo.py's job from that
checkpoint with the exact-answer and format rewards; held-out accuracy = the fraction of the
task's test-split prompts (never trained on) whose greedy completion is exactly right, before
and after GRPO. Every setting not named below is the scripts' default.
Output: a JSON record (--out) with accuracy_before, accuracy_after, the commands that
reproduce both stages, the run times, the per-step GRPO metrics (reward, rollout tokens/s,
step times, rollout share) and a reward-curve PNG beside it.
"""

import argparse
import json
import pathlib
import platform
import shlex
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from dsv3_jax.train import grpo, sft  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset (random weights)")
    ap.add_argument("--precision", default="preset", choices=("preset", "fp32", "bf16"),
                    help="compute precision of both stages")
    ap.add_argument("--work_dir", default="runs/ladder", help="checkpoints and metrics go here")
    ap.add_argument("--sft_steps", type=int, default=1200, help="SFT steps")
    ap.add_argument("--sft_lr", type=float, default=3e-3, help="SFT peak learning rate")
    ap.add_argument("--grpo_steps", type=int, default=60, help="GRPO steps")
    ap.add_argument("--grpo_lr", type=float, default=2e-5, help="GRPO peak learning rate")
    ap.add_argument("--grpo_flags", default="--num_generations 16 --global_batch 32 --log_every 10",
                    help="more experiments/grpo.py flags (32 prompts x 16 completions per step: "
                    "the recorded run)")
    ap.add_argument("--eval_prompts", type=int, default=1000, help="held-out prompts")
    ap.add_argument("--out", default="experiments/results/grpo_arithmetic_cpu.json",
                    help="the JSON record (the PNG goes beside it)")
    return ap.parse_args(argv)


def _plot(records: list[dict], path: pathlib.Path, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no PNG")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["reward_mean"] for r in records], label="reward (sampled, mean)", alpha=0.6)
    for key, label in (("eval_accuracy", "held-out accuracy (greedy)"),
                       ("eval_sampled_accuracy", "held-out accuracy (sampled)")):
        ev = [(r["step"], r[key]) for r in records if key in r]
        if ev:
            ax.plot(*zip(*ev), "o-", label=label)
    ax.set_xlabel("GRPO step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv=None) -> dict:
    a = parse_args(argv)
    work = pathlib.Path(a.work_dir)
    sft_flags = ["--preset", a.preset, "--precision", a.precision, "--steps", str(a.sft_steps),
                 "--lr", str(a.sft_lr), "--bias_gamma", "1e-2", "--checkpoint_dir",
                 str(work / "sft"), "--metrics_file", str(work / "sft.jsonl"), "--log_every",
                 "100"]
    grpo_flags = ["--init_checkpoint", str(work / "sft"), "--precision", a.precision,
                  "--steps", str(a.grpo_steps), "--lr", str(a.grpo_lr), "--eval_prompts",
                  str(a.eval_prompts), "--eval_every", str(max(1, a.grpo_steps // 4)),
                  "--checkpoint_dir", str(work / "grpo"), "--metrics_file",
                  str(work / "grpo.jsonl")] + a.grpo_flags.split()
    t0 = time.perf_counter()
    sft_out = sft.run(sft.parse_settings(sft_flags, cls=sft.SFTSettings))
    t_sft = time.perf_counter() - t0
    grpo_out = grpo.run(grpo.parse_settings(grpo_flags, cls=grpo.GRPOSettings))
    t_grpo = time.perf_counter() - t0 - t_sft
    records = [json.loads(line) for line in open(work / "grpo.jsonl")]
    before, after = grpo_out["eval_before"], grpo_out["eval_after"]
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = _plot(records, out.with_suffix(".png"),
                f"GRPO on arithmetic ({a.preset}): held-out accuracy "
                f"{before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}")
    keep = ("step", "reward_mean", "reward_std", "frac_reward_zero_std", "clip_frac",
            "completion_length", "entropy", "logprob_gap", "rollout_tokens_per_s",
            "rollout_seconds", "train_seconds", "rollout_share", "eval_accuracy",
            "eval_sampled_accuracy")
    steady = records[1:] or records  # the first step compiles the rollout and the update
    mean = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731  (robust to a recompile)
    result = {
        "task": "arithmetic (a+b, a-b with a, b in [0, 99]; test split never trained on)",
        "preset": a.preset, "precision": a.precision,
        "accuracy_before": before["eval_accuracy"], "accuracy_after": after["eval_accuracy"],
        "accuracy_definition": "greedy completion exactly right, on held-out test-split prompts",
        "sampled_accuracy_before": before.get("eval_sampled_accuracy"),
        "sampled_accuracy_after": after.get("eval_sampled_accuracy"),
        "eval_prompts": a.eval_prompts,
        "sft_final_loss": sft_out["history"][-1]["loss"] if sft_out["history"] else None,
        "commands": {"sft": "python experiments/sft.py " + " ".join(sft_flags),
                     "grpo": "python experiments/grpo.py " + " ".join(grpo_flags),
                     "ladder": "python experiments/grpo_ladder.py " + shlex.join(
                         sys.argv[1:] if argv is None else argv)},
        "seconds": {"sft": round(t_sft, 1), "grpo": round(t_grpo, 1)},
        # a rerun with the same --work_dir resumes: a finished SFT stage is not run again
        "sft_steps_run_here": sft_out["steps_run"],
        "grpo_steady_state_median": {"rollout_tokens_per_s": mean("rollout_tokens_per_s"),
                              "rollout_seconds": mean("rollout_seconds"),
                              "train_seconds": mean("train_seconds"),
                              "rollout_share": mean("rollout_share")},
        "device": jax.devices()[0].device_kind, "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"), "reward_curve_png": png,
        "grpo_metrics": [{k: r[k] for k in keep if k in r} for r in records],
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"held-out accuracy {result['accuracy_before']:.3f} -> {result['accuracy_after']:.3f}; "
          f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
