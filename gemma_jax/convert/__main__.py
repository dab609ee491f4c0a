"""Checkpoint conversion CLI.

  python -m gemma_jax.convert --from gguf --src model.gguf --dst ckpt/
  python -m gemma_jax.convert --from hf --src hf_dir/ --dst ckpt/ [--dtype bfloat16]
  python -m gemma_jax.convert --from official --src kaggle/gemma2-2b --preset gemma2-2b --dst ckpt/
  python -m gemma_jax.convert --to hf --src ckpt/ --dst hf_out/ [--vocab-size 256000]
  python -m gemma_jax.convert --from gguf --src model.gguf --dst ckpt_int4/ --quantize int4

`--quantize int8|int4` (with `--from`) writes the weights quantized (gemma_jax.quant: a scale per
group of `--group-size` inputs, default 32); `load_params` and sample.py read
such a checkpoint back quantized, and `--to hf` writes it dequantized. A GGUF file's Q8_0 / Q4_0
tensors are kept as they are (no float round trip; gemma_jax.convert.gguf).

`--from` writes a native checkpoint (gemma_jax.checkpoint: params, config.json and tokenizer.model
when the source has one); `--to hf` writes safetensors + config.json for transformers. Output is
built in a temporary folder beside --dst and renamed into place only when complete, so a failed or
interrupted conversion leaves nothing at --dst. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

import jax.numpy as jnp

from gemma_jax import checkpoint
from gemma_jax import quant
from gemma_jax.convert.export import save_hf
from gemma_jax.convert.gguf import load_gguf
from gemma_jax.convert.hf import load_hf
from gemma_jax.convert.official import load_official
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import count_params

log = logging.getLogger('gemma_jax.convert')

DTYPES = ('float32', 'bfloat16')


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m gemma_jax.convert',
                              description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n', 1)[1])
  direction = p.add_mutually_exclusive_group(required=True)
  direction.add_argument('--from', dest='source', choices=('hf', 'gguf', 'official'),
                         help='import this format into a native checkpoint at --dst')
  direction.add_argument('--to', dest='target', choices=('hf',),
                         help='export the native checkpoint at --src to this format')
  p.add_argument('--src', required=True, help='source file or directory')
  p.add_argument('--dst', required=True, help='output directory (must not exist or be empty)')
  p.add_argument('--preset', help='model preset of an official checkpoint, e.g. gemma2-2b')
  p.add_argument('--dtype', choices=DTYPES, default='float32',
                 help='parameter dtype of the native checkpoint (default float32)')
  p.add_argument('--tokenizer', help='tokenizer.model to store with an official or hf import '
                 '(default: tokenizer.model in --src or, for official, its parent folder)')
  p.add_argument('--quantize', choices=quant.MODES,
                 help='--from: store the projection weights and embedding quantized')
  p.add_argument('--group-size', type=int,
                 help='--quantize: values per scale along the contraction axis (default 32; '
                 '0: per output channel)')
  p.add_argument('--vocab-size', type=int,
                 help='--to hf: keep only this many embedding rows (256000 for Gemma 1/2 '
                 'checkpoints imported from official ones, whose embedding has 256128)')
  return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.preset and args.source != 'official':
    p.error('--preset applies to --from official only (hf and gguf files describe themselves)')
  if args.source == 'official' and not args.preset:
    p.error('--from official needs --preset (e.g. gemma2-2b); official checkpoints carry no config')
  if args.tokenizer and args.source not in ('official', 'hf'):
    p.error('--tokenizer applies to --from official or hf (GGUF files carry their tokenizer)')
  if args.vocab_size is not None and args.target != 'hf':
    p.error('--vocab-size applies to --to hf only')
  if args.quantize and args.target:
    p.error('--quantize applies to --from only (--to hf writes float weights)')
  if args.group_size is not None and not args.quantize:
    p.error('--group-size needs --quantize')
  if args.quantize:
    try:
      quant.spec(args.quantize, args.group_size)
    except ValueError as e:
      p.error(f'--group-size: {e}')
  if args.target and args.dtype != 'float32':
    p.error('--dtype applies to --from only (--to hf keeps the checkpoint dtype)')
  if not os.path.exists(args.src):
    p.error(f'--src {args.src} does not exist')
  if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)):
    p.error(f'--dst {args.dst} already exists and is not an empty directory')


def _find_tokenizer(args) -> str | None:
  if args.tokenizer:
    return args.tokenizer
  src = os.path.abspath(args.src)
  candidates = [os.path.join(src, 'tokenizer.model')]
  if args.source == 'official':  # Kaggle keeps tokenizer.model beside the checkpoint folder.
    candidates.append(os.path.join(os.path.dirname(src), 'tokenizer.model'))
  return next((c for c in candidates if os.path.isfile(c)), None)


def _load(args):
  """(model, tokenizer or None) from the --from source."""
  dtype = jnp.dtype(args.dtype)
  if args.source == 'gguf':
    return load_gguf(args.src, dtype=dtype, quantize=args.quantize, group_size=args.group_size)
  if args.source == 'hf':
    model = load_hf(args.src, dtype=dtype)
  else:
    model = load_official(args.src, args.preset, dtype=dtype)
  if args.quantize:
    quant.quantize(model, args.quantize, args.group_size)
  path = _find_tokenizer(args)
  if path is None:
    log.info('no tokenizer.model found; the checkpoint will have none (pass --tokenizer)')
    return model, None
  tokenizer = Tokenizer(path)
  tokenizer.check_fits(model.config.vocab_size, f'model {model.config.name!r} of {args.src}',
                       'Pass the tokenizer of this model with --tokenizer.')
  return model, tokenizer


def convert(args: argparse.Namespace) -> None:
  """Runs one conversion into a temporary folder, then renames it to args.dst."""

  dst = os.path.abspath(args.dst)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.tmp-', dir=parent)
  try:
    if args.target == 'hf':
      log.info('loading native checkpoint %s', args.src)
      model = checkpoint.load_params(args.src)
      if quant.is_quantized(model):
        log.info('the checkpoint is quantized: writing its dequantized weights (float32)')
        quant.dequantize(model)
      log.info('writing safetensors and config.json')
      save_hf(model, tmp, vocab_size=args.vocab_size, tokenizer=checkpoint.tokenizer_path(args.src))
    else:
      log.info('loading %s checkpoint %s', args.source, args.src)
      model, tokenizer = _load(args)
      log.info('model %s: %.1fM parameters; writing native checkpoint (%s)', model.config.name,
               count_params(model) / 1e6, args.dtype)
      if args.quantize:
        log.info(quant.describe(model))
      checkpoint.save_params(model, tmp, tokenizer=tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; give it a normal directory's mode.
    if os.path.isdir(dst):
      os.rmdir(dst)  # Checked empty by _check_args.
    os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  _check_args(parser, args)
  start = time.time()

  class Elapsed(logging.Formatter):
    def format(self, record):
      return f'[{record.created - start:6.1f}s] {record.getMessage()}'

  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(Elapsed())
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  try:
    convert(args)
    log.info('wrote %s', args.dst)
    return 0
  except (ValueError, OSError) as e:  # a bad or unreadable file: one line, no traceback
    print(f'python -m gemma_jax.convert: error: {" ".join(str(e).split())}', file=sys.stderr)
    return 1
  finally:
    log.removeHandler(handler)
    log.propagate = True


if __name__ == '__main__':
  sys.exit(main())
