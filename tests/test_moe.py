"""gemma_jax.moe: compute follows top-k (counted in the GPU lowering), routing and experts equal
transformers' Gemma4TextRouter / Gemma4TextExperts, and one AdamW step of a MoE model equals
transformers + torch. Sharded MoE steps equal one device in tests/_sharded_cases.py."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from gemma_jax import train_state, trainer
from gemma_jax.config import get_preset
from gemma_jax.convert import config_from_hf, hf_tensors_from_model, load_hf
from gemma_jax.moe import MoE
from hf_models import FAMILIES, make_hf_model

# ---------------------------------------------------------------------------------------------
# A FLOP counter over StableHLO text (a test tool).

_SYMBOL = r'@("[^"]*"|[\w.$-]+)'  # @main, @"<lambda>"
_FUNC = re.compile(rf'^\s*func\.func (?:public |private )?{_SYMBOL}\(', re.M)
_CALL = re.compile(rf'\bcall {_SYMBOL}\(')
_TENSOR = re.compile(r'tensor<([^<>]*)>')
_DOT_KINDS = ('stablehlo.dot_general', 'chlo.ragged_dot')


def _shape(tensor_type: str) -> tuple[int, ...]:
  """(512, 64) from '512x64xf32'; () from 'f32'."""
  return tuple(int(d) for d in tensor_type.split('x')[:-1])


def _dims(line: str, key: str) -> list[int]:
  """The integer list after `key = [` on an op line ([] when the key is absent)."""
  m = re.search(rf'\b{key} = \[([\d, ]*)\]', line)
  return [int(d) for d in m.group(1).split(',') if d.strip()] if m else []


def _op_flops(line: str) -> tuple[str, int] | None:
  """(kind, FLOPs) of one dot_general / ragged_dot line: 2 * prod(lhs) * prod(rhs free dims),
  the free dims being neither contracting, batch nor group. That is 2*prod(batch)*M*N*K for a
  dot_general and 2*M*K*N for a ragged_dot (each row meets one group's weight), in every ragged
  mode (the weight-gradient form, ragged in K, gives 2*M*K*N too)."""
  kind = next((k for k in _DOT_KINDS if k in line), None)
  if kind is None:
    if re.search(r'stablehlo\.(dot|convolution)\b', line):
      raise ValueError(f'unsupported contraction op, not counted: {line.strip()}')
    return None
  operands = _TENSOR.findall(line.rsplit(' : ', 1)[1].split('->')[0])
  lhs, rhs = _shape(operands[0]), _shape(operands[1])
  if kind == 'stablehlo.dot_general':
    m = re.search(r'contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]', line)
    b = re.search(r'batching_dims = \[([\d, ]*)\] x \[([\d, ]*)\]', line)
    to_ints = lambda s: [int(d) for d in s.split(',') if d.strip()]
    not_free = to_ints(m.group(2)) + (to_ints(b.group(2)) if b else [])
  else:
    not_free = (_dims(line, 'rhs_contracting_dimensions') + _dims(line, 'rhs_batching_dimensions')
                + _dims(line, 'rhs_group_dimensions'))
  free = math.prod(d for i, d in enumerate(rhs) if i not in not_free)
  return kind, 2 * math.prod(lhs) * free


def stablehlo_flops(text: str) -> dict[str, int]:
  """FLOPs of the contractions in a StableHLO module, by op kind ({'stablehlo.dot_general': n,
  'chlo.ragged_dot': n}), from @main down through every `call` (a function called twice counts
  twice). Loop bodies count once: the programs measured here have none."""
  starts = [(m.group(1), m.start()) for m in _FUNC.finditer(text)]
  bodies = {name: text[s:e] for (name, s), (_, e) in
            zip(starts, starts[1:] + [('', len(text))])}
  memo: dict[str, dict[str, int]] = {}

  def total(name: str) -> dict[str, int]:
    if name not in memo:
      counts = dict.fromkeys(_DOT_KINDS, 0)
      for line in bodies[name].splitlines()[1:]:
        op = _op_flops(line)
        if op:
          counts[op[0]] += op[1]
        for callee in _CALL.findall(line):
          for k, v in total(callee).items():
            counts[k] += v
      memo[name] = counts
    return memo[name]

  return total('main')


def gpu_flops(fn, *args) -> dict[str, int]:
  """FLOPs of `jax.jit(fn)(*args)` as lowered for CUDA (works on a CPU-only machine)."""
  return stablehlo_flops(jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text())


def test_flop_counter_on_matmuls_ragged_dots_and_calls():
  x_BMK, w_BKN = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 11))
  got = gpu_flops(lambda a, b: jnp.einsum('bmk,bkn->bmn', a, b), x_BMK, w_BKN)
  assert got == {'stablehlo.dot_general': 2 * 3 * 5 * 7 * 11, 'chlo.ragged_dot': 0}
  # A ragged_dot by hand: 40 rows in 3 groups of 4 weights; each row meets one group only.
  x_MK, w_GKN = jnp.ones((40, 6)), jnp.ones((4, 6, 9))
  sizes_G = jnp.array([10, 0, 25, 5], jnp.int32)
  got = gpu_flops(lambda x, w, s: jax.lax.ragged_dot(x, w, s), x_MK, w_GKN, sizes_G)
  assert got == {'stablehlo.dot_general': 0, 'chlo.ragged_dot': 2 * 40 * 6 * 9}
  # Forward and gradients: d x is ragged in M again, d w [G,K,N] ragged in its contracting M
  # (a count from its output shape, G*K*N x M, would be G = 4 times too high); 2*M*K*N each.
  vjp = jax.value_and_grad(lambda x, w, s: jax.lax.ragged_dot(x, w, s).sum(), argnums=(0, 1))
  got = gpu_flops(vjp, x_MK, w_GKN, sizes_G)
  assert got['chlo.ragged_dot'] == 3 * 2 * 40 * 6 * 9, got
  # A jitted function called twice is one private function with two calls: counted twice.
  inner = jax.jit(lambda a, b: a @ b)
  got = gpu_flops(lambda a, b: inner(a, b) + inner(2 * a, b), jnp.ones((4, 8)), jnp.ones((8, 2)))
  assert got['stablehlo.dot_general'] == 2 * (2 * 4 * 8 * 2)


def _moe_forward_flops(num_experts: int, top_k: int) -> dict[str, int]:
  """Contraction FLOPs of one MoE block forward (D = 64, expert F = 32) on 256 tokens."""
  config = get_preset('tiny-gemma4-moe').replace(
      embed_dim=64, num_experts=num_experts, num_experts_per_token=top_k, expert_hidden_dim=32)
  moe = MoE(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  graphdef, params = nnx.split(moe)
  x_BTD = jnp.ones((2, 128, 64), jnp.float32)  # 256 tokens
  return gpu_flops(lambda p, x: nnx.merge(graphdef, p)(x, x), params, x_BTD)


def test_moe_flops_follow_top_k_not_the_number_of_experts():
  M, D, F = 256, 64, 32
  e8k2, e32k2, e8k4 = (_moe_forward_flops(e, k) for e, k in ((8, 2), (32, 2), (8, 4)))
  total = lambda c: sum(c.values())
  # The experts: M*k rows, each through one expert's gate/up (D x 2F) and down (F x D).
  for counts, k in ((e8k2, 2), (e32k2, 2), (e8k4, 4)):
    assert counts['chlo.ragged_dot'] == 2 * M * k * (D * 2 * F + F * D), counts
  # 4x the experts: only the router (D x E) grows.
  assert e32k2['chlo.ragged_dot'] == e8k2['chlo.ragged_dot']
  assert total(e32k2) <= 1.3 * total(e8k2), (e32k2, e8k2)
  # Twice the experts per token: twice the expert work, about twice the whole block.
  assert e8k4['chlo.ragged_dot'] == 2 * e8k2['chlo.ragged_dot']
  assert 1.8 <= total(e8k4) / total(e8k2) <= 2.0, (e8k4, e8k2)


# ---------------------------------------------------------------------------------------------
# Routing and experts against transformers.


def test_router_and_experts_equal_transformers_with_every_expert_used():
  from transformers.models.gemma4 import modeling_gemma4 as hf_gemma4
  hf_config = FAMILIES['gemma4-moe']()  # E = 5, top 2, D = 48, expert F = 24
  E, k, D, F = (hf_config.num_experts, hf_config.top_k_experts, hf_config.hidden_size,
                hf_config.moe_intermediate_size)
  torch.manual_seed(1)
  router, experts = hf_gemma4.Gemma4TextRouter(hf_config), hf_gemma4.Gemma4TextExperts(hf_config)
  with torch.no_grad():
    for p in (*router.parameters(), *experts.parameters()):
      p.normal_(0.0, 0.3)
    router.scale.add_(1.0)
    router.per_expert_scale.add_(1.0)

  moe = MoE(config_from_hf(hf_config.to_dict()), rngs=nnx.Rngs(0), dtype=jnp.float32,
            param_dtype=jnp.float32)
  t = lambda p: p.detach().numpy()
  moe.router.w[...] = t(router.proj.weight).T
  moe.router_scale[...] = t(router.scale)
  moe.per_expert_scale[...] = t(router.per_expert_scale)
  moe.gating_einsum[...] = t(experts.gate_up_proj).reshape(E, 2, F, D).transpose(0, 3, 1, 2)
  moe.linear[...] = t(experts.down_proj).transpose(0, 2, 1)

  rng = np.random.default_rng(0)
  B, T = 2, 16
  x_BTD = rng.normal(0, 1, (B, T, D)).astype(np.float32)  # what the router sees
  e_BTD = rng.normal(0, 1, (B, T, D)).astype(np.float32)  # what the experts see
  with torch.no_grad():
    _, ref_weights, ref_ids = router(torch.as_tensor(x_BTD.reshape(-1, D)))
    ref_out = experts(torch.as_tensor(e_BTD.reshape(-1, D)), ref_ids, ref_weights)
  graphdef, state = nnx.split(moe)
  run = jax.jit(lambda s, x, e: (nnx.merge(graphdef, s).route(x), nnx.merge(graphdef, s)(x, e)))
  (weights_BTk, ids_BTk), out_BTD = run(state, x_BTD, e_BTD)
  ids = np.asarray(ids_BTk).reshape(-1, k)
  assert set(ids.ravel().tolist()) == set(range(E))  # every expert gets tokens
  np.testing.assert_array_equal(ids, ref_ids.numpy())
  np.testing.assert_allclose(np.asarray(weights_BTk).reshape(-1, k), ref_weights.numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out_BTD).reshape(-1, D), ref_out.numpy(),
                             rtol=1e-5, atol=1e-5)
  # Not vacuous: swapping the two inputs (routing by what the experts see) changes the output.
  _, swapped = run(state, e_BTD, x_BTD)
  assert np.abs(np.asarray(swapped) - np.asarray(out_BTD)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Training against transformers + torch.


def test_one_adamw_step_of_a_moe_model_matches_transformers_and_torch(tmp_path):
  """Same weights and batch, one plain AdamW step: our loss, gradient norm and updated weights
  (experts, router, per-expert scales and layer scalars included) equal torch's."""
  hf = make_hf_model('gemma4-moe')
  hf.save_pretrained(tmp_path)
  model = load_hf(tmp_path, dtype=jnp.float32)
  # transformers keeps layer_scalar as a buffer, we train it: make it a parameter there too.
  for layer in hf.model.layers:
    layer.layer_scalar = torch.nn.Parameter(layer.layer_scalar.clone())
  hf.train()

  B, T = 2, 24
  rng = np.random.default_rng(0)
  # No <pad> (id 0): torch's Embedding(padding_idx=0) never updates that row.
  ids = rng.integers(1, hf.config.vocab_size, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[:, :5] = 0
  mask[1, 20:] = 0
  batch = {'tokens': ids[:, :-1], 'targets': ids[:, 1:], 'loss_mask': mask,
           'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           'segment_ids': np.ones((B, T), np.int32)}
  lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.1

  tx = optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=wd)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step = jax.jit(trainer.make_train_step(graphdef, rest, tx, optax.constant_schedule(lr)))
  state, metrics = step(train_state.init_state(params, tx, 0), batch)

  # Every expert of every layer is used by this batch (so every expert weight trains).
  routed = []
  hooks = [layer.router.register_forward_hook(lambda m, i, o: routed.append(o[2]))
           for layer in hf.model.layers]
  logits = hf(torch.as_tensor(batch['tokens'], dtype=torch.long)).logits.float()
  for h in hooks:
    h.remove()
  assert len(routed) == len(hf.model.layers)
  for r in routed:
    assert set(r.ravel().tolist()) == set(range(hf.config.num_experts))
  m = torch.as_tensor(mask).bool()
  loss = torch.nn.functional.cross_entropy(
      logits[m], torch.as_tensor(batch['targets'], dtype=torch.long)[m])
  loss.backward()
  grad_norm = torch.linalg.vector_norm(
      torch.stack([torch.linalg.vector_norm(p.grad) for p in hf.parameters()]))
  opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
  opt.step()

  n_ours = sum(x.size for x in jax.tree.leaves(params))
  assert n_ours == sum(p.numel() for p in hf.parameters())  # both train the same set
  assert abs(float(metrics['loss']) - loss.item()) <= 1e-5 * loss.item()
  assert abs(float(metrics['grad_norm']) - grad_norm.item()) <= 1e-4 * grad_norm.item()
  ours = hf_tensors_from_model(nnx.merge(graphdef, state['params'], rest))
  theirs = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  assert set(ours) <= set(theirs)
  assert any('experts.gate_up_proj' in k for k in ours) and any('layer_scalar' in k for k in ours)
  # Adam's first step is ~lr * sign(g): where |g| is near eps float rounding of g moves the
  # update by up to lr, so a few such elements may differ; all others agree to 2e-6.
  diff = np.concatenate([np.abs(v - theirs[k]).ravel() for k, v in ours.items()])
  assert diff.max() <= 2e-3 and np.mean(diff > 2e-6) < 1e-3, (diff.max(), np.mean(diff > 2e-6))


def test_few_rows_gather_their_experts_and_equal_the_grouped_matmul(monkeypatch):
  """Decoding (B*T*k <= FEW_ROWS rows, fewer than E) gathers each row's expert weights instead of
  a ragged_dot over all E experts; with LoRA adapters on the experts too, it equals the grouped
  matmul."""
  from gemma_jax import lora, moe as moe_lib  # pylint: disable=g-import-not-at-top
  config = get_preset('tiny-gemma4-moe').replace(num_experts=16, num_experts_per_token=2)
  block = moe_lib.MoE(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  lora.add_lora(block, 2, 4.0, targets='gating_einsum|linear')
  for name in ('gating_einsum', 'linear'):
    b = getattr(block, f'{name}_lora_b')
    b.set_value(jax.random.normal(jax.random.key(3), b.shape) * 0.5)
  x_BTD = jax.random.normal(jax.random.key(1), (2, 2, config.embed_dim))  # 8 rows < 16 experts
  forward = lambda: jax.make_jaxpr(lambda x: block(x, x * 0.5))(x_BTD)
  assert 'ragged_dot' not in str(forward())
  gathered = block(x_BTD, x_BTD * 0.5)
  monkeypatch.setattr(moe_lib, 'FEW_ROWS', 0)
  assert 'ragged_dot' in str(forward())
  np.testing.assert_allclose(gathered, block(x_BTD, x_BTD * 0.5), rtol=1e-5, atol=1e-6)
