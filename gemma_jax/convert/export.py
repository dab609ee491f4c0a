"""Hugging Face export: `save_hf(model, out_dir)` writes safetensors + config.json for transformers.

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` (Gemma,
Gemma 2 or Gemma 3 text classes). Tensor names, orientations and the config come from
`gemma_jax.convert.hf`, the same table the importer uses, so export inverts import exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import numpy as np

from gemma_jax.convert.hf import hf_config_from_config, hf_tensors_from_model
from gemma_jax.transformer import Transformer

log = logging.getLogger('gemma_jax.convert')

SAFETENSORS_INDEX = 'model.safetensors.index.json'
_DTYPE_NAMES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Splits tensors, in name order, into groups of at most max_shard_bytes (one tensor minimum)."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  return shards


def save_hf(model: Transformer, out_dir: str | os.PathLike, *, vocab_size: int | None = None,
            tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model` as a Hugging Face checkpoint directory (safetensors + config.json).

  Tensors keep the model's parameter dtype. vocab_size: keep only the first vocab_size embedding
  rows (e.g. 256000 for a Gemma 1/2 model imported from an official checkpoint padded to 256128,
  to match the Hugging Face releases); default: all rows. tokenizer: a `Tokenizer` or a
  `tokenizer.model` path, copied in as `tokenizer.model`. Checkpoints larger than
  max_shard_bytes are split into `model-0000k-of-0000n.safetensors` files with an index.
  out_dir must be empty or not exist.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise ValueError(f'save_hf: {out_dir} is not empty; choose a new directory.')
  config = model.config
  tensors = hf_tensors_from_model(model)
  rows = config.vocab_size
  if vocab_size is not None:
    if not 0 < vocab_size <= rows:
      raise ValueError(f'save_hf: vocab_size={vocab_size} must be in 1..{rows} (the embedding '
                       'rows of the model).')
    rows = vocab_size
    tensors['model.embed_tokens.weight'] = np.ascontiguousarray(
        tensors['model.embed_tokens.weight'][:rows])
  hf_config = hf_config_from_config(config, vocab_size=rows)
  dtype = str(tensors['model.embed_tokens.weight'].dtype)
  hf_config['torch_dtype'] = hf_config['dtype'] = _DTYPE_NAMES.get(dtype, dtype)
  os.makedirs(out_dir, exist_ok=True)

  shards = _shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  else:
    weight_map = {}
    for k, shard in enumerate(shards):
      name = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
      save_file(shard, os.path.join(out_dir, name), metadata={'format': 'pt'})
      weight_map.update({tensor: name for tensor in shard})
      log.info('%s: wrote %s (%d/%d)', out_dir, name, k + 1, len(shards))
    index = {'metadata': {'total_size': sum(t.nbytes for t in tensors.values())},
             'weight_map': dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), 'w') as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  if tokenizer is not None:
    dest = os.path.join(out_dir, 'tokenizer.model')
    if isinstance(tokenizer, (str, os.PathLike)):
      shutil.copyfile(tokenizer, dest)
    else:
      tokenizer.save(dest)
