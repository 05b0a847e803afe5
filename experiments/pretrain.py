"""Pretrain a DeepSeek-V3-architecture model: the README's main job.

Command:   ./dev.sh run            (= python experiments/pretrain.py, defaults below)
           python experiments/pretrain.py --help      (every flag, with its default)
Hardware:  the defaults (tiny preset, embedded corpus) run on any CPU; one or many GPUs or hosts
           through --mesh, --strategy and --distributed.
What it does: trains `--preset` with AdamW (bf16 moments, fp32 master weights, clipping, the V3
learning-rate shape scaled to --steps), the MTP and sequence-wise balance losses and the
auxiliary-loss-free router-bias update, on packed byte-level text (the Python standard library's
sources unless --data names files); writes a JSONL record per step (--metrics_file), saves orbax
checkpoints (--checkpoint_dir: resumes from the newest complete one; SIGTERM/SIGINT save first),
and ends with a short greedy sample decoded over the latent cache.
Result (2-core CPU, 2026-12-01, defaults): about 3 minutes (13 s compiling); total loss 8.18 at
step 1 -> 2.05-2.1 over the last 60 steps (main next-byte loss 6.31 -> 1.6); max/mean expert load
near 1.2 at the end. README "Quick start" and "Pretraining" have the details.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dsv3_jax.train.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n")[0]))
