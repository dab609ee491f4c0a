"""The training job's config schema: every key with its default, and the checks run before any work.

Config reference (every key; configs/*.py start from `base_config()` and override):
  steps, batch_size (global, per optimizer step), seq_len, learning_rate (peak), seed,
  log_every, eval_every (0 = no eval), eval_batches (held-out batches per eval),
  checkpoint_every, keep_checkpoints (the newest intact train-state checkpoints kept).
  objective           'sft' (supervised fine-tuning) | 'dpo' (preference pairs, config.dpo.*) |
                      'grpo' (RL with verifiable rewards: prompts, sampled completions, reward
                      functions, config.grpo.*; gemma_jax.rollouts); gemma_jax.objectives. For
                      'dpo' batch_size counts pairs, for 'grpo' prompts (each sampled
                      grpo.num_generations = G >= 2 times)
  dpo.loss            'sigmoid' (DPO) | 'ipo' | 'simpo' (reference-free); dpo.beta (> 0),
                      dpo.label_smoothing (conservative DPO / SimPO, in [0, 0.5)),
                      dpo.simpo_gamma (SimPO's target margin)
  grpo.loss_type      'grpo' | 'dr_grpo' | 'dapo' (TRL's default): how per-token losses add up;
                      grpo.beta (KL to the initial weights, 0 = none), grpo.epsilon and
                      grpo.epsilon_high (-1 = epsilon; the clip range), grpo.num_iterations (steps
                      per batch of rollouts; divides steps and checkpoint_every),
                      grpo.temperature (> 0), grpo.top_k, grpo.top_p, grpo.max_completion_length
                      (tokens; prompt + completion must fit seq_len + 1), grpo.scale_rewards
                      'group' | 'batch' | 'none', grpo.rewards (names: gemma_jax.rewards'
                      built-ins or 'module:function'), grpo.reward_weights (one per reward),
                      grpo.format_pattern (the 'format' reward's regex), grpo.raw_prompt
                      (True: a record's 'prompt' is plain text after BOS, no chat turns: for base
                      models and few-shot prompts), grpo.stop_strings (completions also end at
                      these, e.g. ('\\n',); always at <end_of_turn> and <eos>)
  loss_chunk          0 = the loss reads whole [B, T, V] logits; n > 0 = the output head is fused
                      into the loss, n tokens at a time (gemma_jax.loss: saves the logits' memory;
                      objective 'sft' only)
  model.preset        a name from gemma_jax.config.PRESETS
  model.vocab_size    0 = the preset's; else override it (a model for a small tokenizer)
  model.init          'none' (random, seed) | 'native' (save_params dir) | 'hf' (save_pretrained
                      dir) | 'gguf' (.gguf file, or 'package': the bundled Gemma 3 270M) |
                      'official' (Kaggle Orbax checkpoint dir)
  model.init_path     where the initial weights are
  model.tokenizer     a SentencePiece .model; '' = the one that comes with the initial weights
  model.dtype         compute dtype 'float32' | 'bfloat16'; model.param_dtype: master weights
  model.remat         'none' | 'dots' | 'full' (what a block keeps for the backward pass)
  model.attention     kernel of uncached forwards: 'auto' | 'xla' | 'cudnn' (gemma_jax.attention;
                      the environment variable GEMMA_JAX_ATTENTION overrides it)
  model.quantize      '' | 'int8' | 'int4': hold the base weights quantized (gemma_jax.quant) and
                      train LoRA adapters over them (QLoRA; needs lora.rank > 0)
  model.quant_group_size   -1 = the default of gemma_jax.quant (groups of 32);
                      0 = per output channel; g = groups of g along the contraction axis
  model.export_quantized   False: WORKDIR/final is the merged float model; True: the merged
                      model quantized again with model.quantize
  data.*              DATA_DEFAULTS below (gemma_jax.data_sources)
  optimizer.*         gemma_jax.optim: name adamw|adafactor, b1, b2, eps, weight_decay,
                      weight_decay_exclude (regex on dotted param names), warmup_steps (a warmup
                      longer than `steps` is shortened to `steps`, with a warning),
                      decay cosine|linear|constant, min_lr_ratio, clip_norm (0 = off),
                      grad_accum_steps (micro-batches per step; divides batch_size)
  mesh.data, mesh.fsdp, mesh.tensor   device-mesh axis sizes; one may be -1 (fills)
  sharding_rules.*    logical axis -> mesh axes (gemma_jax.sharding.ShardingRules), e.g.
                      --config.sharding_rules.embed=fsdp,tensor
  lora.rank           0 = full fine-tuning; r > 0 = train rank-r adapters (gemma_jax.lora) on
                      the weights lora.targets picks (a regex on dotted names such as
                      'layers.0.attn.q_einsum.w', 'layers.0.mlp.linear'; default all projections)
                      with scale lora.alpha / r, the base frozen; the export merges them
  exact_match.examples, exact_match.max_new_tokens   held-out examples answered greedily and
                      scored by exact match before and after training (0 = off; JSONL data only)
"""

