"""sample.py end to end on a checkpoint converted from the real Gemma 3 270M GGUF (and on a tiny
random Gemma 4 for the KV-cache line)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from gemma_jax import checkpoint
from gemma_jax.sampler import Sampler
from gemma_jax.tokenizer import Tokenizer

_REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ['The capital of France is', 'def add(a, b):']


def _run(*args, stdin=None, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  return subprocess.run([sys.executable, str(_REPO / 'sample.py'), *args], input=stdin,
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=_REPO)


@pytest.fixture(scope='module')
def ckpt(gguf_path, tmp_path_factory):
  """A native float32 checkpoint written by the convert CLI (in-process)."""
  from gemma_jax.convert.__main__ import main as convert
  dst = tmp_path_factory.mktemp('cli') / 'ckpt'
  assert convert(['--from', 'gguf', '--src', str(gguf_path), '--dst', str(dst)]) == 0
  return dst


def test_greedy_output_json_equals_library_call(ckpt, tmp_path):
  out = tmp_path / 'out.json'
  args = ['--ckpt', str(ckpt), '--greedy', '--max_new_tokens', '24', '--output_json', str(out)]
  proc = _run(*args, *[a for p in PROMPTS for a in ('--prompt', p)])
  assert proc.returncode == 0, proc.stderr
  got = json.loads(out.read_text())['completions']

  tokenizer = Tokenizer(ckpt / 'tokenizer.model')
  longest = max(len(tokenizer.encode(p)) for p in PROMPTS)
  cache_length = -(-(longest + 24) // 128) * 128  # sample.py's rule
  sampler = Sampler(checkpoint.load_params(ckpt), tokenizer, cache_length=cache_length)
  ref = sampler.sample(PROMPTS, 24)
  assert [c['prompt'] for c in got] == PROMPTS
  assert [c['tokens'] for c in got] == [c.tokens for c in ref]
  assert [c['text'] for c in got] == [c.text for c in ref]
  for i, (prompt, c) in enumerate(zip(PROMPTS, ref)):  # streamed to stdout, in order
    assert f'[{i + 1}/2] {prompt}{c.text}' in proc.stdout
  size = sampler.cache_bytes(2)  # the 270M shares no keys and values: no parenthesis
  assert 2**20 <= size < 2**30
  line = f'KV cache: {size / 2**20:.1f} MiB for batch 2 x {cache_length} tokens'
  assert line in proc.stderr.splitlines(), proc.stderr


def test_cache_length_stops_at_max_seq_len():
  """The 128-slot rounding never asks the Sampler for positions past the model's max_seq_len."""
  # A fresh interpreter: importing sample.py defines its absl flags, which other tests may too.
  code = ('import sample; print([sample.cache_length_for(*a) for a in '
          '[([100], 20, 1000), ([100], 20, 200), ([100], 20, 120), ([3, 90], 10, 4096)]])')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(_REPO)), cwd=_REPO)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout) == [128, 128, 120, 128]


def test_chat_answers_two_piped_turns(ckpt, tmp_path):
  out = tmp_path / 'chat.json'
  turns = ['What is the capital of France?', 'Say hello in Spanish.']
  proc = _run('--ckpt', str(ckpt), '--chat', '--greedy', '--max_new_tokens', '16',
              '--output_json', str(out), stdin='\n'.join(turns) + '\n')
  assert proc.returncode == 0, proc.stderr
  replies = json.loads(out.read_text())['completions']
  assert [r['prompt'] for r in replies] == turns
  for turn, reply in zip(turns, replies):
    assert reply['tokens'] and reply['text'].strip()
    assert f'> {turn}\n{reply["text"]}\n' in proc.stdout


def _tiny_gemma4(directory):
  """(model, tokenizer path): a tiny random Gemma 4 saved to `directory`, with the quickstart
  tokenizer (128 pieces: as many rows)."""
  from flax import nnx
  from gemma_jax.config import get_preset
  from gemma_jax.transformer import Transformer
  model = Transformer(get_preset('tiny-gemma4').replace(vocab_size=128), rngs=nnx.Rngs(0))
  checkpoint.save_params(model, directory)
  return model, _REPO / 'data' / 'quickstart_tokenizer.model'


