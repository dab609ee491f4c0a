"""Gemma 4's mixture-of-experts block: a router and E GeGLU experts, dispatched by grouped matmul.

Read from transformers' `Gemma4TextRouter` / `Gemma4TextExperts` (models/gemma4/modeling_gemma4.py,
5.24). Router: a scale-free RMSNorm of the residual stream, times a learned scale and D^-0.5, a
linear map to E logits, a float32 softmax, the top k probabilities renormalised to sum to 1, each
times its expert's learned `per_expert_scale`. Experts: GeGLU with fused gate/up.

Dispatch: the M x k (token, expert) pairs are sorted by expert into R rows and each expert's
contiguous group goes through one grouped matmul (`jax.lax.ragged_dot`), so compute follows
M x k, not M x E; the weighted rows are then summed back per token. XLA lowers `ragged_dot`
natively on GPU and TPU; its CPU lowering computes every group densely (correct, E times the
work), which is why tests/test_moe.py counts FLOPs in the GPU lowering. With few rows (decoding:
at most FEW_ROWS, and fewer than E) each row's expert weights are gathered instead, so a step reads
only the experts it uses.

Expert weights carry the logical axis 'expert' (gemma_jax.sharding maps it to 'fsdp': each device
stores E / fsdp experts, gathered for use like every FSDP weight), and each batch shard dispatches
its own rows (`jax.shard_map`), so activation memory follows the local batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemma_jax import quant
from gemma_jax import sharding
from gemma_jax.config import ModelConfig
from gemma_jax.layers import FEW_ROWS, Einsum, RMSNorm, einsum_param, weight


class MoE(nnx.Module):
  """Router plus experts: x [B,T,D] (the block's residual stream) -> [B,T,D].

  Parameters: `router.w` (D, E), `router_scale` (D,), `per_expert_scale` (E,),
  `gating_einsum` (E, D, 2, F) (gate and up), `linear` (E, F, D).
  """

  # The maths of one row m routed to expert e (what `ragged_dot` computes for every row).
  GATING = 'MD,EDCF->MCF'
  LINEAR = 'MF,EFD->MD'

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    c = config
    D, E, F = c.embed_dim, c.num_experts, c.expert_hidden_dim
    self.top_k = c.num_experts_per_token
    self.dtype = dtype
    self.router_norm = RMSNorm(D, 'embed', eps=c.rms_norm_eps, with_scale=False)
    self.router_scale = nnx.Param(jnp.ones((D,), param_dtype), logical_axes=('embed',))
    self.router = Einsum('BTD,DE->BTE', (D, E), ('embed', None), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
    self.per_expert_scale = nnx.Param(jnp.ones((E,), param_dtype), logical_axes=(None,))
    self.gating_einsum = einsum_param(rngs, self.GATING, (E, D, 2, F), param_dtype,
                                      ('expert', 'embed', None, 'mlp'))
    self.linear = einsum_param(rngs, self.LINEAR, (E, F, D), param_dtype,
                               ('expert', 'mlp', 'embed'))

  @property
  def einsums(self) -> dict[str, str]:
    """The expert weights gemma_jax.lora may adapt: one adapter pair per expert, applied to the
    rows routed to it (its router is an `Einsum` of its own)."""
    return {'gating_einsum': self.GATING, 'linear': self.LINEAR}

  def route(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weights [B,T,k] float32, expert ids [B,T,k] int32) of each token's top-k experts."""
    D = x_BTD.shape[-1]
    h_BTD = self.router_norm(x_BTD).astype(jnp.float32)
    h_BTD = h_BTD * self.router_scale[...].astype(jnp.float32) * D**-0.5
    logits_BTE = self.router(h_BTD.astype(self.dtype))
    probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    weights_BTk, experts_BTk = jax.lax.top_k(probs_BTE, self.top_k)
    weights_BTk = weights_BTk / jnp.sum(weights_BTk, axis=-1, keepdims=True)
    scale_E = self.per_expert_scale[...].astype(jnp.float32)
    return weights_BTk * scale_E[experts_BTk], experts_BTk

  def _expert_weights(self) -> tuple[dict[str, jax.Array], dict[str, tuple[int, int]]]:
    """(arrays, quantized): the expert weights `gating_einsum` [E, D, 2F] and `linear` [E, F, D]
    in the compute dtype, with their LoRA factors where gemma_jax.lora added them
    (`{name}_lora_a` / `_lora_b`). A weight gemma_jax.quant holds in low bits stays so, with its
    `{name}_qscale`, and `quantized[name]` = (bits, group axis): `_dispatch` dequantizes only the
    experts a step uses when it gathers them."""
    w, quantized = {}, {}
    for name in ('gating_einsum', 'linear'):
      var = getattr(self, name)
      if isinstance(var, quant.QuantizedWeight):
        scale = getattr(self, name + quant.SCALE_SUFFIX)
        w[name], w[name + quant.SCALE_SUFFIX] = var[...], scale[...]
        quantized[name] = (var.get_metadata('bits'), var.get_metadata('axis'))
      else:
        v = weight(self, name, self.dtype)
        w[name] = v.reshape(*v.shape[:2], -1)
      if hasattr(self, f'{name}_lora_a'):
        w[f'{name}_lora_a'] = getattr(self, f'{name}_lora_a')[...].astype(self.dtype)
        b = getattr(self, f'{name}_lora_b')[...]
        w[f'{name}_lora_b'] = b.reshape(*b.shape[:2], -1).astype(self.dtype)
    return w, quantized

  def __call__(self, x_BTD: jax.Array, expert_in_BTD: jax.Array) -> jax.Array:
    """Routes by `x_BTD` and runs the experts on `expert_in_BTD` (Gemma 4 routes on the residual
    stream and feeds the experts its pre-norm); returns [B,T,D] in the compute dtype.

    Under a mesh that splits the batch, each batch shard sorts and dispatches its own rows
    (`jax.shard_map`, the expert weights gathered whole to every shard as FSDP gathers every
    weight): without it the partitioner gathers the whole global batch's rows on every device.
    """
    weights_BTk, experts_BTk = self.route(x_BTD)
    scales = {name: getattr(self, f'{name}_lora_scale') for name in ('gating_einsum', 'linear')
              if hasattr(self, f'{name}_lora_scale')}
    w, quantized = self._expert_weights()
    run = functools.partial(_dispatch, lora_scales=scales, dtype=self.dtype, quantized=quantized)
    spec = sharding.current_spec(('batch', None, None), x_BTD.shape)
    args = (expert_in_BTD, weights_BTk, experts_BTk, w)
    if spec is None or spec[0] is None:
      return run(*args)
    rows = P(spec[0], None, None)
    return jax.shard_map(run, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(rows, rows, rows, P()), out_specs=rows)(*args)


def _dispatch(x_BTD, weights_BTk, experts_BTk, w, *, lora_scales, dtype, quantized=None):
  """The experts on x: its (token, expert) pairs sorted by expert, so that each expert's rows are
  one contiguous group of one grouped matmul, then weighted and summed back per token."""
  B, T, D = x_BTD.shape
  k = experts_BTk.shape[-1]
  E = w['linear'].shape[0]
  experts_R = experts_BTk.reshape(-1)
  order_R = jnp.argsort(experts_R, stable=True)
  token_R = order_R // k
  group_sizes_E = jnp.bincount(experts_R, length=E).astype(jnp.int32)

  # Few rows (decoding) and fewer than the experts: gather each row's expert weights, so a step
  # reads R experts' weights rather than all E (XLA's CPU ragged_dot computes every group).
  gather = B * T * k <= FEW_ROWS and B * T * k < E
  sorted_experts_R = experts_R[order_R]

  quantized = quantized or {}

  def expert_weight(name, experts=None):
    """Weight `name` [E, X, Y] of every expert, or [R, X, Y] of the given ones; a quantized one
    is dequantized after the gather, so a decoding step reads only the experts it uses."""
    if name not in quantized:
      return w[name] if experts is None else w[name][experts]
    q, scale = w[name], w[name + quant.SCALE_SUFFIX]
    if experts is not None:
      q, scale = q[experts], scale[experts]
    bits, axis = quantized[name]
    full = quant.dequantize_array(q, scale, bits=bits, axis=axis, dtype=dtype)
    return full.reshape(*full.shape[:2], -1)

  def matmul(x_RX, name):
    if gather:
      return jnp.einsum('RX,RXY->RY', x_RX, expert_weight(name, sorted_experts_R))
    return jax.lax.ragged_dot(x_RX, expert_weight(name), group_sizes_E)

  def ragged(name, x_RX):
    """Each row times its expert's weight `name`, plus that expert's LoRA update if any."""
    y_RY = matmul(x_RX, name)
    if name not in lora_scales:
      return y_RY
    update_RY = matmul(matmul(x_RX, f'{name}_lora_a'), f'{name}_lora_b')
    return y_RY + update_RY * jnp.asarray(lora_scales[name], y_RY.dtype)

  x_RD = x_BTD.reshape(B * T, D).astype(dtype)[token_R]
  gate_up_RCF = ragged('gating_einsum', x_RD).reshape(B * T * k, 2, -1)
  act_RF = jax.nn.gelu(gate_up_RCF[:, 0], approximate=True) * gate_up_RCF[:, 1]
  y_RD = ragged('linear', act_RF)
  y_RD = y_RD * weights_BTk.reshape(-1)[order_R][:, None].astype(y_RD.dtype)
  y_MD = jnp.zeros((B * T, D), y_RD.dtype).at[token_R].add(y_RD)
  return y_MD.reshape(B, T, D)