from __future__ import annotations

import copy
import math
import re
import sys
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax import config as config_lib
from gemma_jax import lora as lora_lib
from gemma_jax import objectives
from gemma_jax import optim
from gemma_jax import quant
from gemma_jax import sharding
from gemma_jax.attention import ATTENTION_IMPLS
from gemma_jax.objectives import dpo, grpo
from gemma_jax.transformer import REMAT_POLICIES, Transformer

if TYPE_CHECKING:
  import ml_collections

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# The data group (read by gemma_jax.data_sources, which takes it as its DEFAULT_CONFIG).
DATA_DEFAULTS = {
    'source': 'jsonl',            # 'jsonl' | 'tfds'
    'path': '',                   # jsonl: training file
    'eval_path': '',              # jsonl: held-out file ('' = none)
    'name': '',                   # tfds: dataset name, e.g. 'my_sft' or 'my_sft:1.0.0'
    'data_dir': '',               # tfds: data_dir ('' = TFDS default)
    'train_split': 'train',       # tfds: training split
    'eval_split': '',             # tfds: held-out split ('' = none)
    'messages_field': 'messages',  # field holding a list of {'role', 'content'} turns
    'prompt_field': 'prompt',     # fields used when a record has no messages_field
    'response_field': 'response',
    'chosen_field': 'chosen',     # preference pairs (objective 'dpo'): the two replies
    'rejected_field': 'rejected',
    'packing': True,              # first-fit pack examples into rows
    'truncate': 'truncate',       # 'truncate' (keep the start) | 'drop' examples over seq_len
}
INITS = ('none', 'native', 'hf', 'gguf', 'official')


class ConfigError(ValueError):
  """A config that cannot run (unknown key, bad value, tokenizer/model mismatch); names the key."""


def defaults() -> dict[str, Any]:
  """Every config key with its default, as plain nested dicts (see the module docstring)."""
  return {
      'steps': 1000, 'batch_size': 8, 'seq_len': 512, 'learning_rate': 1e-4, 'seed': 0,
      'log_every': 10, 'eval_every': 200, 'eval_batches': 20, 'checkpoint_every': 200,
      'keep_checkpoints': 3, 'loss_chunk': 0, 'objective': 'sft',
      'dpo': dict(loss='sigmoid', beta=0.1, label_smoothing=0.0, simpo_gamma=0.5),
      'grpo': dict(loss_type='dapo', beta=0.0, epsilon=0.2, epsilon_high=-1.0,
                   num_generations=8, num_iterations=1, temperature=1.0, top_k=0, top_p=1.0,
                   max_completion_length=64, scale_rewards='group', rewards=('exact_match',),
                   reward_weights=(1.0,), format_pattern='', raw_prompt=False,
                   stop_strings=()),
      'model': dict(preset='tiny-gemma3', vocab_size=0, init='none', init_path='', tokenizer='',
                    dtype='float32', param_dtype='float32', remat='none', attention='auto',
                    quantize='', quant_group_size=-1, export_quantized=False),
      'data': copy.deepcopy(DATA_DEFAULTS),
      'optimizer': dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                        weight_decay_exclude='norm', warmup_steps=0, decay='cosine',
                        min_lr_ratio=0.1, clip_norm=1.0, grad_accum_steps=1),
      'mesh': dict(data=1, fsdp=-1, tensor=1),
      'sharding_rules': sharding.ShardingRules().to_config(),
      'lora': dict(rank=0, alpha=16.0, targets=lora_lib.DEFAULT_TARGETS),
      'exact_match': dict(examples=0, max_new_tokens=32),
  }


