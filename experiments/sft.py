"""Supervised fine-tuning (SFT) of a DeepSeek-V3-architecture model, optionally distilling from a
teacher.

Command:   python experiments/sft.py            (defaults: tiny from random weights on the
                                                  embedded arithmetic task, CPU, ~2 minutes)
           python experiments/sft.py --help     (every flag, with its default)
           python experiments/sft.py --hf path/to/model --data chats.jsonl --lr 1e-5 \
               --checkpoint_dir runs/sft --metrics_file runs/sft/metrics.jsonl --export_hf out/
Hardware:  any: the CPU for tiny, one or many GPUs through --mesh like pretraining.
What it does: renders each conversation with the tokenizer's chat template, trains on the
assistant tokens only (packed rows, attention kept within each conversation), with AdamW and
the V3 learning-rate shape, through the same loop as pretraining (checkpoints, exact resume,
failed-step guard, JSONL metrics), and ends with a greedy reply to --sample_prompt.
--teacher DIR adds logit-level distillation (forward KL / JSD) toward a frozen teacher.
Output: a log line every --log_every steps; --metrics_file gets one JSON record per step
(loss, main_loss, assistant_tokens, tokens_per_s, lr, ...); results of recorded runs are under
experiments/results/ (grpo_arithmetic_cpu.json holds the ladder that starts with this script).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dsv3_jax.train.sft import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n")[0]))