def test_kv_cache_line_leaves_out_kv_shared_layers(tmp_path):
  """On a tiny random Gemma 4 (its last 2 of 5 layers reuse earlier keys and values) sample.py
  prints, on stderr, the bytes of the cache the Sampler allocates: only 3 layers' worth."""
  model, tokenizer = _tiny_gemma4(tmp_path / 'g4')
  proc = _run('--ckpt', str(tmp_path / 'g4'), '--tokenizer', str(tokenizer), '--greedy',
              '--max_new_tokens', '4', '--prompt', 'a b c', '--prompt', 'd')
  assert proc.returncode == 0, proc.stderr
  # float32; local layers: 8 slots x (2 x K 2 x H 16 x 4 bytes + 4 for the slot's position);
  # the global layer: 128 slots x (2 x 1 x 32 x 4 + 4); the end index: 4.
  size = 2 * (2 * 8 * (2 * 2 * 16 * 4 + 4) + 128 * (2 * 1 * 32 * 4 + 4)) + 4
  assert size == Sampler(model, cache_length=128).cache_bytes(2)
  line = (f'KV cache: {size / 1024:.1f} KiB for batch 2 x 128 tokens (2 of 5 layers share keys '
          'and values: no cache)')
  assert line in proc.stderr.splitlines(), proc.stderr


def test_int8_kv_cache_flag(tmp_path):
  """--cache_dtype int8 on the tiny random Gemma 4: the KV cache line counts int8 keys and values
  plus a float32 scale per token and kv head, and the greedy tokens equal the library's with an
  int8 cache."""
  model, tokenizer = _tiny_gemma4(tmp_path / 'g4')
  out = tmp_path / 'out.json'
  proc = _run('--ckpt', str(tmp_path / 'g4'), '--tokenizer', str(tokenizer), '--greedy',
              '--max_new_tokens', '4', '--prompt', 'a b c', '--prompt', 'd', '--cache_dtype',
              'int8', '--output_json', str(out))
  assert proc.returncode == 0, proc.stderr
  # Per slot: k and v (K x H int8), their scales (K float32 each), the int32 position.
  size = 2 * (2 * 8 * (2 * 2 * 16 + 2 * 2 * 4 + 4) + 128 * (2 * 1 * 32 + 2 * 1 * 4 + 4)) + 4
  sampler = Sampler(model, Tokenizer(tokenizer), cache_length=128, cache_dtype='int8')
  assert size == sampler.cache_bytes(2)
  assert (f'KV cache: {size / 1024:.1f} KiB for batch 2 x 128 tokens (2 of 5 layers share keys '
          'and values: no cache)') in proc.stderr.splitlines(), proc.stderr
  got = [c['tokens'] for c in json.loads(out.read_text())['completions']]
  assert got == [c.tokens for c in sampler.sample(['a b c', 'd'], 4)]


def test_quantize_flag(tmp_path):
  """--quantize int4 --group_size 8 on the tiny random Gemma 4: the weights are quantized at load
  (a stderr line says how) and the greedy tokens equal the library's on the same quantized
  model; a group size that does not divide a weight, or --quantize on a quantized checkpoint,
  is one line naming the tensor / the checkpoint."""
  from gemma_jax import quant
  model, tokenizer = _tiny_gemma4(tmp_path / 'g4')
  out = tmp_path / 'out.json'
  proc = _run('--ckpt', str(tmp_path / 'g4'), '--tokenizer', str(tokenizer), '--greedy',
              '--max_new_tokens', '4', '--prompt', 'a b c', '--quantize', 'int4', '--group_size',
              '8', '--output_json', str(out))
  assert proc.returncode == 0, proc.stderr
  quant.quantize(model, 'int4', 8)
  assert quant.describe(model) in proc.stderr.splitlines(), proc.stderr
  sampler = Sampler(model, Tokenizer(tokenizer), cache_length=128)
  got = [c['tokens'] for c in json.loads(out.read_text())['completions']]
  assert got == [c.tokens for c in sampler.sample(['a b c'], 4)]
  checkpoint.save_params(model, tmp_path / 'g4_int4')
  ck = ['--tokenizer', str(tokenizer), '--prompt', 'x', '--quantize', 'int8']
  _assert_one_line_error(_run('--ckpt', str(tmp_path / 'g4'), *ck, '--group_size', '24'),
                         'does not divide axis 0 (length 64) of embedder.per_layer_model_projection.w')
  _assert_one_line_error(_run('--ckpt', str(tmp_path / 'g4_int4'), *ck, '--group_size', '8'),
                         'already quantized')


