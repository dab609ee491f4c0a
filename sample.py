r"""Samples from, or chats with, a gemma_jax checkpoint.

  python sample.py --ckpt DIR --prompt "The capital of France is" [--prompt TEXT ...]
      [--max_new_tokens 64] [--greedy | --temperature 1.0 --top_k 64 --top_p 0.95 --min_p 0.05]
      [--repetition_penalty 1.1] [--frequency_penalty 0.5] [--presence_penalty 0.5] [--seed 0]
      [--chat] [--output_json out.json [--logprobs [--top_logprobs N]]] [--tokenizer PATH]
      [--cache_dtype int8|bfloat16|float32] [--quantize int8|int4 [--group_size G]]

Text streams to stdout as it is generated (several prompts run as one batch and are printed one
after another, each streaming once the ones before it are complete). --chat runs a multi-turn
session in Gemma's chat format: each --prompt, then each line of stdin (a terminal or a pipe), is a
user turn. Without --greedy or sampling flags, Gemma's recommended sampling is used (temperature
1.0, top_k 64, top_p 0.95); the penalties (gemma_jax.sampling.SamplingParams: off by default) also
apply to --greedy, which takes the argmax of the penalised logits. --logprobs adds to each of
--output_json's completions `logprobs`, each generated token's log-prob under the model's raw
logits (one float per entry of `tokens`), and --top_logprobs N `top_logprobs`, per token the N most
likely [token id, log-prob] pairs. The tokenizer defaults to DIR/tokenizer.model. One line on
stderr gives the size of the KV cache the sampler allocates (--cache_dtype int8 about halves a
bfloat16 cache: keys and values quantized per token and head). --quantize holds the weights in int8
or int4 (gemma_jax.quant, groups of --group_size along each weight's contraction axis; default 32)
from load on; a checkpoint written by `gemma_jax.convert --quantize` is read quantized as it is.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

_CKPT = flags.DEFINE_string('ckpt', None, 'Checkpoint directory (save_params / gemma_jax.convert).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None,
                                 'SentencePiece model; default DIR/tokenizer.model.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeatable); in --chat, a user turn.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per prompt or turn.')
_GREEDY = flags.DEFINE_bool('greedy', False, 'Greedy decoding (argmax).')
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'Sampling temperature (default 1.0).')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens (default 64; 0: all).')
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus probability in (0, 1] (default 0.95).')
_MIN_P = flags.DEFINE_float('min_p', None, 'Drop tokens less than min_p times as likely as the '
                            'most likely one, in [0, 1] (default 0: off).')
_REPETITION_PENALTY = flags.DEFINE_float(
    'repetition_penalty', None, 'Divide (multiply if negative) the logits of tokens in the prompt '
    'or generated so far by this, > 0 (default 1.0: off).')
_FREQUENCY_PENALTY = flags.DEFINE_float(
    'frequency_penalty', None, 'Subtract this per earlier occurrence of a token in the output, in '
    '[-2, 2] (default 0: off).')
_PRESENCE_PENALTY = flags.DEFINE_float(
    'presence_penalty', None, 'Subtract this from tokens already in the output, in [-2, 2] '
    '(default 0: off).')
_LOGPROBS = flags.DEFINE_bool('logprobs', False, 'Add each generated token\'s log-prob to '
                              '--output_json (not with --chat).')
_TOP_LOGPROBS = flags.DEFINE_integer('top_logprobs', 0, 'With --logprobs: also the N most likely '
                                     'tokens and their log-probs at each step.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_CHAT = flags.DEFINE_bool('chat', False, 'Interactive multi-turn chat (stdin may be a pipe).')
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Write {"completions": [...]} here.')
_CACHE_DTYPE = flags.DEFINE_enum('cache_dtype', None, ['int8', 'bfloat16', 'float32'],
                                 'KV cache storage (int8: quantized per token and head); default: '
                                 'the compute dtype of the checkpoint.')
_QUANTIZE = flags.DEFINE_enum('quantize', None, ['int8', 'int4'],
                              'Quantize the weights at load (gemma_jax.quant).')
_GROUP_SIZE = flags.DEFINE_integer('group_size', None, '--quantize: values per scale along the '
                                   'contraction axis (default 32; 0: per output channel).')
flags.mark_flag_as_required('ckpt')

CHAT_CACHE_LENGTH = 8192  # tokens a chat session may hold (capped by the model's max_seq_len)


class UsageError(ValueError):
  """A bad flag or input, reported as one `sample.py: error:` line."""


def _fail(message: str, code: int = 1):
  print(f'sample.py: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(e, code=2)


def sampling_params():
  """SamplingParams from the flags; --greedy excludes the sampling flags, not the penalties."""
  from gemma_jax.sampler import SamplingParams
  given = [f'--{n}' for n, v in [('temperature', _TEMPERATURE.value), ('top_k', _TOP_K.value),
                                  ('top_p', _TOP_P.value), ('min_p', _MIN_P.value)]
           if v is not None]
  penalties = {f.name: f.value for f in (_REPETITION_PENALTY, _FREQUENCY_PENALTY,
                                         _PRESENCE_PENALTY) if f.value is not None}
  if _GREEDY.value:
    if given:
      raise UsageError(f'--greedy cannot be combined with {", ".join(given)}.')
    rule = dict(temperature=0.0)
  else:
    rule = dict(temperature=1.0 if _TEMPERATURE.value is None else _TEMPERATURE.value,
                top_k=64 if _TOP_K.value is None else _TOP_K.value,
                top_p=0.95 if _TOP_P.value is None else _TOP_P.value,
                min_p=0.0 if _MIN_P.value is None else _MIN_P.value)
  try:
    return SamplingParams(**rule, **penalties)
  except ValueError as e:  # name the flag: 'SamplingParams: top_p must ...' -> '--top_p must ...'
    message = str(e).removeprefix('SamplingParams: ')
    raise UsageError(f'--{message}' if message.split()[0] in rule | penalties else message)


def cache_length_for(prompt_lengths, max_new_tokens: int, max_seq_len: int) -> int:
  """Cache slots for a batch: the longest prompt plus the budget, rounded up to 128 (fewer
  shapes to compile) but never past the model's max_seq_len, which the Sampler refuses."""
  return min(-(-(max(prompt_lengths) + max_new_tokens) // 128) * 128, max_seq_len)


def _size(n: int) -> str:
  """Bytes in binary units with one decimal: '135.1 KiB', '54.1 MiB', '1.2 GiB'."""
  for power, unit in ((3, 'GiB'), (2, 'MiB'), (1, 'KiB')):
    if n >= 1024 ** power:
      return f'{n / 1024 ** power:.1f} {unit}'
  return f'{n} B'


def cache_summary(sampler, batch_size: int) -> str:
  """One line on the KV cache `sampler` allocates for `batch_size` rows (printed to stderr)."""
  c = sampler.model.config
  line = (f'KV cache: {_size(sampler.cache_bytes(batch_size))} for batch {batch_size} x '
          f'{sampler.cache_length} tokens')
  if c.num_kv_shared_layers:
    line += (f' ({c.num_kv_shared_layers} of {c.num_layers} layers share keys and values: '
             'no cache)')
  return line


def _load(ckpt: str, tokenizer_path: str | None):
  from gemma_jax import checkpoint
  from gemma_jax.tokenizer import Tokenizer
  if not os.path.isdir(ckpt):
    raise UsageError(f'--ckpt {ckpt}: no such directory.')
  tokenizer_path = tokenizer_path or checkpoint.tokenizer_path(ckpt)
  if tokenizer_path is None:
    raise UsageError(f'--ckpt {ckpt} has no tokenizer.model; pass --tokenizer PATH.')
  tokenizer = Tokenizer(tokenizer_path)
  config = checkpoint.load_config(ckpt)  # checked before any weight is read
  tokenizer.check_fits(config.vocab_size, f'model {config.name!r} in {ckpt}',
                       'Pass the tokenizer of this checkpoint with --tokenizer.')
  if _GROUP_SIZE.value is not None and not _QUANTIZE.value:
    raise UsageError('--group_size needs --quantize int8|int4.')
  if _QUANTIZE.value:  # checked on the model's shapes before any weight is read
    from flax import nnx
    from gemma_jax import quant
    from gemma_jax.transformer import Transformer
    try:
      nnx.eval_shape(lambda: quant.quantize(Transformer(config, rngs=nnx.Rngs(0)),
                                            _QUANTIZE.value, _GROUP_SIZE.value))
    except ValueError as e:
      raise UsageError(f'--quantize {_QUANTIZE.value} --group_size {_GROUP_SIZE.value}: {e}')
  model = checkpoint.load_params(ckpt)
  if _QUANTIZE.value:
    if quant.is_quantized(model):
      raise UsageError(f'--ckpt {ckpt} is already quantized ({quant.describe(model)}); drop '
                       '--quantize.')
    quant.quantize(model, _QUANTIZE.value, _GROUP_SIZE.value)
    print(quant.describe(model), file=sys.stderr, flush=True)
  return model, tokenizer


def _print(text: str):
  sys.stdout.write(text)
  sys.stdout.flush()


def run_batch(model, tokenizer, prompts, sampling):
  """Samples every prompt in one batch, streaming them in order; returns the Completions."""
  from gemma_jax.sampler import Sampler
  max_new = _MAX_NEW.value
  lengths = [len(tokenizer.encode(p)) for p in prompts]
  if max(lengths) + max_new > model.config.max_seq_len:
    raise UsageError(f'the longest prompt ({max(lengths)} tokens) + --max_new_tokens ({max_new}) '
                     f'exceeds the model\'s max_seq_len ({model.config.max_seq_len}).')
  cache_length = cache_length_for(lengths, max_new, model.config.max_seq_len)
  sampler = Sampler(model, tokenizer, cache_length=cache_length, cache_dtype=_CACHE_DTYPE.value)
  print(cache_summary(sampler, len(prompts)), file=sys.stderr, flush=True)
  stream = sampler.sample(prompts, max_new, sampling=sampling, seed=_SEED.value, stream=True,
                          return_logprobs=_LOGPROBS.value, top_logprobs=_TOP_LOGPROBS.value)
  shown, pending = 0, [''] * len(prompts)  # rows after `shown` wait in `pending`

  def header(i):
    if len(prompts) > 1:
      _print(f'{"" if i == 0 else chr(10)}[{i + 1}/{len(prompts)}] {prompts[i]}')

  def flush(final):
    nonlocal shown
    while shown < len(prompts):
      _print(pending[shown])
      pending[shown] = ''
      if not (final or stream.done[shown]):
        return
      shown += 1
      if shown < len(prompts):
        header(shown)

  header(0)
  for pieces in stream:
    for i, piece in enumerate(pieces):
      pending[i] += piece
    flush(final=False)
  flush(final=True)
  _print('\n')
  return stream.result


def run_chat(model, tokenizer, first_turns, sampling):
  """Chat turns from --prompt, then stdin lines until EOF; returns one Completion per turn."""
  from gemma_jax.sampler import Sampler
  cache_length = min(model.config.max_seq_len, CHAT_CACHE_LENGTH)
  sampler = Sampler(model, tokenizer, cache_length=cache_length, cache_dtype=_CACHE_DTYPE.value)
  print(cache_summary(sampler, 1), file=sys.stderr, flush=True)
  session = sampler.chat(sampling=sampling, seed=_SEED.value)
  interactive = sys.stdin.isatty()

  def turns():
    yield from first_turns
    while True:
      try:
        line = input('> ' if interactive else '')
      except EOFError:
        return
      if line.strip():
        yield line

  replies = []
  for message in turns():
    if not interactive or message in first_turns:
      _print(f'> {message}\n')
    stream = session.send(message, _MAX_NEW.value, stream=True)
    for piece in stream:
      _print(piece)
    _print('\n')
    replies.append(stream.result)
  return replies


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; pass prompts with --prompt TEXT.', code=2)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  try:
    sampling = sampling_params()
    if _MAX_NEW.value < 1:
      raise UsageError(f'--max_new_tokens must be >= 1, got {_MAX_NEW.value}.')
    if not _PROMPT.value and not _CHAT.value:
      raise UsageError('give at least one --prompt TEXT (or --chat).')
    if _LOGPROBS.value and _CHAT.value:
      raise UsageError('--logprobs is not available with --chat.')
    if _TOP_LOGPROBS.value and not _LOGPROBS.value:
      raise UsageError(f'--top_logprobs {_TOP_LOGPROBS.value} needs --logprobs.')
    if _TOP_LOGPROBS.value < 0:
      raise UsageError(f'--top_logprobs must be >= 0, got {_TOP_LOGPROBS.value}.')
    model, tokenizer = _load(_CKPT.value, _TOKENIZER.value)
    if _CHAT.value:
      completions = run_chat(model, tokenizer, list(_PROMPT.value), sampling)
    else:
      completions = run_batch(model, tokenizer, list(_PROMPT.value), sampling)
  except (ValueError, OSError) as e:
    _fail(e)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, 'w') as f:
      json.dump({'completions': [_json(c) for c in completions]}, f, indent=2)


def _json(completion) -> dict:
  """One completion in --output_json: prompt, text, tokens (and logprobs, top_logprobs)."""
  out = {'prompt': completion.prompt, 'text': completion.text, 'tokens': completion.tokens}
  if completion.logprobs is not None:
    out['logprobs'] = completion.logprobs
  if completion.top_logprobs is not None:
    out['top_logprobs'] = [[list(pair) for pair in step] for step in completion.top_logprobs]
  return out


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