def base_config() -> ml_collections.ConfigDict:
  """`defaults()` as the ml_collections.ConfigDict that configs/*.py start from and override."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(defaults())


def plain_config(**overrides: Any) -> types.SimpleNamespace:
  """`defaults()` with dotted-key overrides ({'model.dtype': 'bfloat16'}) as nested
  SimpleNamespaces: a job config for code that runs without ml_collections (the benches)."""
  d = defaults()
  for key, value in overrides.items():
    *groups, name = key.split('.')
    node = d
    for g in groups:
      node = node[g]
    if name not in node:
      raise KeyError(f'plain_config: unknown config key {key!r}.')
    node[name] = value
  as_ns = lambda x: types.SimpleNamespace(**{k: as_ns(v) for k, v in x.items()}) if isinstance(
      x, dict) else x
  return as_ns(d)


def _keys(d: Any, prefix: str = '') -> set[str]:
  out = set()
  for k, v in d.items():
    out.add(prefix + k)
    if isinstance(v, Mapping) or hasattr(v, 'to_dict'):
      out |= _keys(v, f'{prefix}{k}.')
  return out


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key for unknown keys and values the trainer cannot run."""
  known = _keys(base_config())
  unknown = sorted(_keys(config) - known)
  if unknown:
    raise ConfigError(f'Unknown config key(s) {unknown}; known keys are listed in '
                      'gemma_jax/train_config.py (base_config).')
  missing = sorted(k for k in known - _keys(config) if '.' not in k or k.split('.')[0] != 'data')
  if missing:
    raise ConfigError(f'Config is missing key(s) {missing}; start configs from '
                      'gemma_jax.train_config.base_config().')
  c = config
  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'checkpoint_every',
              'keep_checkpoints', 'optimizer.grad_accum_steps'):
    value = c[key] if '.' not in key else c[key.split('.')[0]][key.split('.')[1]]
    if int(value) < 1:
      raise ConfigError(f'config.{key}={value} must be >= 1.')
  if not (isinstance(c.learning_rate, (int, float)) and math.isfinite(c.learning_rate)
          and c.learning_rate > 0):
    raise ConfigError(f'config.learning_rate={c.learning_rate} must be a finite number > 0.')
  if c.loss_chunk < 0:
    raise ConfigError(f'config.loss_chunk={c.loss_chunk} must be >= 0 (0 = unfused loss).')
  if c.eval_every < 0 or c.eval_batches < 1:
    raise ConfigError(f'config.eval_every={c.eval_every} must be >= 0 and config.eval_batches='
                      f'{c.eval_batches} >= 1.')
  _check_objective(c)
  if c.batch_size % c.optimizer.grad_accum_steps:
    raise ConfigError(f'config.batch_size={c.batch_size} is not a multiple of '
                      f'config.optimizer.grad_accum_steps={c.optimizer.grad_accum_steps}.')
  from gemma_jax import data_sources  # pylint: disable=g-import-not-at-top (imports this module)
  try:
    config_lib.get_preset(c.model.preset)
    data_sources.resolve_config(c.data)
    optim.make_optimizer(c)
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(c.mesh, jax.device_count())))
    rules = sharding.ShardingRules.from_config(c.sharding_rules)
  except ValueError as e:
    raise ConfigError(f'config: {e}') from None
  _check_batch_fits(c, mesh, rules)
  for key in ('dtype', 'param_dtype'):
    if c.model[key] not in DTYPES:
      raise ConfigError(f'config.model.{key}={c.model[key]!r}; expected one of {list(DTYPES)}.')
  for key, allowed in (('remat', list(REMAT_POLICIES)), ('attention', ATTENTION_IMPLS),
                       ('init', INITS)):
    if c.model[key] not in allowed:
      raise ConfigError(f'config.model.{key}={c.model[key]!r}; expected one of {allowed}.')
  if c.model.init != 'none' and not c.model.init_path:
    raise ConfigError(f'config.model.init={c.model.init!r} needs config.model.init_path.')
  if c.lora.rank < 0:
    raise ConfigError(f'config.lora.rank={c.lora.rank} must be >= 0 (0 = full fine-tuning).')
  if c.model.quantize:
    if c.model.quantize not in quant.MODES:
      raise ConfigError(f'config.model.quantize={c.model.quantize!r}; expected \'\' or one of '
                        f'{list(quant.MODES)}.')
    if not c.lora.rank:
      raise ConfigError(f'config.model.quantize={c.model.quantize!r} freezes the base weights '
                        'in low bits: only LoRA adapters can train over them (QLoRA). Set '
                        'config.lora.rank > 0, or config.model.quantize=\'\' to train every weight.')
    try:
      quant.spec(c.model.quantize, quant_group_size(c))
      nnx.eval_shape(lambda: quant.quantize(Transformer(model_config(c), rngs=nnx.Rngs(0)),
                                            c.model.quantize, quant_group_size(c)))
    except ValueError as e:
      raise ConfigError(f'config.model.quant_group_size={c.model.quant_group_size}: {e}') from None
  if c.lora.rank:
    try:
      abstract_model(model_config(c), c)  # shapes only: checks lora.targets against the model
    except (re.error, ValueError) as e:
      raise ConfigError(f'config.lora.targets={c.lora.targets!r}: {e}') from None
  if c.optimizer.warmup_steps > c.steps:
    print(f'Warning: config.optimizer.warmup_steps={c.optimizer.warmup_steps} exceeds '
          f'steps={c.steps}; warming up over all {c.steps} steps instead.', file=sys.stderr,
          flush=True)


