"""Native checkpoints: params-only directories (what sample.py reads) and the trainer's
train-state checkpoints (what a rerun resumes from).

Layout of a checkpoint directory (what `sample.py --ckpt DIR` and `load_params` read):
```
DIR/config.json       ModelConfig.to_dict()
DIR/params/           Orbax StandardCheckpointer item: nested dict of arrays, e.g.
                      {'embedder': {'input_embedding': (V, D)}, 'layers': {'0': {'attn': ...}}}
DIR/tokenizer.model   SentencePiece model (when one was given)
```
Parameter paths mirror `nnx.state(model, nnx.Param)` (layer indices as strings), so the tree is the
model's own and restoring it is a lookup, with no renaming.

Train-state checkpoints live in WORKDIR/checkpoints, one Orbax step directory each: the train state
(step, params, optimiser state, rng; a LoRA job's frozen base weights are left out and read again
from model.init), the data-iterator state and the config. `export_params` writes the job's final
params-only checkpoint, WORKDIR/final.
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
TRAIN_CHECKPOINT_DIR = 'checkpoints'  # under a training job's workdir
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
  """The ModelConfig stored in a checkpoint directory."""
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'{directory}: no {CONFIG_FILE}; is this a gemma_jax checkpoint directory '
                     '(written by save_params or `python -m gemma_jax.convert`)?')
  with open(path) as f:
    try:
      return ModelConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{path}: not a valid ModelConfig: {e}') from e


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
  except (FileNotFoundError, ValueError, AttributeError) as e:
    raise ValueError(f'{params_dir}: unreadable Orbax checkpoint ({e}).') from e
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
  restored = flatten(checkpointer.restore(params_dir, target))
  return model_from_params(config, restored, dtype=dtype or param_dtype, param_dtype=param_dtype,
                           source=params_dir, shardings=placement, quantized=quantized)


# ---------------------------------------------------------------------------------------------
# Train-state checkpoints (the trainer's).


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """Async Orbax manager over WORKDIR/checkpoints keeping the newest `keep` steps.

  Orbax writes each step to a temporary directory and renames it when complete, so a save that
  was killed midway is never listed, hence never restored.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), TRAIN_CHECKPOINT_DIR),
                               options=options)


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Mapping[str, Any],
                     data_state: Any, config: Mapping[str, Any]) -> None:
  """Starts an async save of the train state (without a LoRA job's frozen base weights), the
  data-iterator state and the config (a plain dict)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_saved(state)),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(dict(config))))


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                        shardings: Any) -> tuple[dict[str, Any], Any]:
  """(train state placed on `shardings`, data-iterator state) saved at `step` (without 'frozen':
  a LoRA job reads its base weights from model.init again)."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        _saved(abstract_state), _saved(shardings))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def _saved(state: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in state.items() if k != 'frozen'}


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
