"""The train state: what it holds, how it is laid out on the mesh, and the one way to create it.

The train state is a plain dict pytree, `{'step', 'params', 'opt_state', 'rng'}` (+ `'frozen'`,
`'reference'`): `params` is the `nnx.State` of what the optimiser updates (every `nnx.Param` for
full fine-tuning; the `nnx.LoRAParam` adapters with LoRA), `opt_state` optax's state over it,
`frozen` a LoRA job's base weights, and `reference` a copy of the initial params when a fully
fine-tuned objective needs a reference model (gemma_jax.objectives.dpo). Both are carried through
the step unchanged and never checkpointed (a resumed job reads them from model.init again).
`plan_train_state` gives its shapes and shardings without allocating; `create_train_state` makes a fresh one directly in those shardings;
`resume_train_state` restores one from a checkpoint (gemma_jax.train_checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gemma_jax import objectives
from gemma_jax import optim
from gemma_jax import sharding
from gemma_jax.config import ModelConfig
from gemma_jax.initial_weights import initial_params
from gemma_jax.train_checkpoints import TrainCheckpoints
from gemma_jax.train_config import abstract_model, make_model
from gemma_jax.transformer import count_params

if TYPE_CHECKING:
  import ml_collections

State = dict[str, Any]


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int,
               frozen: nnx.State | None = None, reference: bool = False) -> State:
  """A fresh train state at step 0 around `params` (the trained ones) and `frozen` (a LoRA
  model's base weights, or None); with `reference`, also a frozen copy of `params` (the
  reference model of a fully fine-tuned preference objective, gemma_jax.objectives.dpo)."""
  state = {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': tx.init(params),
      'rng': jax.random.PRNGKey(seed),
  }
  if frozen is not None:
    state['frozen'] = frozen
  if reference:
    state['reference'] = jax.tree.map(jnp.copy, params)
  return state


def split_model(model: nnx.Module, lora: bool):
  """(graphdef, trained params, frozen params or None, rest): with LoRA the adapters are trained
  and the base weights frozen; otherwise every parameter is trained."""
  if lora:
    return nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, None, rest


def state_shardings(mesh: Mesh, abstract_state: State,
                    rules: sharding.ShardingRules | None = None) -> State:
  """NamedSharding of every leaf of the train state: params and their optimiser moments by their
  logical axes (FSDP / tensor parallel per the rules), step, rng and counters replicated."""
  return sharding.param_shardings(abstract_state, mesh, rules)


@dataclasses.dataclass(frozen=True)
class TrainStatePlan:
  """Everything a job knows about its train state before one is allocated."""

  graphdef: nnx.GraphDef  # the model's structure (LoRA adapters included)
  rest: nnx.State  # the model's non-parameter state (merged back in by the steps)
  tx: optax.GradientTransformation  # clipping + optimiser (gemma_jax.optim)
  schedule: optax.Schedule  # learning rate by step
  abstract: State  # the train state as jax.ShapeDtypeStructs
  shardings: State  # a NamedSharding per leaf of the train state
  lora: bool  # params are LoRA adapters and the state carries the 'frozen' base
  reference: bool  # the state carries a 'reference' copy of the initial params

  def describe_lora(self) -> str:
    """How many parameters train, against the frozen base (for the job's progress output)."""
    n, base = count_params(self.abstract['params']), count_params(self.abstract['frozen'])
    return f'{n:,} trained parameters ({100 * n / base:.2f}% of the {base:,} frozen base weights).'


def plan_train_state(mc: ModelConfig, config: ml_collections.ConfigDict, mesh: Mesh,
                     rules: sharding.ShardingRules | None = None) -> TrainStatePlan:
  """The job's train state as shapes and shardings, with its model structure and optimiser."""
  lora = bool(config.lora.rank)
  # Without LoRA, an objective's reference model is a frozen copy (with LoRA: adapters off).
  reference = objectives.from_config(config).needs_reference and not lora
  graphdef, params, frozen, rest = split_model(abstract_model(mc, config), lora)
  tx, schedule = optim.make_optimizer(config)
  abstract = jax.eval_shape(lambda p, f: init_state(p, tx, config.seed, f, reference), params,
                            frozen)
  return TrainStatePlan(graphdef, rest, tx, schedule, abstract,
                        state_shardings(mesh, abstract, rules), lora, reference)


def create_train_state(plan: TrainStatePlan, mc: ModelConfig,
                       config: ml_collections.ConfigDict) -> State:
  """A fresh train state, created in its shardings: the initial weights of model.init (see
  gemma_jax.initial_weights) and, with LoRA, fresh adapters (B = 0) over them as the trained
  params. No device ever holds more than its shards."""
  shardings = plan.shardings
  if plan.lora:
    frozen = initial_params(mc, config, shardings['frozen'])
    # Only the adapters leave the jitted function, so XLA drops the unused random base init.
    params = jax.jit(lambda: nnx.state(make_model(mc, config), nnx.LoRAParam),
                     out_shardings=shardings['params'])()
  else:
    params, frozen = initial_params(mc, config, shardings['params']), None
  return jax.jit(lambda p, f: init_state(p, plan.tx, config.seed, f, plan.reference),
                 out_shardings=shardings, donate_argnums=(0, 1))(params, frozen)


def resume_train_state(plan: TrainStatePlan, checkpoints: TrainCheckpoints, step: int,
                       mc: ModelConfig, config: ml_collections.ConfigDict) -> tuple[State, Any]:
  """(train state, data-iterator state) from the checkpoint at `step`, placed on the plan's
  shardings (whatever mesh saved it); a LoRA job's frozen base is read from model.init again."""
  state, data_state = checkpoints.restore(step, plan.abstract, plan.shardings)
  if plan.lora:
    state['frozen'] = initial_params(mc, config, plan.shardings['frozen'])
  if plan.reference:
    state['reference'] = initial_params(mc, config, plan.shardings['reference'])
  return state, data_state