def test_penalties_and_logprobs_flags(tmp_path):
  """On the tiny random Gemma 4: --greedy with the three penalties and --logprobs --top_logprobs
  2 writes the library's penalised greedy tokens, each one's log-prob (one per token) and the top
  2 alternatives to --output_json."""
  from gemma_jax.sampling import SamplingParams
  model, tokenizer = _tiny_gemma4(tmp_path / 'g4')
  out = tmp_path / 'out.json'
  prompts = ['a b c', 'd']
  proc = _run('--ckpt', str(tmp_path / 'g4'), '--tokenizer', str(tokenizer), '--greedy',
              '--max_new_tokens', '6', *[a for p in prompts for a in ('--prompt', p)],
              '--repetition_penalty', '1.3', '--frequency_penalty', '0.5', '--presence_penalty',
              '0.25', '--logprobs', '--top_logprobs', '2', '--output_json', str(out))
  assert proc.returncode == 0, proc.stderr
  got = json.loads(out.read_text())['completions']
  rule = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                        presence_penalty=0.25)
  sampler = Sampler(model, Tokenizer(tokenizer), cache_length=128)
  ref = sampler.sample(prompts, 6, sampling=rule, return_logprobs=True, top_logprobs=2)
  assert [c['tokens'] for c in got] == [c.tokens for c in ref]
  assert [c.tokens for c in ref] != [c.tokens for c in sampler.sample(prompts, 6)]
  for c, r in zip(got, ref):
    assert len(c['logprobs']) == len(c['tokens']) == len(c['top_logprobs'])
    assert c['logprobs'] == pytest.approx(r.logprobs, abs=1e-6)
    assert [[t for t, _ in step] for step in c['top_logprobs']] == [
        [t for t, _ in step] for step in r.top_logprobs]
    assert [v for step in c['top_logprobs'] for _, v in step] == pytest.approx(
        [v for step in r.top_logprobs for _, v in step], abs=1e-6)


def _assert_one_line_error(proc, pattern):
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if 'error' in l.lower()]
  assert len(lines) == 1 and lines[0].startswith('sample.py: error:'), proc.stderr
  assert pattern in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr


def test_bad_input_fails_with_one_line(ckpt, tmp_path):
  ck = ['--ckpt', str(ckpt)]
  cases = [
      (['--prompt', 'x', '--bogus'], 'bogus'),
      (['--prompt', 'x'], '--ckpt'),  # no --ckpt at all
      (['--ckpt', str(tmp_path / 'missing'), '--prompt', 'x'], 'no such directory'),
      ([*ck, '--tokenizer', str(tmp_path / 'no.model'), '--prompt', 'x'], 'not found'),
      ([*ck], 'at least one --prompt'),
      ([*ck, '--prompt', 'x', '--top_p', '1.5'], 'top_p must be in (0, 1]'),
      ([*ck, '--prompt', 'x', '--top_p', '0'], 'top_p must be in (0, 1]'),
      ([*ck, '--prompt', 'x', '--temperature', '-1'], 'temperature must be >= 0'),
      ([*ck, '--prompt', 'x', '--greedy', '--top_k', '5'], '--greedy cannot be combined'),
      ([*ck, '--prompt', 'x', '--max_new_tokens', '0'], 'max_new_tokens must be >= 1'),
      ([*ck, '--prompt', 'x', '--max_new_tokens', '40000'], 'max_seq_len'),
      ([*ck, '--prompt', 'x', '--cache_dtype', 'int4'], '--cache_dtype=int4'),
      ([*ck, '--prompt', 'x', '--greedy', '--min_p', '0.1'], '--greedy cannot be combined with '
       '--min_p'),
      ([*ck, '--prompt', 'x', '--repetition_penalty', '0'], '--repetition_penalty must be a '
       'finite number > 0 (1.0: off), got 0.0'),
      ([*ck, '--prompt', 'x', '--greedy', '--presence_penalty', '2.5'], '--presence_penalty must '
       'be in [-2, 2] (0: off), got 2.5'),
      ([*ck, '--prompt', 'x', '--top_logprobs', '3'], '--top_logprobs 3 needs --logprobs'),
  ]
  for args, pattern in cases:
    _assert_one_line_error(_run(*args), pattern)
  # A prompt longer than the chat session's cache.
  _assert_one_line_error(_run(*ck, '--chat', '--greedy', '--prompt', 'word ' * 9000, stdin=''),
                         'exceeds cache_length')


def test_tokenizer_larger_than_the_model_fails_before_loading(tmp_path):
  """--tokenizer with more pieces than the checkpoint's embedding rows: one line, naming both."""
  from flax import nnx
  from gemma_jax.config import get_preset
  from gemma_jax.transformer import Transformer
  small = Transformer(get_preset('tiny-gemma1').replace(vocab_size=64), rngs=nnx.Rngs(0))
  checkpoint.save_params(small, tmp_path / 'small')
  tokenizer = _REPO / 'data' / 'quickstart_tokenizer.model'  # 128 pieces
  _assert_one_line_error(
      _run('--ckpt', str(tmp_path / 'small'), '--tokenizer', str(tokenizer), '--prompt', 'x'),
      'the tokenizer has 128 pieces but the model has only 64 embedding rows')
