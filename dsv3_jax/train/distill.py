"""Logit-level knowledge distillation for SFT: a divergence between a frozen teacher's and the
student's next-token distributions, averaged over the target positions.

The divergence follows the generalized Jensen-Shannon family of GKD (Agarwal et al. 2023,
"On-Policy Distillation of Language Models", eq. 1) as TRL's GKD trainer computes it
(`generalized_jsd_loss` in trl/experimental/gkd/gkd_trainer.py): both logits are divided by
the temperature before their log-softmax; beta = 0 is the forward KL(teacher || student),
beta = 1 the reverse KL(student || teacher), and 0 < beta < 1 is
    beta * KL(teacher || m) + (1 - beta) * KL(student || m),  m = beta p_t + (1 - beta) p_s.
Like TRL, the two ends are special cases: the mixture form itself tends to 0 as beta -> 0 or 1,
so the value is not continuous in beta there. No temperature**2 factor is applied (TRL applies
none either).

The full-vocabulary logits of either model are never held for all positions: the flattened
B*T positions go through `lax.map` in chunks, and each chunk's body sits under
`jax.checkpoint`, so the backward pass recomputes a chunk's [chunk, V] logits from its
[chunk, D] hidden states instead of keeping them (the same idea as a chunked / "cut" cross
entropy).
"""

import math

import jax
import jax.numpy as jnp

from dsv3_jax.layers import head


def _log_probs(hidden: jnp.ndarray, w_head: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """log softmax(logits / temperature) [N, V] in float32 for hidden [N, D], via `layers.head`
    (float32 logits from the model's own head matmul, whose backward casts like the model's)."""
    logits = head(hidden[None], w_head)[0]
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def divergence(log_ps: jnp.ndarray, log_pt: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Per-row divergence [...] between student and teacher log-probabilities [..., V], in
    TRL's generalized-JSD convention (module docstring); the mixture's log is a logaddexp of
    the two weighted log-probabilities, so nothing is exponentiated and logged back."""
    if beta == 0.0:
        return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(log_ps) * (log_ps - log_pt), axis=-1)
    log_m = jnp.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    kl_t = jnp.sum(jnp.exp(log_pt) * (log_pt - log_m), axis=-1)
    kl_s = jnp.sum(jnp.exp(log_ps) * (log_ps - log_m), axis=-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def _check(student_hidden, student_head, teacher_hidden, teacher_head, mask, beta,
           temperature, chunk) -> None:
    if student_hidden.ndim != 3 or teacher_hidden.ndim != 3:
        raise ValueError(f"kd_loss: student_hidden {student_hidden.shape} and teacher_hidden "
                         f"{teacher_hidden.shape} must both be [B, T, D]")
    if student_head.ndim != 2 or student_head.shape[0] != student_hidden.shape[-1]:
        raise ValueError(f"kd_loss: student_head {student_head.shape} must be [D, V] with "
                         f"D = student_hidden's last size {student_hidden.shape[-1]}")
    if teacher_head.ndim != 2 or teacher_head.shape[0] != teacher_hidden.shape[-1]:
        raise ValueError(f"kd_loss: teacher_head {teacher_head.shape} must be [Dt, V] with "
                         f"Dt = teacher_hidden's last size {teacher_hidden.shape[-1]}")
    if student_head.shape[1] != teacher_head.shape[1]:
        raise ValueError(f"kd_loss: student vocabulary {student_head.shape[1]} != teacher "
                         f"vocabulary {teacher_head.shape[1]}; distillation needs one tokenizer")
    if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(f"kd_loss: teacher_hidden {teacher_hidden.shape} and student_hidden "
                         f"{student_hidden.shape} must share [B, T]")
    if mask.shape != student_hidden.shape[:2]:
        raise ValueError(f"kd_loss: mask {mask.shape} must be [B, T] = "
                         f"{student_hidden.shape[:2]}")
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"kd_loss: beta must be a number in [0, 1], got {beta!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be a number > 0, got {temperature!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"kd_loss: chunk must be an int >= 1, got {chunk!r}")


def kd_loss(student_hidden: jnp.ndarray, student_head: jnp.ndarray, teacher_hidden: jnp.ndarray,
            teacher_head: jnp.ndarray, mask: jnp.ndarray, *, beta: float = 0.0,
            temperature: float = 1.0, chunk: int = 512) -> tuple[jnp.ndarray, dict]:
    """(loss, metrics): the masked token mean of the teacher-student divergence.

    student_hidden [B, T, D]: the student's final-normed hidden state (`forward`'s
    aux["hidden"]); student_head [D, V] in the student's compute dtype. teacher_hidden
    [B, T, Dt] and teacher_head [Dt, V]: the frozen teacher's (no gradient reaches them).
    mask [B, T]: 1 where the position's next-token distribution counts (assistant targets).
    beta: 0 forward KL, 1 reverse KL, between: generalized JSD (module docstring).
    chunk: positions of the flattened B*T per step (at most B*T are used); peak memory of the
    logits is about chunk x V per model. loss = sum(mask * div) / max(sum(mask), 1); metrics
    `kd_loss` (the same value) and `kd_tokens` (sum of the mask).
    """
    _check(student_hidden, student_head, teacher_hidden, teacher_head, mask, beta,
           temperature, chunk)
    b, t, d = student_hidden.shape
    n = b * t
    size = min(chunk, n)  # a chunk larger than the batch would only compute padding
    pad = -n % size
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_head = jax.lax.stop_gradient(teacher_head)

    def rows(x):  # [B, T, ...] -> [n_chunks, size, ...], padded rows zero (mask 0)
        x = x.reshape((n,) + x.shape[2:])
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((-1, size) + x.shape[1:])

    @jax.checkpoint
    def body(w_s, w_t, xs):
        h_s, h_t, m = xs
        div = divergence(_log_probs(h_s, w_s, temperature), _log_probs(h_t, w_t, temperature),
                         float(beta))
        return jnp.sum(m * div)

    with jax.named_scope("kd"):
        m = mask.astype(jnp.float32)
        chunks = (rows(student_hidden), rows(teacher_hidden), rows(m))
        total = jnp.sum(jax.lax.map(lambda xs: body(student_head, teacher_head, xs), chunks))
        tokens = jnp.sum(m)
        loss = total / jnp.maximum(tokens, 1.0)
    return loss, {"kd_loss": loss, "kd_tokens": tokens}
