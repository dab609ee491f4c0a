"""SFT trainer: the loss, the jitted train and eval steps, and the training loop.

`train_step(state, batch) -> (state, metrics)` is one pure function over the train state
(gemma_jax.train_state), jitted once with explicit shardings (from gemma_jax.sharding's rules
table) and the state donated; gradient accumulation happens inside it
(`distributed.accumulate_gradients`, a `lax.scan` over micro-batches), so k micro-batches are one
k-times larger batch. The steps enter their mesh and rules themselves while traced
(`sharding.tracing_under`), so they are correct whoever traces them.

`train(config, workdir)` runs the whole job as a short sequence of steps, each in the module that
owns it: the config (train_config), the model and tokenizer (initial_weights), the train state
(train_state), the data (data), checkpoints (checkpoint) and evaluation (evaluate).
gemma_jax/train_config.py lists every config key.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_jax import checkpoint
from gemma_jax import distributed
from gemma_jax import evaluate
from gemma_jax import initial_weights
from gemma_jax import metrics as metrics_lib
from gemma_jax import sharding
from gemma_jax import train_config
from gemma_jax import train_state
from gemma_jax.layers import weight
from gemma_jax.loss import head_loss_sums, token_loss_sums
from gemma_jax.train_state import State, state_shardings

if TYPE_CHECKING:
  import ml_collections

Batch = Mapping[str, jax.Array]


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Loss and steps (pure functions of pytrees).


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, loss_chunk: int = 0,
                 ) -> Callable[..., Any]:
  """`loss_fn(params, batch, num_targets, frozen=None) -> (loss_sum / num_targets, correct_sum)`.

  `frozen`: the base weights of a LoRA model (`params` are then its adapters; see
  gemma_jax.lora), None otherwise. `loss_chunk` > 0 fuses the output head into the loss, that
  many tokens at a time (gemma_jax.loss.head_loss_sums): the [B, T, V] logits are never made whole.
  """

  def loss_fn(params, batch, num_targets, frozen=None):
    model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]), rest)
    out, _ = model(batch['tokens'], positions=batch['positions'],
                   segment_ids=batch['segment_ids'], return_hidden=loss_chunk > 0)
    if loss_chunk > 0:
      table_VD = weight(model.embedder, 'input_embedding', model.dtype)
      loss_sum, correct_sum = head_loss_sums(out, table_VD, batch['targets'], batch['loss_mask'],
                                             chunk=loss_chunk,
                                             cap=model.config.final_logit_soft_cap)
    else:
      loss_sum, correct_sum = token_loss_sums(out, batch['targets'], batch['loss_mask'])
    return loss_sum / num_targets, correct_sum

  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1, loss_chunk: int = 0,
                    mesh: Mesh | None = None, rules: sharding.ShardingRules | None = None,
                    ) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
  """The pure (unjitted) train step.

  The loss is the mean cross-entropy over all target tokens of the batch (`loss_mask` == 1). With
  `grad_accum_steps` = k the batch's rows are split into k micro-batches (see
  `distributed.accumulate_gradients`; no row moves between devices) whose gradients are summed,
  each normalised by the whole batch's target count: the result equals the gradient of the full
  batch up to float summation order. `mesh`/`rules` (None: the defaults) shard the accumulated
  gradients and the model's activations.
  `loss_chunk`: see `make_loss_fn`. A LoRA state's `frozen` base weights pass through unchanged.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, rest, loss_chunk), has_aux=True)
  k = grad_accum_steps

  def train_step(state, batch):
    with sharding.tracing_under(mesh, rules):
      return _train_step(state, batch)

  def _train_step(state, batch):
    params, frozen = state['params'], state.get('frozen')
    num_targets = jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)
    if k == 1:
      (loss, correct), grads = grad_fn(params, batch, num_targets, frozen)
    else:
      micro_grad_fn = lambda p, b: grad_fn(p, b, num_targets, frozen)
      (loss, correct), grads = distributed.accumulate_gradients(micro_grad_fn, params, batch, k,
                                                             mesh, rules)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_state = {
        'step': state['step'] + 1,
        'params': optax.apply_updates(params, updates),
        'opt_state': opt_state,
        'rng': jax.random.fold_in(state['rng'], state['step']),
    }
    if frozen is not None:
      new_state['frozen'] = frozen
    metrics = {
        'loss': loss,
        'accuracy': correct / num_targets,
        'grad_norm': grad_norm,
        'learning_rate': schedule(state['step']),
        'target_tokens': num_targets,
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, loss_chunk: int = 0, *,
                   mesh: Mesh | None = None, rules: sharding.ShardingRules | None = None,
                   ) -> Callable[..., dict[str, jax.Array]]:
  """`eval_step(params, batch, frozen=None) -> {'loss_sum', 'correct_sum', 'count'}` (sum over
  batches); `mesh`/`rules` constrain the model's activations as in the train step."""
  loss_fn = make_loss_fn(graphdef, rest, loss_chunk)

  def eval_step(params, batch, frozen=None):
    with sharding.tracing_under(mesh, rules):
      loss_sum, correct_sum = loss_fn(params, batch, 1.0, frozen)
    return {'loss_sum': loss_sum, 'correct_sum': correct_sum,
            'count': jnp.sum(batch['loss_mask'].astype(jnp.float32))}

  return eval_step