def _check_objective(c: ml_collections.ConfigDict) -> None:
  if c.objective not in objectives.OBJECTIVES:
    raise ConfigError(f'config.objective={c.objective!r}; expected one of '
                      f'{sorted(objectives.OBJECTIVES)}.')
  if c.objective == 'sft':
    return
  if c.loss_chunk:
    raise ConfigError(f'config.loss_chunk={c.loss_chunk} fuses the output head into the SFT '
                      f'loss only; set it to 0 for objective {c.objective!r}.')
  if c.objective == 'dpo':
    if c.dpo.loss not in dpo.LOSSES:
      raise ConfigError(f'config.dpo.loss={c.dpo.loss!r}; expected one of {list(dpo.LOSSES)}.')
    if not c.dpo.beta > 0:
      raise ConfigError(f'config.dpo.beta={c.dpo.beta} must be > 0.')
    if not 0 <= c.dpo.label_smoothing < 0.5:
      raise ConfigError(f'config.dpo.label_smoothing={c.dpo.label_smoothing} must be in [0, 0.5).')
  if c.objective == 'grpo':
    _check_grpo(c)


def _check_grpo(c: ml_collections.ConfigDict) -> None:
  from gemma_jax import rollouts  # pylint: disable=g-import-not-at-top (imports the sampler)
  g = c.grpo
  choices = (('loss_type', grpo.LOSS_TYPES), ('scale_rewards', grpo.SCALE_REWARDS))
  for key, allowed in choices:
    if g[key] not in allowed:
      raise ConfigError(f'config.grpo.{key}={g[key]!r}; expected one of {list(allowed)}.')
  checks = (
      ('num_generations', g.num_generations >= 2, 'must be >= 2: advantages compare '
       'completions of one prompt'),
      ('num_iterations', g.num_iterations >= 1, 'must be >= 1'),
      ('beta', math.isfinite(g.beta) and g.beta >= 0, 'must be a finite number >= 0'),
      ('epsilon', 0 < g.epsilon < 1, 'must be in (0, 1)'),
      ('epsilon_high', g.epsilon_high == -1 or g.epsilon_high > 0, 'must be > 0 (or -1)'),
      ('temperature', math.isfinite(g.temperature) and g.temperature > 0, 'must be > 0'),
      ('top_k', g.top_k >= 0, 'must be >= 0'),
      ('top_p', 0 < g.top_p <= 1, 'must be in (0, 1]'),
      ('max_completion_length', 1 <= g.max_completion_length < c.seq_len,
       f'must be >= 1 and leave room for a prompt in seq_len + 1 = {c.seq_len + 1} tokens'),
      ('reward_weights', len(g.reward_weights) == len(g.rewards) and len(g.rewards) > 0,
       f'needs one weight per reward (grpo.rewards={list(g.rewards)})'),
      ('stop_strings', all(isinstance(s, str) and s for s in g.stop_strings),
       'must be non-empty strings'))
  for key, ok, text in checks:
    if not ok:
      raise ConfigError(f'config.grpo.{key}={g[key]!r} {text}.')
  for key in ('steps', 'checkpoint_every'):
    if c[key] % g.num_iterations:
      raise ConfigError(f'config.{key}={c[key]} must be a multiple of config.grpo.num_iterations='
                        f'{g.num_iterations} (checkpoints fall between two batches of rollouts).')
  if c.exact_match.examples:
    raise ConfigError("config.exact_match.examples is for 'sft' and 'dpo'; objective 'grpo' "
                      'reports the held-out reward (eval_every) instead: set it to 0.')
  if jax.process_count() > 1:
    raise ConfigError(f"objective 'grpo' samples in one process; this job has "
                      f'{jax.process_count()} processes.')
  max_seq_len = model_config(c).max_seq_len
  if c.seq_len + 1 > max_seq_len:
    raise ConfigError(f'config.seq_len={c.seq_len}: rollouts need a cache of seq_len + 1 tokens, '
                      f'more than the model\'s max_seq_len={max_seq_len}.')
  try:
    rollouts.reward_functions(grpo.from_config(c))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_batch_fits(c: ml_collections.ConfigDict, mesh: dict[str, int],
                      rules: sharding.ShardingRules) -> None:
  """The global batch must split evenly over the processes and the mesh axes that shard it; a
  resumed job on another slice keeps its batch_size, so this is where a mismatch is caught."""
  n = jax.process_count()
  rows = c.batch_size * (c.grpo.num_generations if c.objective == 'grpo' else 1)
  if c.batch_size % n:
    raise ConfigError(f'config.batch_size={c.batch_size} does not split evenly over the {n} '
                      'processes of this job; keep the global batch size by running on a process '
                      'count that divides it.')
  axes = [a for a in rules.batch if mesh.get(a, 1) > 1]
  shards = math.prod(mesh[a] for a in axes)
  if rows % shards:
    in_rows = f' ({rows} rows)' if rows != c.batch_size else ''
    raise ConfigError(f'config.batch_size={c.batch_size}{in_rows} does not split evenly over the '
                      f'{shards} batch shards of the mesh '
                      f'({" x ".join(f"{a}={mesh[a]}" for a in axes)}, {jax.device_count()} '
                      'devices); choose config.mesh so that they divide it.')


