"""Properties of the building blocks: RMSNorm's formula, RoPE's relative-position property and
linear scaling, soft_cap, param_name, and the few-rows / many-rows twins of Einsum.project and
FeedForward (both paths equal each other and a plain einsum, with and without LoRA)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemma_jax import layers, lora
from gemma_jax.config import get_preset
from gemma_jax.layers import Einsum, RMSNorm, apply_rope, param_name, soft_cap
from gemma_jax.transformer import FeedForward, Transformer


def _normal(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# RMSNorm, RoPE, soft_cap.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_rms_norm_formula_in_float32_cast_back(dtype):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32, returned in x's dtype."""
  norm = RMSNorm(8, 'embed', eps=1e-6)
  scale = np.random.default_rng(1).normal(size=8).astype(np.float32)
  norm.scale.set_value(jnp.asarray(scale))
  x = _normal((2, 3, 8), scale=3.0).astype(dtype)
  x32 = np.asarray(x, np.float32)
  want = x32 / np.sqrt(np.mean(x32**2, -1, keepdims=True) + 1e-6) * (1 + scale)
  got = norm(x)
  assert got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: one rounding of the float32 result
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)


def test_rms_norm_does_not_overflow_in_half_precision():
  """float16 values whose squares overflow float16 (300^2 > 65504) still normalise exactly."""
  norm = RMSNorm(4, 'embed')
  x = jnp.asarray([[[300.0, -300.0, 300.0, -300.0]]], jnp.float16)
  got = norm(x)
  assert got.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(got, np.float32), [[[1, -1, 1, -1]]], rtol=1e-3)


def test_rope_dot_product_depends_only_on_relative_position():
  """<rope(q, p), rope(k, p')> is the same for every pair with the same p - p'."""
  H = 16
  q, k = _normal((1, 1, 1, H), 1), _normal((1, 1, 1, H), 2)

  def dot(p, pk):
    rq = apply_rope(q, jnp.asarray([[p]]), base=10_000.0)
    rk = apply_rope(k, jnp.asarray([[pk]]), base=10_000.0)
    return float(jnp.sum(rq * rk))

  for delta in (0, 1, 5, -3):
    values = [dot(p + delta, p) for p in (0, 7, 100, 1000)]
    np.testing.assert_allclose(values, values[0], rtol=1e-4, atol=1e-4)
  assert abs(dot(5, 0) - dot(1, 0)) > 1e-3  # it does depend on the offset


