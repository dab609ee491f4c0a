"""Native params-only checkpoints: Orbax arrays, the ModelConfig as JSON and the tokenizer.

Layout of a checkpoint directory (what `sample.py --ckpt DIR` and `load_params` read):
```
DIR/config.json       ModelConfig.to_dict()
DIR/params/           Orbax StandardCheckpointer item: nested dict of arrays, e.g.
                      {'embedder': {'input_embedding': (V, D)}, 'layers': {'0': {'attn': ...}}}
DIR/tokenizer.model   SentencePiece model (when one was given)
```
Parameter paths mirror `nnx.state(model, nnx.Param)` (layer indices as strings), so the tree is the
model's own and restoring it is a lookup, with no renaming.
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

from gemma_jax.config import ModelConfig
from gemma_jax.distributed import sync_processes
from gemma_jax.transformer import Transformer, param_name

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
TOKENIZER_FILE = 'tokenizer.model'


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'layers.0.attn.q_einsum.w': x} -> {'layers': {'0': {'attn': {'q_einsum': {'w': x}}}}}."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Inverse of `_nest`."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + '.'))
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
  checkpointer.save(params_dir, _nest(flat))
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


def _flat_shardings(shardings: Any, names: list[str]) -> dict[str, jax.sharding.Sharding]:
  """Normalises `shardings` (one Sharding, a dict by dotted name, or an nnx.State) per name."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {n: device for n in names}
  if isinstance(shardings, jax.sharding.Sharding):
    return {n: shardings for n in names}
  if isinstance(shardings, nnx.State):
    flat = {param_name(p): (v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(shardings)}
  else:
    flat = dict(shardings)
  missing = [n for n in names if n not in flat]
  if missing:
    raise ValueError(f'load_params: shardings has no entry for {missing[:5]}.')
  return {n: flat[n] for n in names}


def load_params(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
                shardings: Any = None) -> Transformer:
  """Restores a Transformer written by `save_params`, without random init.

  param_dtype: storage dtype of the restored parameters (default: the dtype they were saved in);
  dtype: compute dtype (default: param_dtype). shardings: None (first local device), one
  `jax.sharding.Sharding` for every parameter, or a per-parameter mapping (a dict keyed by dotted
  name such as 'layers.0.attn.q_einsum.w', or an nnx.State shaped like `nnx.state(model,
  nnx.Param)` with Sharding leaves): arrays are read straight into those shardings, so a model never
  has to fit on one device.
  """
  directory = os.fspath(directory)
  params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise ValueError(f'{directory}: no params/ directory; this is not a gemma_jax checkpoint '
                     '(convert one with `python -m gemma_jax.convert --from ... --dst DIR`).')
  config = load_config(directory)
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(params_dir).item_metadata.tree
  except (FileNotFoundError, ValueError, AttributeError) as e:
    raise ValueError(f'{params_dir}: unreadable Orbax checkpoint ({e}).') from e
  saved = _flatten(meta)
  if param_dtype is None:
    param_dtype = saved['embedder.input_embedding'].dtype
  dtype = dtype or param_dtype
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                param_dtype=param_dtype))
  graphdef, state = nnx.split(abstract)
  flat_state = nnx.to_flat_state(state)
  params = {param_name(p): v for p, v in flat_state if isinstance(v, nnx.Param)}
  missing = sorted(set(params) - set(saved))
  unexpected = sorted(set(saved) - set(params))
  if missing or unexpected:
    raise ValueError(f'{params_dir}: parameters do not match {CONFIG_FILE} (model '
                     f'{config.name!r}): missing {missing[:5]}, unexpected {unexpected[:5]}.')
  for name, var in params.items():
    if tuple(saved[name].shape) != tuple(var.shape):
      raise ValueError(f'{params_dir}: parameter {name!r} has shape {tuple(saved[name].shape)}, '
                       f'{CONFIG_FILE} implies {tuple(var.shape)}.')
  per_name = _flat_shardings(shardings, list(params))
  target = _nest({n: jax.ShapeDtypeStruct(v.shape, jnp.dtype(param_dtype), sharding=per_name[n])
                  for n, v in params.items()})
  restored = _flatten(checkpointer.restore(params_dir, target))
  for name, var in params.items():
    var.set_value(restored[name])
  return nnx.merge(graphdef, nnx.from_flat_state(flat_state))