def model_config(config: ml_collections.ConfigDict) -> config_lib.ModelConfig:
  """The preset, with `model.vocab_size` applied when non-zero."""
  mc = config_lib.get_preset(config.model.preset)
  if config.model.vocab_size:
    mc = mc.replace(vocab_size=int(config.model.vocab_size))
  return mc


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Transformer keyword arguments the job's config sets, whatever the source of the weights."""
  return dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
              remat=config.model.remat, attention=config.model.attention)


def quant_group_size(config: ml_collections.ConfigDict) -> int | None:
  """`model.quant_group_size` as gemma_jax.quant takes it (None: the mode's default)."""
  g = int(config.model.quant_group_size)
  return None if g < 0 else g


def quantize(model: Transformer, config: ml_collections.ConfigDict) -> Transformer:
  """`model` with its base weights quantized as `model.quantize` says (unchanged when '')."""
  if config.model.quantize:
    quant.quantize(model, config.model.quantize, quant_group_size(config))
  return model


def make_model(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict) -> Transformer:
  """A randomly initialised model of the job (seed), its base quantized when model.quantize is
  set, with its LoRA adapters when lora.rank > 0."""
  model = quantize(Transformer(mc, rngs=nnx.Rngs(config.seed), **model_kwargs(config)), config)
  if config.lora.rank:
    lora_lib.add_lora(model, config.lora.rank, config.lora.alpha, targets=config.lora.targets,
                      rngs=nnx.Rngs(config.seed + 1))
  return model


def abstract_model(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict) -> Transformer:
  """The job's Transformer as shapes only (`make_model` under `nnx.eval_shape`)."""
  return nnx.eval_shape(lambda: make_model(mc, config))