def test_rope_is_a_rotation_of_first_half_against_second_half():
  """Position 0 is the identity, norms are kept, and for H=2 (x, 0) turns by angle p."""
  x = _normal((2, 5, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  out = apply_rope(x, pos, base=10_000.0)
  np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  e = jnp.asarray([1.0, 0.0]).reshape(1, 1, 1, 2)
  for p in (1, 2, 3):
    np.testing.assert_allclose(apply_rope(e, jnp.asarray([[p]]), base=10.0).ravel(),
                               [np.cos(p), np.sin(p)], atol=1e-6)


def test_rope_linear_scale_equals_dividing_positions():
  """apply_rope(x, p, scale=s) == apply_rope(x, p / s) and differs from unscaled."""
  x = _normal((1, 6, 2, 8))
  pos = jnp.arange(6)[None] * 3
  scaled = apply_rope(x, pos, base=1000.0, scale=8.0)
  np.testing.assert_allclose(scaled, apply_rope(x, pos / 8.0, base=1000.0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(scaled, apply_rope(x, pos, base=1000.0), atol=1e-3)


def test_soft_cap_is_smooth_bound():
  """cap * tanh(x / cap): |y| < cap, odd, monotone, ~identity near 0; None is the identity."""
  x = jnp.linspace(-500.0, 500.0, 1001)
  y = soft_cap(x, 30.0)
  assert float(jnp.abs(y).max()) <= 30.0
  np.testing.assert_allclose(y, -soft_cap(-x, 30.0), atol=1e-5)
  assert float(jnp.diff(y).min()) >= -1e-5  # monotone up to float32 rounding of tanh
  np.testing.assert_allclose(soft_cap(jnp.asarray([0.01, -0.02]), 30.0), [0.01, -0.02], rtol=1e-4)
  np.testing.assert_allclose(soft_cap(jnp.asarray([1e6]), 50.0), [50.0], rtol=1e-6)
  assert soft_cap(x, None) is x


# ---------------------------------------------------------------------------------------------
# param_name.


@pytest.fixture(scope='module')
def tiny_abstract():
  """tiny-gemma1 built abstractly (no arrays, no compilation)."""
  return nnx.eval_shape(lambda: Transformer(get_preset('tiny-gemma1'), rngs=nnx.Rngs(0)))


def test_param_name_from_nnx_paths_and_jax_key_paths(tiny_abstract):
  """The nnx flat-state path and the jax key path of each parameter give one dotted name."""
  state = nnx.state(tiny_abstract, nnx.Param)
  from_nnx = [param_name(p) for p, _ in nnx.to_flat_state(state)]
  from_jax = [param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert sorted(from_nnx) == sorted(from_jax)
  assert 'layers.0.attn.q_einsum.w' in from_jax and 'layers.1.mlp.linear' in from_jax
  assert 'final_norm.scale' in from_jax and 'embedder.input_embedding' in from_jax
  assert not any(n.endswith('.value') or '/' in n for n in from_jax)
  assert param_name(('layers', 0, 'attn', 'q_einsum', 'w')) == 'layers.0.attn.q_einsum.w'


def test_param_name_of_optax_state_and_plain_key_paths(tiny_abstract):
  """Optax states (GetAttrKey, SequenceKey) name their leaves after the parameters they track."""
  params = nnx.state(tiny_abstract, nnx.Param)
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  mu = [param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state[0].mu)[0]]
  assert sorted(mu) == sorted(param_name(p) for p, _ in nnx.to_flat_state(params))
  names = [param_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(opt_state)[0]]
  assert '0.mu.layers.0.attn.q_einsum.w' in names and '0.count' in names
  tree = {'a': [1, {'b': 2}]}
  assert [param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]] == \
      ['a.0', 'a.1.b']


# ---------------------------------------------------------------------------------------------
# The switchable twin: few-rows (batched over the weight's leading axes) vs many-rows (einsum).

FEW, MANY = 10**9, 0  # FEW_ROWS values that force the few-rows / the many-rows path
ROWS = {'3_rows': (1, 3), '80_rows': (2, 40)}  # B*T below and above the real FEW_ROWS = 64


def _force(monkeypatch, few_rows):
  """Every projection runs through layers.einsum, which reads FEW_ROWS at call time."""
  monkeypatch.setattr(layers, 'FEW_ROWS', few_rows)


def _assert_both_paths_equal(monkeypatch, fn, want):
  """fn() on the few-rows path and on the many-rows path: each equals `want`, and each other."""
  got = {}
  for name, few_rows in (('few', FEW), ('many', MANY)):
    _force(monkeypatch, few_rows)
    got[name] = fn()
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(got['few'], got['many'], rtol=1e-5, atol=1e-6)


def test_real_threshold_is_between_the_row_counts():
  """The two row counts below straddle the default switch, so default calls take both paths."""
  assert layers.FEW_ROWS == 64
  assert ROWS['3_rows'][0] * ROWS['3_rows'][1] <= 64 < ROWS['80_rows'][0] * ROWS['80_rows'][1]


@pytest.mark.parametrize('rows', list(ROWS))
@pytest.mark.parametrize('eq, shape', [('BTD,NDH->BTNH', (4, 16, 8)),
                                       ('BTD,CKDH->CBTKH', (2, 2, 16, 8)),
                                       ('BTD,CNDH->CBTNH', (3, 4, 16, 8)),
                                       ('BTNH,NHD->BTD', (4, 8, 16))],
                         ids=['q_NDH', 'kv_2KDH', 'qkv_3NDH', 'out_NHD'])
def test_einsum_paths_agree_with_plain_einsum(monkeypatch, eq, shape, rows):
  """Both paths of an Einsum == jnp.einsum of its own equation (float32, rtol 1e-5)."""
  axes = (None,) * (len(shape) - 3) + ('heads', 'embed', 'head_dim')
  e = Einsum(eq, shape, axes, rngs=nnx.Rngs(0))
  x_shape = (*ROWS[rows], *shape[:2]) if eq.startswith('BTNH') else (*ROWS[rows], shape[-2])
  x = _normal(x_shape, seed=1)
  want = jnp.einsum(eq, x, e.w[...], precision='highest')
  _assert_both_paths_equal(monkeypatch, lambda: e(x), want)


@pytest.mark.parametrize('rows', list(ROWS))
def test_feed_forward_paths_agree_with_plain_geglu(monkeypatch, rows):
  """Both paths of FeedForward == gelu_tanh(x Wg) * (x Wu) @ W_down."""
  config = get_preset('tiny-gemma1')
  ff = FeedForward(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  x = _normal((*ROWS[rows], config.embed_dim), seed=2)
  w = ff.gating_einsum[...]
  gate = jnp.einsum('BTD,DF->BTF', x, w[0], precision='highest')
  up = jnp.einsum('BTD,DF->BTF', x, w[1], precision='highest')
  want = jnp.einsum('BTF,FD->BTD', jax.nn.gelu(gate, approximate=True) * up, ff.linear[...],
                    precision='highest')
  _assert_both_paths_equal(monkeypatch, lambda: ff(x), want)


def _lora_model(config):
  """(tiny Transformer with rank-2 adapters on every projection, B factors made non-zero,
  the same model without adapters)."""
  model = Transformer(config, rngs=nnx.Rngs(0))
  plain = nnx.clone(model)
  lora.add_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(3)
  nnx.update(model, jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype),
                                 nnx.state(model, nnx.LoRAParam)))
  return model, plain


@pytest.mark.parametrize('fused', [False, True], ids=['q_kv', 'fused_qkv'])
def test_lora_paths_agree_and_equal_the_merged_model(monkeypatch, fused):
  """With non-zero adapters, few-rows == many-rows logits at 3 and 80 rows, both equal to the
  model with the adapters merged into its weights, and both differ from the base model."""
  config = get_preset('tiny-gemma1')
  if fused:  # N == K: one qkv_einsum [3, N, D, H] carries a stacked adapter
    config = config.replace(num_kv_heads=config.num_heads)
  model, plain = _lora_model(config)
  assert hasattr(model.layers[0].attn, 'qkv_einsum') == fused
  merged = nnx.clone(model)
  lora.merge_lora(merged)
  for rows in ROWS.values():
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, rows))
    _force(monkeypatch, MANY)
    want, _ = merged(tokens)
    got = {}
    for path, few_rows in (('few', FEW), ('many', MANY)):
      _force(monkeypatch, few_rows)
      got[path], _ = model(tokens)
      np.testing.assert_allclose(got[path], want, rtol=1e-4, atol=1e-4, err_msg=path)
    # 2 layers deep: each path is within 1e-4 of the merged model, so of each other within 2e-4
    np.testing.assert_allclose(got['few'], got['many'], rtol=1e-4, atol=2e-4)
    assert not np.allclose(plain(tokens)[0], got['few'], atol=1e-3)  # the adapters matter


