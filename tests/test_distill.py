"""Knowledge-distillation loss (dsv3_jax/train/distill.py) against a float64 numpy reference
written in probability space, its chunking, its frozen teacher and its memory footprint."""

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.train.distill import kd_loss

B, T, D, DT, V = 2, 7, 8, 12, 33  # B*T = 14 positions: chunk 4 leaves a partial chunk


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(B, T, D)).astype(np.float32)
    ws = (rng.normal(size=(D, V)) * 0.8).astype(np.float32)
    ht = rng.normal(size=(B, T, DT)).astype(np.float32)
    wt = (rng.normal(size=(DT, V)) * 0.8).astype(np.float32)
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[0, 0], mask[1, -1] = 0.0, 1.0  # zeros and ones whatever the draw
    return hs, ws, ht, wt, mask


def _softmax64(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _reference(hs, ws, ht, wt, mask, beta, temperature):
    """(loss, d loss / d hs, d loss / d ws) in float64, from probabilities (not log space).

    The gradient uses d div / d p_s = -p_t / p_s (beta 0), log(p_s / m) * (1 - beta) (beta in
    (0, 1), where the terms through m cancel) and log(p_s / p_t) + 1 (beta 1), pulled back
    through the softmax: d div / d z = p_s * (g - <p_s, g>) / temperature."""
    hs, ws, ht, wt = (np.asarray(a, np.float64) for a in (hs, ws, ht, wt))
    ps = _softmax64(hs @ ws / temperature)
    pt = _softmax64(ht @ wt / temperature)
    if beta == 0.0:
        div, g = (pt * np.log(pt / ps)).sum(-1), -pt / ps
    elif beta == 1.0:
        div, g = (ps * np.log(ps / pt)).sum(-1), np.log(ps / pt) + 1.0
    else:
        m = beta * pt + (1 - beta) * ps
        div = beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)
        g = (1 - beta) * np.log(ps / m)
    count = max(mask.sum(), 1.0)
    dz = ps * (g - (ps * g).sum(-1, keepdims=True)) / temperature
    dz = dz * (mask / count)[..., None]
    return (mask * div).sum() / count, dz @ ws.T, np.einsum("btd,btv->dv", hs, dz)


def _grad(args, argnums=(0, 1), **kw):
    return jax.grad(lambda *a: kd_loss(*a, **kw)[0], argnums=argnums)(*args)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_float64_reference(beta, temperature):
    args = _inputs()
    want, want_dh, want_dw = _reference(*args, beta, temperature)
    loss, metrics = kd_loss(*map(jnp.asarray, args), beta=beta, temperature=temperature,
                            chunk=4)
    assert want > 0.05  # a divergence that the tolerance below can see
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["kd_loss"], want, rtol=1e-5)
    assert metrics["kd_tokens"] == args[4].sum()
    dh, dw = _grad(tuple(map(jnp.asarray, args)), beta=beta, temperature=temperature, chunk=4)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(dh)[args[4] == 0] == 0)  # masked positions get no gradient


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunk_size_changes_neither_value_nor_gradient(beta):
    args = tuple(map(jnp.asarray, _inputs(1)))
    small, _ = kd_loss(*args, beta=beta, temperature=1.5, chunk=3)
    large, _ = kd_loss(*args, beta=beta, temperature=1.5, chunk=1000)
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-6)
    for g3, g1000 in zip(_grad(args, beta=beta, temperature=1.5, chunk=3),
                         _grad(args, beta=beta, temperature=1.5, chunk=1000)):
        np.testing.assert_allclose(g3, g1000, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(beta):
    hs, ws, _, _, mask = map(jnp.asarray, _inputs(2))
    args = (hs, ws, hs, ws, mask)
    loss, _ = kd_loss(*args, beta=beta, chunk=4)
    assert abs(float(loss)) < 1e-6
    for g in _grad(args, beta=beta, chunk=4):
        assert float(jnp.max(jnp.abs(g))) < 1e-6
    # the same inputs with another teacher do give a gradient of the size the bound would miss
    other = _grad((hs, ws, hs, ws * 1.5, mask), beta=beta, chunk=4)
    assert float(jnp.max(jnp.abs(other[0]))) > 1e-3


def test_no_gradient_reaches_the_teacher():
    args = tuple(map(jnp.asarray, _inputs(3)))
    for beta in (0.0, 0.5, 1.0):
        dht, dwt = _grad(args, argnums=(2, 3), beta=beta, chunk=4)
        assert np.all(np.asarray(dht) == 0) and np.all(np.asarray(dwt) == 0)


def test_empty_mask_gives_zero():
    hs, ws, ht, wt, mask = map(jnp.asarray, _inputs(4))
    loss, metrics = kd_loss(hs, ws, ht, wt, jnp.zeros_like(mask), beta=0.5, chunk=4)
    assert float(loss) == 0.0 and float(metrics["kd_tokens"]) == 0.0


def _largest_intermediate(closed) -> int:
    """The most elements of any equation output in a jaxpr, scan / remat / custom-vjp bodies
    and every other nested jaxpr included."""
    def walk(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            sizes += [walk(sub) for sub in jex.jaxprs_in_params(eqn.params)]
        return max(sizes)
    return walk(closed.jaxpr)


def _grad_jaxpr(chunk, n=4096, d=32, vocab=8192):
    spec = jax.ShapeDtypeStruct
    args = (spec((2, n // 2, d), jnp.float32), spec((d, vocab), jnp.float32),
            spec((2, n // 2, d), jnp.float32), spec((d, vocab), jnp.float32),
            spec((2, n // 2), jnp.float32))
    for beta in (0.0, 0.5, 1.0):
        yield jax.make_jaxpr(lambda *a: _grad(a, beta=beta, temperature=2.0, chunk=chunk))(*args)


def test_gradient_never_materialises_all_logits():
    """jax.grad's program holds [chunk, V] logits at most (a small multiple for the JSD's
    temporaries), never [B*T, V]: traced only, nothing runs."""
    chunk, vocab = 256, 8192
    for closed in _grad_jaxpr(chunk):
        largest = _largest_intermediate(closed)
        assert chunk * vocab <= largest <= 2 * chunk * vocab, largest
    # the walk does see the whole batch's logits when one chunk holds every position
    assert _largest_intermediate(next(_grad_jaxpr(4096))) == 4096 * vocab


def test_errors():
    hs, ws, ht, wt, mask = map(jnp.asarray, _inputs())
    with pytest.raises(ValueError, match=r"student vocabulary 33 != teacher vocabulary 32"):
        kd_loss(hs, ws, ht, wt[:, :32], mask)
    with pytest.raises(ValueError, match="mask"):
        kd_loss(hs, ws, ht, wt, mask[:, :-1])
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            kd_loss(hs, ws, ht, wt, mask, beta=beta)
    with pytest.raises(ValueError, match="chunk"):
        kd_loss(hs, ws, ht, wt, mask, chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(hs, ws, ht, wt, mask, temperature=0.0)
    with pytest.raises(ValueError, match="share"):
        kd_loss(hs, ws, ht[:, :-1], wt, mask)
