"""The real files the fuzz tests mutate, and their readers (tests/fuzz_cases.py mutates them).

Small and real: a tiny-gemma3 model (vocabulary: data/quickstart_tokenizer.model plus the 256 byte
pieces a GGUF tokenizer needs) saved as a native checkpoint (config.json + Orbax params), as a
Hugging Face directory (config.json + safetensors), as an official (Kaggle layout) Orbax
checkpoint and as a gemma3 GGUF file written with the `gguf` package's GGUFWriter as llama.cpp
writes one (norms + 1; Q8_0, F16 and F32 tensors); the SentencePiece model itself; lines of
data/quickstart_train.jsonl; and, when given, the real Gemma 3 270M GGUF cut after its tensor
table (header, metadata and tensor infos, no data: a broken file as made).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from fuzz_cases import (TOKENIZER, TRAIN_JSONL, Mutator, Reader, files_of, flips, int_fields,
                        json_values, jsonl_lines, model_print, proto_lengths, safetensors_header,
                        tokenizer_print, truncation, _binary_or_json)


def _write_gguf(path: str, model, tokenizer_path: str) -> None:
  """The model as llama.cpp writes a gemma3 GGUF: norms + 1, Q8_0 / F16 / F32 tensors."""
  import gguf
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2
  from gemma_jax.convert.gguf import _GLOBAL_NAMES, _LAYER_NAMES
  from gemma_jax.convert.hf import hf_tensors_from_model
  c = model.config
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(open(tokenizer_path, 'rb').read())
  w = gguf.GGUFWriter(path, 'gemma3')
  for add, value in [(w.add_block_count, c.num_layers), (w.add_context_length, c.max_seq_len),
                     (w.add_embedding_length, c.embed_dim),
                     (w.add_feed_forward_length, c.hidden_dim),
                     (w.add_head_count, c.num_heads), (w.add_head_count_kv, c.num_kv_heads),
                     (w.add_key_length, c.head_dim), (w.add_value_length, c.head_dim),
                     (w.add_layer_norm_rms_eps, c.rms_norm_eps),
                     (w.add_rope_freq_base, c.rope_base_global),
                     (w.add_sliding_window, c.sliding_window)]:
    add(value)
  # The 128 pieces, then the 256 byte pieces a GGUF tokenizer (byte fallback) needs.
  pieces = [(p.piece, p.score, int(p.type)) for p in proto.pieces]  # SentencePiece's types are
  pieces += [(f'<0x{b:02X}>', 0.0, 6) for b in range(256)]  # GGUF's numbers (6: byte)
  assert len(pieces) == c.vocab_size, (len(pieces), c.vocab_size)
  w.add_tokenizer_model('llama')
  w.add_token_list([p[0] for p in pieces])
  w.add_token_scores([p[1] for p in pieces])
  w.add_token_types([p[2] for p in pieces])
  for add, value in [(w.add_pad_token_id, 0), (w.add_eos_token_id, 1), (w.add_bos_token_id, 2),
                     (w.add_unk_token_id, 3), (w.add_add_space_prefix, False)]:
    add(value)
  names = {f'{hf}.weight': (g, norm) for g, (hf, norm) in _GLOBAL_NAMES.items()}
  for i in range(c.num_layers):
    names.update({f'model.layers.{i}.{hf}.weight': (f'blk.{i}.{g}', norm)
                  for g, (hf, norm) in _LAYER_NAMES.items()})
  for k, (name, value) in enumerate(sorted(hf_tensors_from_model(model).items())):
    gname, norm = names[name]
    if norm:
      w.add_tensor(f'{gname}.weight', value + np.float32(1.0))
    elif k % 2:
      w.add_tensor(f'{gname}.weight', value.astype(np.float16))
    else:
      q8 = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(f'{gname}.weight', gguf.quants.quantize(value, q8), raw_dtype=q8)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _write_official(path: str, model) -> None:
  """The model as an official (Kaggle) Orbax checkpoint: {'transformer/layer_0/attn/...': {..}}."""
  import orbax.checkpoint as ocp
  from gemma_jax.transformer import flat_params
  tree = {}
  for name, value in flat_params(model).items():
    parts = name.split('.')
    if parts[0] == 'layers':
      parts = [f'layer_{parts[1]}'] + parts[2:]
    tree.setdefault('/'.join(['transformer'] + parts[:-1]), {})[parts[-1]] = np.asarray(value)
  ocp.PyTreeCheckpointer().save(path, tree)


def _gguf_mutators(path: str, data: bytes, rel: str = '') -> list[Mutator]:
  from gemma_jax.convert.gguf_checks import gguf_fields
  fields = [(f.offset, f.width, f.label) for f in gguf_fields(path)]
  header_end = fields[-1][0] + 8
  return [flips(data, rel, 0, header_end, 'header '), flips(data, rel, header_end, len(data),
                                                             'data '),
          truncation(data, rel), int_fields(data, fields, rel), int_fields(data, fields, rel)]


def _jsonl_print(examples) -> tuple[Any, Any]:
  return [[m['role'] for m in ms] for _, ms in examples], [ms for _, ms in examples]


def make_readers(workdir: str, real_gguf: str | None = None) -> dict[str, Reader]:
  """Writes the unmutated files under `workdir` and returns the readers keyed by name."""
  import dataclasses as dc
  from flax import nnx
  from safetensors.numpy import save_file
  from gemma_jax import checkpoint
  from gemma_jax.config import get_preset
  from gemma_jax.convert.gguf import load_gguf
  from gemma_jax.convert.hf import hf_config_from_config, hf_tensors_from_model, load_hf
  from gemma_jax.convert.official import load_official
  from gemma_jax.data_sources import read_jsonl
  from gemma_jax.tokenizer import Tokenizer
  from gemma_jax.transformer import Transformer

  config = dc.replace(get_preset('tiny-gemma3'), vocab_size=128 + 256)
  model = Transformer(config, rngs=nnx.Rngs(0))
  native = os.path.join(workdir, 'native')
  checkpoint.save_params(model, native, tokenizer=TOKENIZER)
  hf = os.path.join(workdir, 'hf')
  os.makedirs(hf)
  save_file(hf_tensors_from_model(model), os.path.join(hf, 'model.safetensors'))
  with open(os.path.join(hf, 'config.json'), 'w') as f:
    json.dump(hf_config_from_config(config), f, indent=2)
  official = os.path.join(workdir, 'official')
  _write_official(official, model)
  tiny_gguf = os.path.join(workdir, 'tiny.gguf')
  _write_gguf(tiny_gguf, model, TOKENIZER)
  spm_path = os.path.join(workdir, 'tokenizer.model')
  shutil.copyfile(TOKENIZER, spm_path)
  jsonl = os.path.join(workdir, 'train.jsonl')
  with open(TRAIN_JSONL) as src, open(jsonl, 'w') as dst:
    dst.writelines([next(src) for _ in range(12)] + ['{"prompt": "a b", "response": "b a"}\n'])

  def read(path):
    return open(path, 'rb').read()

  def gguf_load(path):
    return model_print(*load_gguf(path))

  readers = [
      Reader('gguf', tiny_gguf, gguf_load, _gguf_mutators(tiny_gguf, read(tiny_gguf))),
      Reader('safetensors', hf, lambda p: model_print(load_hf(p)), [
          flips(read(os.path.join(hf, 'model.safetensors')), 'model.safetensors'),
          truncation(read(os.path.join(hf, 'model.safetensors')), 'model.safetensors'),
          int_fields(read(os.path.join(hf, 'model.safetensors')), [(0, 8, 'header length')],
                     'model.safetensors'),
          safetensors_header(read(os.path.join(hf, 'model.safetensors')), 'model.safetensors')]),
      Reader('hf-config', hf, lambda p: model_print(load_hf(p)), [
          json_values(read(os.path.join(hf, 'config.json')), 'config.json')] * 3 + [
          flips(read(os.path.join(hf, 'config.json')), 'config.json'),
          truncation(read(os.path.join(hf, 'config.json')), 'config.json')]),
      Reader('native-config', native, lambda p: model_print(checkpoint.load_params(p)), [
          json_values(read(os.path.join(native, 'config.json')), 'config.json')] * 3 + [
          flips(read(os.path.join(native, 'config.json')), 'config.json'),
          truncation(read(os.path.join(native, 'config.json')), 'config.json')]),
      Reader('orbax', native, lambda p: model_print(checkpoint.load_params(p)), [
          files_of(native, _binary_or_json)]),
      Reader('official', official, lambda p: model_print(load_official(p, config)), [
          files_of(official, _binary_or_json)]),
      Reader('sentencepiece', spm_path, lambda p: tokenizer_print(Tokenizer(p)), [
          flips(read(spm_path)), truncation(read(spm_path)), proto_lengths(read(spm_path)),
          proto_lengths(read(spm_path))]),
      Reader('jsonl', jsonl, lambda p: _jsonl_print(read_jsonl(p)), [
          flips(read(jsonl)), truncation(read(jsonl)), jsonl_lines(read(jsonl)),
          jsonl_lines(read(jsonl))]),
  ]
  if real_gguf:
    from gemma_jax.convert.gguf_checks import gguf_fields
    fields = gguf_fields(real_gguf)
    header = os.path.join(workdir, 'gemma3-270m-header.gguf')
    with open(real_gguf, 'rb') as f:
      data = f.read(-(-(fields[-1].offset + 8) // 32) * 32)  # up to where tensor data begins
    with open(header, 'wb') as f:
      f.write(data)
    int_spots = [(x.offset, x.width, x.label) for x in fields]
    readers.append(Reader('gguf-real-header', header, gguf_load, [
        flips(data, '', 0, 4096, 'metadata '), flips(data, '', 0, len(data)), truncation(data),
        int_fields(data, int_spots), int_fields(data, int_spots[:40])], timeout_s=60.0))
  return {r.name: r for r in readers}
