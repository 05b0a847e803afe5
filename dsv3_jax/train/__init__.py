"""Training: the objective (`loss`), the optimizer (`optim`), the jitted step (`step`), data
(`data`), checkpoints (`checkpoint`), the one training loop (`loop`, with `metrics` and
`signals`), and the pretraining job and its flags (`pretrain`, `settings`)."""