def test_lora_layout_and_equations_follow_from_the_projection_equation():
  """The equation alone gives the weight's fan-in (contracted axes), its stacked projections and
  the LoRA factors' equations (as the official gemma library derives them)."""
  lay = layers.einsum_layout('BTD,CKDH->CBTKH')
  assert (lay.stack, lay.contracted, lay.produced) == ((0,), (2,), (1, 3))
  assert layers.lora_einsums('BTD,CKDH->CBTKH') == ('BTD,CDr->CBTr', 'CBTr,CrKH->CBTKH')
  assert layers.lora_einsums('BTD,NDH->BTNH') == ('BTD,Dr->BTr', 'BTr,rNH->BTNH')
  assert layers.lora_einsums('BTNH,NHD->BTD') == ('BTNH,NHr->BTr', 'BTr,rD->BTD')
  assert layers.lora_einsums('BTD,CDF->CBTF') == ('BTD,CDr->CBTr', 'CBTr,CrF->CBTF')
  e = Einsum('BTNH,NHD->BTD', (4, 8, 16), ('heads', 'head_dim', 'embed'), rngs=nnx.Rngs(0))
  assert np.std(np.asarray(e.w[...])) == pytest.approx((4 * 8) ** -0.5, rel=0.1)  # fan-in N*H
  with pytest.raises(ValueError, match='the weight has 2 axes, the equation 3'):
    Einsum('BTD,NDH->BTNH', (4, 16), ('heads', 'embed'), rngs=nnx.Rngs(0))