def jit_train_step(train_step, mesh: Mesh, abstract_state: State,
                   rules: sharding.ShardingRules | None = None):
  """jax.jit with explicit in/out shardings (the state's by the rules) and the state donated."""
  s_shard = state_shardings(mesh, abstract_state, rules)
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(s_shard, distributed.batch_sharding(mesh, rules)),
                 out_shardings=(s_shard, replicated), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# The loop.


def _check_finite(step: int, metrics: Mapping[str, float], manager) -> None:
  if all(math.isfinite(metrics[k]) for k in ('loss', 'grad_norm')):
    return
  last = manager.latest_step() if manager is not None else None
  raise NonFiniteLossError(
      f'Non-finite training at step {step}: loss={metrics["loss"]}, '
      f'grad_norm={metrics["grad_norm"]}. Stopping; the last good checkpoint '
      f'({"step " + str(last) if last is not None else "none saved"}) is kept. Try a lower '
      f'learning_rate, optimizer.clip_norm, a longer optimizer.warmup_steps, or float32 compute.')


def _say(text: str) -> None:
  """Progress output, from the main process only."""
  if distributed.is_main_process():
    print(text, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the SFT job described by `config` in `workdir`; returns final metrics.

  Returns {'train': last step's metrics, 'eval': last held-out metrics (and exact match before
  and after when configured), 'export_dir': the params-only checkpoint for sample.py}.
  """
  train_config.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.ShardingRules.from_config(config.sharding_rules)
  manager = checkpoint.checkpoint_manager(workdir, config.keep_checkpoints)
  resume_step = manager.latest_step()

  mc, tokenizer = initial_weights.model_and_tokenizer(config, workdir,
                                                      resume=resume_step is not None)
  plan = train_state.plan_train_state(mc, config, mesh, rules)
  train_iter = iter(_dataset(config, tokenizer, 'train'))
  held_out = evaluate.exact_match_examples(config)
  if held_out and jax.process_count() > 1:
    _say('Exact-match evaluation skipped: the Sampler runs in one process, and this job has '
         f'{jax.process_count()}. Sample from WORKDIR/final afterwards.')
    held_out = []

  if resume_step is None:
    state = train_state.create_train_state(plan, mc, config)
    _say(f'Starting at step 0 of {config.steps} in {workdir}.')
  else:
    state, data_state = train_state.resume_train_state(plan, manager, resume_step, mc, config)
    train_iter.set_state(data_state)
    _say(f'Resuming from the checkpoint at step {resume_step} in {workdir}.')
  if plan.lora:
    _say(f'LoRA rank {config.lora.rank}, alpha {config.lora.alpha:g}: {plan.describe_lora()}')

  graphdef, rest = plan.graphdef, plan.rest
  step_fn = jit_train_step(
      make_train_step(graphdef, rest, plan.tx, plan.schedule, mesh=mesh, rules=rules,
                      grad_accum_steps=config.optimizer.grad_accum_steps,
                      loss_chunk=config.loss_chunk),
      mesh, plan.abstract, rules)
  eval_fn = jax.jit(make_eval_step(graphdef, rest, config.loss_chunk, mesh=mesh, rules=rules))
  start = int(jax.device_get(state['step']))
  writer = metrics_lib.MetricsWriter(workdir, config.steps, start,
                                     tokens_per_step=config.batch_size * config.seq_len,
                                     enabled=distributed.is_main_process())

  def model_of(state):
    return nnx.merge(graphdef, state['params'], *([state['frozen']] if plan.lora else []), rest)

  def run_eval(step: int) -> dict[str, float]:
    batches = iter(_dataset(config, tokenizer, 'eval'))
    result = evaluate.held_out_loss(eval_fn, state['params'],
                                    itertools.islice(batches, config.eval_batches), mesh, rules,
                                    state.get('frozen'))
    if result:
      _say(writer.log_eval(step, result))
    return result

  def run_exact_match(step: int, label: str) -> float:
    result = evaluate.exact_match_eval(model_of(state), tokenizer, held_out,
                                       config.exact_match.max_new_tokens)
    writer.log_eval(step, {'exact_match': result['exact_match']})
    _say(f'Exact match on {len(held_out)} held-out examples {label}: '
         f'{100 * result["exact_match"]:.1f}%')
    for prompt, prediction, reference in result['samples'][:3]:
      _say(f'  {prompt!r} -> {prediction!r} (reference {reference!r})')
    return result['exact_match']

  if held_out and start == 0:
    run_exact_match(0, 'before training')

  pending = None  # (step, device metrics) of the previous step, read after the next dispatch
  last, last_eval = {}, {}
  t0 = time.time()
  try:
    for step in range(start + 1, config.steps + 1):
      state, step_metrics = step_fn(state, distributed.put_batch(next(train_iter), mesh, rules))
      if step == start + 1:
        jax.block_until_ready(step_metrics)
        _say(f'First step compiled and ran in {time.time() - t0:.1f}s.')
        writer.mark_start(step)
      if pending is not None:
        last = _read_metrics(writer, manager, config, *pending)
      pending = (step, step_metrics)
      if step % config.checkpoint_every == 0 or step == config.steps:
        # Never checkpoint a state whose step went non-finite: check it before saving.
        last = _read_metrics(writer, manager, config, *pending)
        pending = None
        checkpoint.save_train_state(manager, step, state, train_iter.get_state(),
                                    config.to_dict())
        writer.mark_start(step)  # tokens/s and ETA count training steps only
      if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
        last_eval = run_eval(step)
        writer.mark_start(step)
    if pending is not None:
      last = _read_metrics(writer, manager, config, *pending)
  finally:
    manager.wait_until_finished()
  stats = train_iter.stats
  _say(f'Data: {stats["examples"]} examples read, {stats["truncated"]} truncated and '
       f'{stats["dropped"]} dropped for exceeding seq_len={config.seq_len} '
       f'(data.truncate={config.data.truncate!r}).')

  if held_out:
    before = metrics_lib.read_metric(workdir, 'eval_exact_match', step=0)
    after = run_exact_match(config.steps, 'after training')
    last_eval['exact_match_before'], last_eval['exact_match'] = before, after
    _say(f'Exact match before -> after training: {100 * before:.1f}% -> {100 * after:.1f}%')
  writer.close()
  if distributed.is_main_process():
    metrics_lib.plot_loss_curve(workdir)
  requantize = (config.model.quantize, train_config.quant_group_size(config))
  export_dir = checkpoint.export_params(model_of(state), workdir, tokenizer,
                                        quantize=requantize if config.model.export_quantized
                                        and config.model.quantize else None)
  manager.close()
  _say(f'Done: final params for sample.py in {export_dir}')
  return {'train': last, 'eval': last_eval, 'export_dir': export_dir}


def _dataset(config: ml_collections.ConfigDict, tokenizer, split: str):
  """The job's data pipeline for `split`; config errors found while opening it are ConfigErrors."""
  # Imported here: the steps above need no input pipeline (grain), e.g. in bench/train_bench.py.
  from gemma_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    return data_lib.job_dataset(config, tokenizer, split=split)
  except ValueError as e:
    raise train_config.ConfigError(str(e)) from e


def _read_metrics(writer, manager, config, step, device_metrics) -> dict[str, float]:
  """Fetches one step's metrics, stops on NaN/inf, logs every `log_every` steps."""
  host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  _check_finite(step, host, manager)
  if step % config.log_every == 0 or step == 1 or step == config.steps:
    _say(writer.log_train(step, host))
  return host
