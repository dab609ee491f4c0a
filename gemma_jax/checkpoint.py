"""Native checkpoints: params-only directories (what sample.py reads and a training job exports).

Layout of a checkpoint directory (what `sample.py --ckpt DIR` and `load_params` read):
```
DIR/config.json       ModelConfig.to_dict()
DIR/params/           Orbax StandardCheckpointer item: nested dict of arrays, e.g.
                      {'embedder': {'input_embedding': (V, D)}, 'layers': {'0': {'attn': ...}}}
DIR/tokenizer.model   SentencePiece model (when one was given)
```
Parameter paths mirror `nnx.state(model, nnx.Param)` (layer indices as strings), so the tree is the
model's own and restoring it is a lookup, with no renaming.

`export_params` writes a training job's final params-only checkpoint, WORKDIR/final. The job's
train-state checkpoints (what a rerun resumes from) are gemma_jax/train_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from gemma_jax import quant
from gemma_jax.config import ModelConfig
from gemma_jax.distributed import sync_processes
from gemma_jax.lora import merge_lora
from gemma_jax.transformer import (Transformer, check_param_shapes, model_from_params, param_name,
                                   shardings_by_name)

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
TOKENIZER_FILE = 'tokenizer.model'
EXPORT_DIR = 'final'  # under a training job's workdir: export_params


def nest(flat: Mapping[str, Any], sep: str = '.') -> dict[str, Any]:
  """{'layers.0.attn.q_einsum.w': x} -> {'layers': {'0': {'attn': {'q_einsum': {'w': x}}}}}."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(sep)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping[str, Any], sep: str = '.', prefix: str = '') -> dict[str, Any]:
  """Inverse of `nest`: nested (or partly flat) mappings -> {'a.b.c': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, sep, name + sep))
    else:
      flat[name] = value
  return flat


def save_params(model: Transformer, directory: str | os.PathLike, tokenizer: Any = None) -> None:
  """Writes `model`'s parameters, its config and optionally its tokenizer to `directory`.

  `tokenizer` is a `gemma_jax.tokenizer.Tokenizer` (anything with `.save(path)`) or the path of a
  SentencePiece `.model` file, copied in as `tokenizer.model`. The directory must not already hold
  params. Parameters keep their dtype and are gathered from their shardings by Orbax.
  """
  directory = os.path.abspath(os.fspath(directory))
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(params_dir):
    raise ValueError(f'save_params: {params_dir} already exists; choose an empty directory.')
  # Every process must have looked before any starts writing (the Orbax save is collective).
  sync_processes('save_params:checked')
  os.makedirs(directory, exist_ok=True)
  flat = {param_name(path): var.get_value()
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, nest(flat))
  checkpointer.wait_until_finished()
  if jax.process_index() != 0:
    return  # one writer for the small files
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(model.config.to_dict(), f, indent=2)
  if tokenizer is not None:
    dest = os.path.join(directory, TOKENIZER_FILE)
    if isinstance(tokenizer, (str, os.PathLike)):
      shutil.copyfile(tokenizer, dest)
    else:
      tokenizer.save(dest)


def load_config(directory: str | os.PathLike) -> ModelConfig:
  """The ModelConfig stored in a checkpoint directory; ValueError naming the file for one that is
  not JSON, not a ModelConfig, or holds a value of the wrong type or out of range."""
  from gemma_jax.convert.config_checks import check_config  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{directory}: no {CONFIG_FILE}; is this a gemma_jax checkpoint directory '
                     '(written by save_params or `python -m gemma_jax.convert`)?')
  with open(path, 'rb') as f:
    try:  # JSON and UTF-8 errors are ValueErrors
      fields = json.loads(f.read().decode('utf-8'))
      if not isinstance(fields, dict):
        raise TypeError(f'expected a JSON object, got {type(fields).__name__}')
      config = ModelConfig.from_dict(fields)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
      raise ValueError(f'{path}: not a valid ModelConfig: {type(e).__name__}: {e}') from None
  check_config(config, path)
  return config


def tokenizer_path(directory: str | os.PathLike) -> str | None:
  """Path of the checkpoint's `tokenizer.model`, or None when it has none."""
  path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
  return path if os.path.isfile(path) else None


