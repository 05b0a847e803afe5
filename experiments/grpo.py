"""GRPO on our own rollout engine: sample groups of completions with the latent-cache decoder,
score them with Python reward functions, and apply the clipped policy-gradient update.

Command:   python experiments/grpo.py           (defaults: tiny from random weights on the
                                                 embedded arithmetic task: runs, learns little)
           python experiments/grpo.py --init_checkpoint runs/sft    (after experiments/sft.py)
           python experiments/grpo.py --help    (every flag, with its default)
           python experiments/grpo.py --hf path/to/model --data prompts.jsonl \
               --reward my_rewards.py:score --reward exact_answer --reward_weights 1 0.5
Hardware:  any: the CPU for tiny; one GPU (GRPO runs on one device in this version).
What it does: per step, --global_batch prompts x --num_generations completions sampled by
dsv3_jax.infer.rollout (the engine's log-probs kept, and with --routing_replay its expert
choices), rewards from --reward functions (TRL's signature), group-normalised advantages, and
--num_iterations updates of TRL's loss variants (--loss_type, --epsilon/--epsilon_high,
--importance_sampling_level, --beta KL), with the rollout log-prob mismatch corrected by
truncated importance sampling (--rollout_is). Held-out accuracy (greedy) before and after.
Output: a log line every --log_every steps (reward, clip fraction, rollout share); with
--metrics_file one JSON record per step: reward_mean, reward_std, frac_reward_zero_std,
clip_frac, kl (beta > 0), completion_length, entropy, rollout_tokens_per_s, rollout_seconds,
train_seconds, logprob_gap, ... experiments/grpo_ladder.py runs SFT then GRPO and records the
accuracy gain (experiments/results/grpo_arithmetic_cpu.json).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dsv3_jax.train.grpo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n")[0]))
