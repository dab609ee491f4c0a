"""The trainer: the jitted train and eval steps around an objective's loss, and the training loop.

`train_step(state, batch) -> (state, metrics)` is one pure function over the train state
(gemma_jax.train_state), jitted once with explicit shardings (from gemma_jax.sharding's rules
table) and the state donated; gradient accumulation happens inside it
(`distributed.accumulate_gradients`, a `lax.scan` over micro-batches), so k micro-batches are one
k-times larger batch. The steps enter their mesh and rules themselves while traced
(`sharding.tracing_under`), so they are correct whoever traces them.

`train(config, workdir)` runs the whole job as a short sequence of steps, each in the module that
owns it: the config (train_config), the objective with its loss and batches (objectives), the
model and tokenizer (initial_weights), the train state (train_state), checkpoints
(train_checkpoints; the final export: checkpoint), stopping on a signal (preemption), evaluation
(evaluate) and, for an objective that learns from its own samples (GRPO), the rollouts that make
its batches (rollouts). gemma_jax/train_config.py lists every config key.
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
from gemma_jax import objectives
from gemma_jax import preemption
from gemma_jax.preemption import Preempted  # raised by train(); trainer.Preempted
from gemma_jax import rollouts as rollouts_lib
from gemma_jax import sharding
from gemma_jax import train_config
from gemma_jax import train_state
from gemma_jax.objectives import sft
from gemma_jax.train_checkpoints import TrainCheckpoints
from gemma_jax.train_state import State, state_shardings

if TYPE_CHECKING:
  import ml_collections

Batch = Mapping[str, jax.Array]


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Loss and steps (pure functions of pytrees).


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, loss_chunk: int = 0, objective=None,
                 ) -> Callable[..., Any]:
  """`loss_fn(params, batch, count, frozen=None, reference=None) -> (loss_sum / count, aux)`.

  `objective` (gemma_jax.objectives; default SFT with `loss_chunk`, whose aux is the count of
  top-1 hits) gives the loss sum and its aux (the metrics' sums); `count` is its
  normaliser over the whole batch. `frozen`: the base weights of a LoRA model (`params` are then
  its adapters; see gemma_jax.lora), None otherwise. An objective that needs a reference model
  gets the initial weights: `reference` (a frozen copy of the full parameters) when given, else
  with LoRA the same model with its adapters set to zero (the frozen base).
  """
  objective = objective or sft.SFT(loss_chunk)

  def loss_fn(params, batch, count, frozen=None, reference=None):
    base = [] if frozen is None else [frozen]
    model = nnx.merge(graphdef, params, *base, rest)
    ref_model = None
    if objective.needs_reference:
      ref = reference if reference is not None else jax.tree.map(jnp.zeros_like, params)
      ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref), *base, rest)
    loss_sum, aux = objective.loss_sums(model, ref_model, batch)
    return loss_sum / count, aux

  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1, loss_chunk: int = 0,
                    objective=None, mesh: Mesh | None = None,
                    rules: sharding.ShardingRules | None = None,
                    ) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
  """The pure (unjitted) train step.

  The loss is the objective's (gemma_jax.objectives; default SFT with `loss_chunk`, the mean
  cross-entropy over all target tokens of the batch) summed over the batch and divided by its
  `count` of the whole batch. With `grad_accum_steps` = k the batch's rows are split into k
  micro-batches (see `distributed.accumulate_gradients`; no row moves between devices) whose
  gradients are summed: the result equals the gradient of the full batch up to float summation
  order. `mesh`/`rules` (None: the defaults) shard the accumulated gradients and the model's
  activations. A LoRA state's `frozen` base weights and a `reference` copy pass through unchanged.
  """
  objective = objective or sft.SFT(loss_chunk)
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, rest, objective=objective), has_aux=True)
  k = grad_accum_steps

  def train_step(state, batch):
    with sharding.tracing_under(mesh, rules):
      return _train_step(state, batch)

  def _train_step(state, batch):
    params, frozen, reference = state['params'], state.get('frozen'), state.get('reference')
    count = objective.count(batch)
    if k == 1:
      (loss, aux), grads = grad_fn(params, batch, count, frozen, reference)
    else:
      micro_grad_fn = lambda p, b: grad_fn(p, b, count, frozen, reference)
      (loss, aux), grads = distributed.accumulate_gradients(micro_grad_fn, params, batch, k,
                                                         mesh, rules)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_state = {
        'step': state['step'] + 1,
        'params': optax.apply_updates(params, updates),
        'opt_state': opt_state,
        'rng': jax.random.fold_in(state['rng'], state['step']),
    }
    for key in ('frozen', 'reference'):
      if key in state:
        new_state[key] = state[key]
    metrics = {
        'loss': loss,
        **objective.metrics(objective.named(aux), count),
        'grad_norm': grad_norm,
        'learning_rate': schedule(state['step']),
        objective.count_name: count,
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, loss_chunk: int = 0, *,
                   objective=None, mesh: Mesh | None = None,
                   rules: sharding.ShardingRules | None = None) -> Callable[..., dict[str, jax.Array]]:
  """`eval_step(params, batch, frozen=None, reference=None) -> {'loss_sum', 'count', **sums}`
  (sums over batches; the objective's `metrics` turns them into means); `mesh`/`rules` constrain
  the model's activations as in the train step."""
  objective = objective or sft.SFT(loss_chunk)
  loss_fn = make_loss_fn(graphdef, rest, objective=objective)

  def eval_step(params, batch, frozen=None, reference=None):
    with sharding.tracing_under(mesh, rules):
      loss_sum, aux = loss_fn(params, batch, 1.0, frozen, reference)
      return {'loss_sum': loss_sum, 'count': objective.count(batch), **objective.named(aux)}

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


def _check_finite(step: int, metrics: Mapping[str, float], checkpoints) -> None:
  if all(math.isfinite(metrics[k]) for k in ('loss', 'grad_norm')):
    return
  last = None
  if checkpoints is not None:
    checkpoints.wait()  # the save in flight is of an earlier, finite step
    last = checkpoints.latest()
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
  """Runs (or resumes) the job described by `config` in `workdir` (its objective: SFT, DPO,
  GRPO; see gemma_jax.objectives); returns final metrics.

  Returns {'train': last step's metrics, 'eval': last held-out metrics (and exact match before
  and after when configured), 'export_dir': the params-only checkpoint for sample.py}. SIGTERM
  and a first SIGINT stop it cleanly (gemma_jax.preemption): after the step they arrive in, a
  checkpoint at that step, then `Preempted`; during set-up, `Preempted` before the first step;
  during the final evaluation and export they are ignored and the job completes. Raises
  train_checkpoints.CheckpointError when checkpoints exist but none is intact, and
  train_checkpoints.CheckpointSaveError when a save fails.
  """
  with preemption.StopSignals() as signals:
    return _train(config, workdir, signals)


def _train(config: ml_collections.ConfigDict, workdir: str,
           signals: preemption.StopSignals) -> dict[str, Any]:
  train_config.validate_config(config)
  objective = objectives.from_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.ShardingRules.from_config(config.sharding_rules)
  checkpoints = TrainCheckpoints(workdir, config.keep_checkpoints, say=_say)
  resume_step = checkpoints.restorable_step()

  mc, tokenizer = initial_weights.model_and_tokenizer(config, workdir,
                                                      resume=resume_step is not None)
  plan = train_state.plan_train_state(mc, config, mesh, rules)
  train_iter = iter(_dataset(objective, config, tokenizer, 'train'))
  held_out = evaluate.exact_match_examples(config)
  graphdef, rest = plan.graphdef, plan.rest
  rollouts = None  # a sampling objective's batches (gemma_jax.rollouts)
  if objective.samples:
    logps = rollouts_lib.policy_logps_fn(objective, graphdef, rest, mesh, rules)
    # (`state`, below, is read when a rollout needs pi_old: the loop's current train state.)
    rollouts = rollouts_lib.Rollouts(objective, train_iter, tokenizer, seq_len=config.seq_len,
                                     seed=config.seed, policy_logps=lambda batch: logps(
                                         state['params'], state.get('frozen'), batch))
    rollouts.check_rewards(next(iter(_dataset(objective, config, tokenizer, 'train')))[0])
    train_iter = rollouts
  if held_out and jax.process_count() > 1:
    _say('Exact-match evaluation skipped: the Sampler runs in one process, and this job has '
         f'{jax.process_count()}. Sample from WORKDIR/final afterwards.')
    held_out = []

  if resume_step is None:
    state = train_state.create_train_state(plan, mc, config)
    _say(f'Starting at step 0 of {config.steps} in {workdir}.')
  else:
    state, data_state = train_state.resume_train_state(plan, checkpoints, resume_step, mc,
                                                       config)
    train_iter.set_state(data_state)
    _say(f'Resuming from the checkpoint at step {resume_step} in {workdir}.')
  if plan.lora:
    _say(f'LoRA rank {config.lora.rank}, alpha {config.lora.alpha:g}: {plan.describe_lora()}')

  step_fn = jit_train_step(
      make_train_step(graphdef, rest, plan.tx, plan.schedule, mesh=mesh, rules=rules,
                      grad_accum_steps=config.optimizer.grad_accum_steps, objective=objective),
      mesh, plan.abstract, rules)
  eval_fn = jax.jit(make_eval_step(graphdef, rest, objective=objective, mesh=mesh, rules=rules))
  start = int(jax.device_get(state['step']))
  writer = metrics_lib.MetricsWriter(workdir, config.steps, start,
                                     tokens_per_step=config.batch_size * config.seq_len *
                                     objective.rows_per_example,
                                     enabled=distributed.is_main_process())

  def model_of(state):
    return nnx.merge(graphdef, state['params'], *([state['frozen']] if plan.lora else []), rest)

  def next_batch(step: int):
    """(this step's batch, its host-side metrics): read, or sampled from the current weights."""
    if rollouts is None:
      return next(train_iter), {}
    return rollouts.batch(step, model_of(state))

  def run_eval(step: int) -> dict[str, float]:
    batches = iter(_dataset(objective, config, tokenizer, 'eval'))
    if objective.samples:
      result = rollouts_lib.held_out_rewards(
          model_of(state), tokenizer, itertools.islice(batches, config.eval_batches), objective,
          cache_length=config.seq_len + 1, seed=config.seed)
      if result:
        _say(writer.log_eval(step, result))
      return result
    result = evaluate.held_out_loss(eval_fn, state['params'],
                                    itertools.islice(batches, config.eval_batches), mesh, rules,
                                    state.get('frozen'), state.get('reference'),
                                    metrics=objective.metrics)
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
  if config.eval_every and objective.eval_before_training and start == 0:
    run_eval(0)

  # (step, device metrics, data fingerprint) of the previous step, read after the next dispatch
  pending = None
  last, last_eval = {}, {}
  t0 = time.time()

  def save(step: int, wait: bool = False) -> None:
    nonlocal last, pending
    # Never checkpoint a state whose step went non-finite: check it before saving.
    last = _read_metrics(writer, checkpoints, config, *pending)
    pending = None
    checkpoints.save(step, state, train_iter.get_state(), config.to_dict(), wait=wait)
    writer.mark_start(step)  # tokens/s and ETA count training steps only

  def stop(step: int, saved: bool = True):
    writer.close()
    return Preempted(step, signals.name or 'a signal to another process', checkpoints.directory,
                     saved)

  if signals.should_stop():  # while the job was being set up
    raise stop(start, saved=False)
  try:
    for step in range(start + 1, config.steps + 1):
      batch, host_metrics = next_batch(step)
      state, step_metrics = step_fn(state, distributed.put_batch(batch, mesh, rules))
      step_metrics = {**step_metrics, **host_metrics}
      if step == start + 1:
        jax.block_until_ready(step_metrics)
        _say(f'First step compiled and ran in {time.time() - t0:.1f}s.')
        writer.mark_start(step)
      if pending is not None:
        last = _read_metrics(writer, checkpoints, config, *pending)
      pending = (step, step_metrics, train_iter.fingerprint)
      if step % config.checkpoint_every == 0 or step == config.steps:
        save(step)
      if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
        last_eval = run_eval(step)
        writer.mark_start(step)
      # (Objectives that reuse a batch for several steps stop after its last.)
      if (step < config.steps and step % objective.batch_reuse == 0
          and signals.should_stop()):
        if pending is not None:
          save(step, wait=True)
        checkpoints.wait()
        raise stop(step)
    if pending is not None:
      last = _read_metrics(writer, checkpoints, config, *pending)
  finally:
    checkpoints.wait()
  if start < config.steps and signals.should_stop():  # during the last step, saved above
    raise stop(config.steps)
  # From here (held-out evaluation, export) a signal is only recorded: the job completes.
  stats = train_iter.stats
  _say(f'Data: {stats["examples"]} examples read, {stats["truncated"]} truncated and '
       f'{stats["dropped"]} dropped for exceeding seq_len={config.seq_len} '
       f'(data.truncate={config.data.truncate!r}).')

  if config.eval_every and objective.eval_before_training and last_eval:
    changes = [f'{k} {metrics_lib.read_metric(workdir, f"eval_{k}", step=0):.4f} -> {v:.4f}'
               for k, v in last_eval.items()]
    _say('Held-out before -> after training: ' + ', '.join(changes))
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
  checkpoints.close()
  _say(f'Done: final params for sample.py in {export_dir}')
  return {'train': last, 'eval': last_eval, 'export_dir': export_dir}


def _dataset(objective, config: ml_collections.ConfigDict, tokenizer, split: str):
  """The job's data pipeline for `split`; config errors found while opening it are ConfigErrors."""
  try:
    return objective.dataset(config, tokenizer, split)
  except ValueError as e:
    raise train_config.ConfigError(str(e)) from e


def _read_metrics(writer, checkpoints, config, step, device_metrics, fingerprint,
                  ) -> dict[str, float]:
  """Fetches one step's metrics, stops on NaN/inf, logs every `log_every` steps (with the
  CRC-32 of the step's global batch as `batch_crc32`, to tell which data a step saw)."""
  host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  host['batch_crc32'] = fingerprint
  _check_finite(step, host, checkpoints)
  if step % config.log_every == 0 or step == 1 or step == config.steps:
    _say(writer.log_train(step, host))
  return host