def load_params(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
                shardings: Any = None) -> Transformer:
  """Restores a Transformer written by `save_params`, without random init.

  param_dtype: storage dtype of the restored parameters (default: the dtype they were saved in);
  dtype: compute dtype (default: param_dtype). shardings: None (first local device), one
  `jax.sharding.Sharding` for every parameter, or a per-parameter mapping (a dict keyed by dotted
  name such as 'layers.0.attn.q_einsum.w', or an nnx.State shaped like `nnx.state(model,
  nnx.Param)` with Sharding leaves): arrays are read straight into those shardings, so a model never
  has to fit on one device. Names and shapes are checked against config.json before any read.
  """
  directory = os.fspath(directory)
  params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise ValueError(f'{directory}: no params/ directory; this is not a gemma_jax checkpoint '
                     '(convert one with `python -m gemma_jax.convert --from ... --dst DIR`).')
  config = load_config(directory)
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = flatten(checkpointer.metadata(params_dir).item_metadata.tree)
  except Exception as e:  # Orbax and TensorStore raise many kinds on damaged files
    raise ValueError(f'{params_dir}: unreadable Orbax checkpoint ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:300]}).') from e
  broken = sorted(n for n, m in saved.items() if not hasattr(m, 'shape') or not hasattr(m, 'dtype'))
  if broken:
    raise ValueError(f'{params_dir}: unreadable Orbax checkpoint (no array metadata for '
                     f'{broken[:3]}).')
  layers = {n.split('.')[1] for n in saved if n.startswith('layers.')}
  if config.num_layers > len(layers):  # before a model of the config's layers is even traced
    raise ValueError(f'{params_dir}: its {CONFIG_FILE} says {config.num_layers} layers but the '
                     f'checkpoint holds only {len(layers)}.')
  quantized = check_param_shapes(config, {n: tuple(m.shape) for n, m in saved.items()},
                                 f'{params_dir} (checked against its {CONFIG_FILE})')
  # Quantized weights and their scales (gemma_jax.quant) keep their saved dtypes.
  kept = set(quantized) | {n + quant.SCALE_SUFFIX for n in quantized}
  if param_dtype is None:
    param_dtype = saved['final_norm.scale'].dtype
  names = sorted(saved)
  placement = shardings_by_name(shardings, names) or {
      n: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) for n in names}
  target = nest({n: jax.ShapeDtypeStruct(
      saved[n].shape, saved[n].dtype if n in kept else jnp.dtype(param_dtype),
      sharding=placement[n]) for n in names})
  try:
    restored = flatten(checkpointer.restore(params_dir, target))
  except Exception as e:  # TensorStore's errors on damaged or missing chunk files
    raise ValueError(f'{params_dir}: unreadable Orbax checkpoint ({type(e).__name__}: '
                     f'{" ".join(str(e).split())[:300]}).') from e
  return model_from_params(config, restored, dtype=dtype or param_dtype, param_dtype=param_dtype,
                           source=params_dir, shardings=placement, quantized=quantized)


# ---------------------------------------------------------------------------------------------
def export_params(model: Transformer, workdir: str, tokenizer: Any = None, *,
                  quantize: tuple[str, int | None] | None = None) -> str:
  """Writes the job's final params-only checkpoint (+ tokenizer.model) for sample.py to
  WORKDIR/final, replacing an earlier one; a model with LoRA adapters is exported with them
  merged in (in place). A quantized base (QLoRA) is exported as the merged float32 model, or,
  with `quantize` = (mode, group size), quantized again that way. Returns the directory."""
  out = os.path.join(os.path.abspath(workdir), EXPORT_DIR)
  if os.path.exists(out) and jax.process_index() == 0:
    shutil.rmtree(out)
  sync_processes('export_params:cleared')  # nobody checks `out` before it is gone
  merge_lora(model)
  if quantize:
    quant.quantize(model, *quantize)
  else:
    quant.dequantize(model)
  save_params(model, out, tokenizer)
  return out
