"""Plot a pretraining run's JSONL metrics: loss curves and an expert-load heatmap, as PNG.

Command:   python experiments/plot_metrics.py METRICS.jsonl [--out PREFIX]
           (needs matplotlib: pip install -e '.[plot]', included in '.[test]')
Output:    PREFIX_loss.png   total, main and MTP loss, learning rate and gradient norm per step
           PREFIX_load.png   each MoE layer's per-expert load / mean load over the run (the
                             records that carry `expert_load`: every --log_every steps), and the
                             max/mean load per layer at every step; 1.0 everywhere is balance
Several files may be given: their loss curves share one plot (e.g. fp32 against bf16 runs).
"""

import argparse
import json
import pathlib
import sys


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """The records of a metrics file, in step order (a last line cut short by a crash is
    dropped; any other bad line is an error naming the line)."""
    lines = pathlib.Path(path).read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                continue
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if "step" not in rec or "loss" not in rec:
            raise ValueError(f"{path}:{n}: a metrics record needs 'step' and 'loss'")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no metrics records")
    return sorted(out, key=lambda r: r["step"])


def plot_losses(runs: dict[str, list[dict]], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr, ax_g) = plt.subplots(3, 1, figsize=(9, 9), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1, 1]})
    for name, recs in runs.items():
        steps = [r["step"] for r in recs]
        ax.plot(steps, [r["loss"] for r in recs], label=f"{name}: total", lw=1.2)
        ax.plot(steps, [r.get("main_loss") for r in recs], label=f"{name}: main", lw=0.8)
        if any(r.get("mtp_loss") is not None for r in recs):
            ax.plot(steps, [r.get("mtp_loss") for r in recs], label=f"{name}: MTP", lw=0.8,
                    ls="--")
        skipped = [r["step"] for r in recs if r.get("skipped")]
        if skipped:
            ax.plot(skipped, [ax.get_ylim()[1]] * len(skipped), "rx", label=f"{name}: skipped")
        ax_lr.plot(steps, [r.get("lr") for r in recs], lw=1)
        ax_g.plot(steps, [r.get("grad_norm") for r in recs], lw=0.8)
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_g.set_ylabel("grad norm")
    ax_g.set_xlabel("step")
    for a in (ax_lr, ax_g):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_load(recs: list[dict], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    snaps = [r for r in recs if r.get("expert_load")]
    if not snaps:
        raise ValueError("no record carries 'expert_load' (the model has no MoE layer, or the "
                         "run logged none)")
    loads = np.array([r["expert_load"] for r in snaps])  # [S, L, E]
    n_layers, n_experts = loads.shape[1:]
    fig, axes = plt.subplots(n_layers + 1, 1, figsize=(9, 1.8 * n_layers + 2.5), squeeze=False)
    top = float(max(2.0, np.percentile(loads, 99)))
    for layer in range(n_layers):
        ax = axes[layer, 0]
        im = ax.imshow(loads[:, layer].T, aspect="auto", cmap="magma", vmin=0, vmax=top,
                       extent=(snaps[0]["step"], snaps[-1]["step"], n_experts - 0.5, -0.5),
                       interpolation="nearest")
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        fig.colorbar(im, ax=ax, label="load / mean")
    ax = axes[-1, 0]
    steps = [r["step"] for r in recs]
    balance = np.array([r["load_max_over_mean"] for r in recs])
    for layer in range(balance.shape[1]):
        ax.plot(steps, balance[:, layer], lw=0.8, label=f"layer {layer}")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel("max / mean load")
    ax.set_xlabel("step")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[pathlib.Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics", nargs="+", help="JSONL metrics file(s) from experiments/pretrain.py")
    ap.add_argument("--out", default=None, help="output prefix (default: the first file's path "
                    "without .jsonl)")
    args = ap.parse_args(argv)
    try:
        runs = {pathlib.Path(p).stem: read_metrics(p) for p in args.metrics}
    except (OSError, ValueError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    prefix = pathlib.Path(args.out) if args.out else pathlib.Path(args.metrics[0]).with_suffix("")
    loss_png = prefix.with_name(prefix.name + "_loss.png")
    load_png = prefix.with_name(prefix.name + "_load.png")
    plot_losses(runs, loss_png)
    plot_load(next(iter(runs.values())), load_png)
    print(f"wrote {loss_png} and {load_png}")
    return [loss_png, load_png]


if __name__ == "__main__":
    main()
