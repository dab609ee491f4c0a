"""Optimisers and learning-rate schedules for the trainer, built from the `optimizer` config group.

`make_optimizer(config)` returns `(optax.GradientTransformation, schedule)`; the transformation
clips by global norm and then applies AdamW or Adafactor with warmup + cosine/linear/constant decay.
Gradient accumulation is not done here: the trainer sums the micro-batch gradients, each normalised
by the whole batch's target count, inside its one jitted step (`distributed.accumulate_gradients`),
so the optimiser always sees the gradient of the whole batch.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

import jax
import optax

from gemma_jax.layers import param_name

if TYPE_CHECKING:
  import ml_collections

OPTIMIZERS = ('adamw', 'adafactor')
DECAYS = ('cosine', 'linear', 'constant')


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `optimizer.warmup_steps` (at most `steps`),
  then the decay.

  `optimizer.decay`: 'cosine' or 'linear' to `learning_rate * optimizer.min_lr_ratio` at `steps`,
  or 'constant'.
  """
  opt = config.optimizer
  peak, steps, warmup = float(config.learning_rate), int(config.steps), int(opt.warmup_steps)
  end = peak * float(opt.min_lr_ratio)
  if opt.decay not in DECAYS:
    raise ValueError(f'config.optimizer.decay={opt.decay!r}; expected one of {DECAYS}.')
  if warmup < 0:
    raise ValueError(f'config.optimizer.warmup_steps={warmup} must be >= 0.')
  warmup = min(warmup, steps)  # a shipped config shortened for a smoke run (the job warns once)
  decay_steps = max(steps - warmup, 1)
  if opt.decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif opt.decay == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask_fn(exclude: str) -> Callable[[Any], Any]:
  """A mask function for optax: True where weight decay applies.

  `exclude` is a regular expression searched in each parameter's dotted name
  ('layers.0.pre_ffw_norm.scale', the names `lora.targets` and checkpoints use); matching
  parameters get no weight decay. '' decays everything. A '/' (the slash paths of earlier
  versions) is refused with the dotted spelling to use instead.
  """
  if '/' in exclude:
    raise ValueError(f'config.optimizer.weight_decay_exclude={exclude!r}: parameter names are '
                     "dotted ('layers.0.pre_ffw_norm.scale'), not slash paths; write "
                     f"{exclude.replace('/', '[.]')!r} instead.")
  try:
    pattern = re.compile(exclude) if exclude else None
  except re.error as e:
    raise ValueError(f'config.optimizer.weight_decay_exclude={exclude!r} is not a regex: {e}') from e

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not (pattern and pattern.search(param_name(p))), params)

  return mask


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping (`optimizer.clip_norm`, 0 = off) followed by AdamW or Adafactor."""
  opt = config.optimizer
  schedule = make_schedule(config)
  mask = decay_mask_fn(opt.weight_decay_exclude)
  if opt.name == 'adamw':
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=mask)
  elif opt.name == 'adafactor':
    # Factored second moments (the memory saver) with Adafactor's own decay schedule (b2 and eps
    # are AdamW's); `b1` > 0 adds first-moment momentum. Clipping is global (below), so
    # Adafactor's per-update clipping is off.
    core = optax.adafactor(schedule, momentum=opt.b1 or None,
                           multiply_by_parameter_scale=False, clipping_threshold=None,
                           weight_decay_rate=opt.weight_decay or None, weight_decay_mask=mask)
  else:
    raise ValueError(f'config.optimizer.name={opt.name!r}; expected one of {OPTIMIZERS}.')
  if opt.clip_norm < 0:
    raise ValueError(f'config.optimizer.clip_norm={opt.clip_norm} must be >= 0 (0 = no clipping).')
  if opt.clip_norm:
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), core), schedule
  return core, schedule
