"""KV-cached sampling: batched prefill, one compiled decode loop, chat sessions (the sampling
rules, `SamplingParams`, are gemma_jax/sampling.py and importable from here too).

How a call runs. Prompts are tokenized (BOS once), left-padded to a length bucket (segment id 0 on
the padding, true positions on the real tokens) and all but each row's last token are written to
the cache in one forward (`_prefill`; its logits are dead code, so XLA never computes the prefix's
[B, T, V] output head). Then `_decode` (gemma_jax/decode_loop.py), a single jitted
`lax.while_loop`, feeds the pending token of every row, samples the next one and stops when every
row has stopped or the step limit is reached. The first iteration feeds the prompt's last token, so
one compiled program serves all steps. Compiled functions are module-level `jax.jit`s keyed by
(graphdef, shapes, sampling rules), so repeated calls never retrace; the cache and loop state are
donated.

Streaming decodes in chunks of `stream_chunk` steps with the same compiled `_decode` (its step
limit is a traced argument), handing text to the caller between chunks; non-streaming calls run
the whole budget in one call, with no host round trip per token. Stop strings are matched on the
host between chunks (chunks of 16 steps when not streaming).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax import attention
from gemma_jax.decode_loop import DecodeState
from gemma_jax.decode_loop import bucket as _bucket
from gemma_jax.decode_loop import decode as _decode
from gemma_jax.sampling import GREEDY, SamplingParams

_STOP_STRING_CHUNK = 16  # decode steps between host-side stop-string checks
_STOP_IDS_PAD = 8  # stop-id arrays are padded (with -1) to a multiple of this, bounding recompiles


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@functools.partial(jax.jit, static_argnames=('graphdef',), donate_argnames=('cache',))
def _prefill(graphdef, params, cache, tokens_BT, positions_BT, segment_ids_BT):
  """Writes T tokens per row into the cache; the logits are unused (and not computed)."""
  _, cache = nnx.merge(graphdef, params)(tokens_BT, positions_BT, segment_ids_BT, cache)
  return cache


@dataclasses.dataclass
class Completion:
  """One prompt's result.

  tokens: the generated ids, ending with the stop token (or the token completing a stop string)
    when the row stopped; text: their decoded text without that stop token / stop string (None
    without a tokenizer); finish_reason: 'stop' or 'length'; logits: [len(tokens), V] float32,
    the logits each token was drawn from (only with `return_logits=True`); logprobs: each token's
    log-prob under the model's raw logits (log_softmax before penalties, temperature and the
    other warpers: vLLM's default), aligned with `tokens` (only with `return_logprobs=True`);
    top_logprobs: per token, the `top_logprobs` most likely [(token id, log-prob), ...], most
    likely first (only with `top_logprobs` > 0).
  """

  prompt: str | list[int]
  text: str | None
  tokens: list[int]
  finish_reason: str
  logits: np.ndarray | None = None
  logprobs: list[float] | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None


class SampleStream:
  """Iterator returned by `stream=True` calls: yields the new text after each decoded chunk (for
  `Sampler.sample` a list with one piece per prompt, '' where nothing is new; for
  `ChatSession.send` a str). `.done[i]` says whether row i has finished so far; once exhausted,
  `.result` holds what the non-streaming call returns."""

  def __init__(self, gen: Iterator[tuple[Any, list[bool]]]):
    self._gen = gen
    self.done: list[bool] = []
    self.result: Any = None

  def __iter__(self) -> Iterator[Any]:
    while True:
      try:
        value, self.done = next(self._gen)
      except StopIteration as stop:
        self.result = stop.value
        return
      yield value


class Sampler:
  """Samples from a `Transformer` with a KV cache of `cache_length` tokens per row.

  `cache_length` is at most the model's `max_seq_len`: later positions were never trained. The
  sampler holds the model's parameters as they are at construction (create a new Sampler to
  sample from updated weights). `tokenizer` (a `gemma_jax.tokenizer.Tokenizer`) may be None: then
  prompts must be token-id lists, nothing stops a row but `stop_tokens`, and texts are None.
  `cache_dtype`: the KV cache's dtype (default: the compute dtype); 'int8' quantizes keys and
  values per token and head (gemma_jax.attention). `stream_chunk`: decode steps per piece.
  """

  def __init__(self, model, tokenizer=None, *, cache_length: int = 1024, cache_dtype=None,
               stream_chunk: int = 4):
    if not _is_int(cache_length) or cache_length < 2:
      raise ValueError(f'Sampler: cache_length must be an integer >= 2, got {cache_length!r}.')
    if not _is_int(stream_chunk) or stream_chunk < 1:
      raise ValueError(f'Sampler: stream_chunk must be an integer >= 1, got {stream_chunk!r}.')
    max_seq_len = model.config.max_seq_len
    if cache_length > max_seq_len:
      # Positions past max_seq_len were never trained; the reference RoPE tables stop there.
      raise ValueError(f'Sampler: cache_length={cache_length} exceeds the model\'s '
                       f'max_seq_len={max_seq_len}; use a cache_length <= {max_seq_len}.')
    if jax.process_count() > 1:
      raise ValueError('Sampler: sampling runs in one process (over any number of its devices); '
                       f'this job has {jax.process_count()} processes.')
    self.model = model
    self.tokenizer = tokenizer
    self.cache_length = cache_length
    self.cache_dtype = None if cache_dtype is None else attention.cache_dtype(
        cache_dtype, 'Sampler: cache_dtype')
    self.stream_chunk = stream_chunk
    self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
    self._graphdef, self._params = nnx.split(model)

  def cache_bytes(self, batch_size: int = 1) -> int:
    """Bytes of the KV cache this sampler allocates for `batch_size` rows of `cache_length`
    tokens: keys, values (int8: and scales), slot positions of every layer that keeps a cache
    (Gemma 4's KV-shared layers keep none), read from shapes; nothing is allocated."""
    shapes = jax.eval_shape(
        lambda: self.model.init_cache(batch_size, self.cache_length, self.cache_dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  def encode(self, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt: text gets BOS prepended once; an id list is used as is."""
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError('Sampler has no tokenizer: pass prompts as lists of token ids.')
      return self.tokenizer.encode(prompt, add_bos=True)
    ids = [int(i) for i in prompt]
    if not ids:
      raise ValueError('Sampler: a token-id prompt is empty; it needs at least one token.')
    return ids

  def _stops(self, stop_tokens) -> tuple[list[int], list[str]]:
    """(stop ids, stop strings): eos and end_of_turn (with a tokenizer) plus `stop_tokens`."""
    ids = [] if self.tokenizer is None else [self.tokenizer.eos_id, self.tokenizer.end_of_turn_id]
    strings = []
    for s in stop_tokens or ():
      if isinstance(s, str):
        if not s or self.tokenizer is None:
          raise ValueError(f'Sampler: stop string {s!r} must be non-empty and needs a tokenizer.')
        strings.append(s)
      else:
        ids.append(int(s))
    return sorted(set(ids)), strings

  def _check_length(self, used: int, max_new_tokens: int, what: str) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
      raise ValueError(f'Sampler: max_new_tokens must be a positive integer, got '
                       f'{max_new_tokens!r}.')
    if used + max_new_tokens > self.cache_length:
      raise ValueError(
          f'Sampler: {what} ({used} tokens) + max_new_tokens ({max_new_tokens}) exceeds '
          f'cache_length={self.cache_length}; shorten it or create the Sampler with a larger '
          'cache_length.')

  def _prefill(self, cache, tokens_BT, positions_BT, segment_ids_BT):
    return _prefill(self._graphdef, self._params, cache, jnp.asarray(tokens_BT, jnp.int32),
                    jnp.asarray(positions_BT, jnp.int32), jnp.asarray(segment_ids_BT, jnp.int32))

  def _prefill_fresh(self, ids: list[list[int]], max_new_tokens: int):
    """A new cache holding every row's prompt but its last token, left-padded to a bucket."""
    B, longest = len(ids), max(len(x) for x in ids)
    cache = self.model.init_cache(B, self.cache_length, self.cache_dtype)
    if longest == 1:
      return cache
    # The bucket never exceeds what the cache can hold next to max_new_tokens decode steps.
    T = min(_bucket(longest - 1), self.cache_length - max_new_tokens)
    tokens = np.full((B, T), self.pad_id, np.int32)
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for i, x in enumerate(ids):
      n = len(x) - 1
      if n:
        tokens[i, T - n:], segment_ids[i, T - n:], positions[i, T - n:] = x[:-1], 1, np.arange(n)
    return self._prefill(cache, tokens, positions, segment_ids)

  def _prefill_more(self, cache, ids: list[int], position: int):
    """Appends one row's tokens to a cache in power-of-two chunks (no padding, which would evict
    live entries from the local layers' ring buffers), so at most log2(cache_length) shapes."""
    start = 0
    while start < len(ids):
      n = 1 << ((len(ids) - start).bit_length() - 1)
      pos = np.arange(position + start, position + start + n)[None]
      cache = self._prefill(cache, [ids[start:start + n]], pos, np.ones_like(pos))
      start += n
    return cache

  def _start(self, cache, last_B, position_B, keys_B, max_new_tokens, return_logits,
             return_logprobs=False, top_logprobs=0) -> DecodeState:
    """The decode state that feeds each row's last prompt token at `position_B`."""
    return DecodeState.create(
        cache, last_B, position_B, keys_B, max_new_tokens=max_new_tokens, pad_id=self.pad_id,
        vocab_size=self.model.config.vocab_size, return_logits=return_logits,
        return_logprobs=return_logprobs, top_logprobs=top_logprobs)

  def _run(self, state: DecodeState, max_new_tokens, sampling, stop_ids, stop_strings, chunk,
           prompt_ids=None):
    """Decodes until done; yields (state, tokens_BO, step, done_B), the last three on the host,
    after each chunk (one chunk of the whole budget when `chunk` is None). prompt_ids: each
    row's ids so far, which a repetition penalty counts (None: only the generated ones)."""
    state = state.with_history(sampling, self.model.config.vocab_size, prompt_ids)
    n_stop = max(_STOP_IDS_PAD, -(-len(stop_ids) // _STOP_IDS_PAD) * _STOP_IDS_PAD)
    stop_arr = jnp.asarray(stop_ids + [-1] * (n_stop - len(stop_ids)), jnp.int32)
    step = 0
    while True:
      limit = max_new_tokens if chunk is None else min(step + chunk, max_new_tokens)
      state = _decode(self._graphdef, self._params, state, stop_arr, jnp.asarray(limit, jnp.int32),
                      sampling=sampling, pad_id=self.pad_id)
      tokens_BO, step, done_B = jax.device_get((state.tokens_BO, state.step, state.done_B))
      step = int(step)
      if stop_strings:
        hit = np.array([_stop_string_cut(self.tokenizer, row[:step], stop_strings) is not None
                        for row in tokens_BO])
        if (hit & ~done_B).any():
          done_B = done_B | hit
          state = state.replace(done_B=jnp.asarray(done_B))
      yield state, tokens_BO, step, done_B
      if done_B.all() or step >= max_new_tokens:
        return

  def _completion(self, prompt, row, logits, stop_ids, stop_strings, logprobs=None,
                  top=None) -> Completion:
    """Trims one row's generated ids (and its logits, log-probs and top (ids, log-probs) when
    given) at its first stop and decodes the text before it."""
    ids = [int(t) for t in row]
    reason, text_ids = 'length', ids
    stop_at = next((j for j, t in enumerate(ids) if t in stop_ids), None)
    if stop_at is not None:
      ids, text_ids, reason = ids[:stop_at + 1], ids[:stop_at], 'stop'
    text = None if self.tokenizer is None else self.tokenizer.decode(text_ids)
    if stop_strings:
      cut = _stop_string_cut(self.tokenizer, text_ids, stop_strings)
      if cut is not None:
        ids, text, reason = ids[:cut[0]], cut[1], 'stop'
    n = len(ids)
    return Completion(
        prompt, text, ids, reason, None if logits is None else logits[:n],
        None if logprobs is None else [float(x) for x in logprobs[:n]],
        None if top is None else [[(int(t), float(x)) for t, x in zip(*pair)]
                                  for pair in zip(top[0][:n], top[1][:n])])

  def _generate(self, ids, max_new_tokens, sampling, seed, stop_ids, stop_strings=(), chunk=None,
                return_logits=False, return_logprobs=False, top_logprobs=0):
    """Prefills token-id prompts and returns the `_run` generator over decoded chunks."""
    cache = self._prefill_fresh(ids, max_new_tokens)
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(len(ids)))
    state = self._start(cache, [x[-1] for x in ids], [len(x) - 1 for x in ids], keys_B,
                        max_new_tokens, return_logits, return_logprobs, top_logprobs)
    return self._run(state, max_new_tokens, sampling, stop_ids, stop_strings, chunk, ids)

  def sample(self, prompts, max_new_tokens: int = 64, *, sampling: SamplingParams = GREEDY,
             seed: int = 0, stop_tokens: Sequence[int | str] | None = None, stream: bool = False,
             return_logits: bool = False, return_logprobs: bool = False,
             top_logprobs: int = 0) -> list[Completion] | SampleStream:
    """Continues each prompt by up to `max_new_tokens` tokens.

    prompts: a str, or a list of strs (BOS is prepended) or of token-id lists (used as is).
    stop_tokens: extra stop ids or strings; rows always stop at `<eos>` and `<end_of_turn>` when
      the sampler has a tokenizer. Rows stop independently; a finished row emits only padding.
    stream: if True, returns a `SampleStream` of text pieces (`.result`: the completions).
    return_logits: also return, per generated token, the float32 logits it was drawn from.
    return_logprobs: also return each generated token's log-prob under the model's raw logits
      (before penalties and temperature), computed in the decode loop; top_logprobs=n > 0 (with
      return_logprobs) adds the n most likely tokens and their log-probs at each step.
    Returns one `Completion` per prompt, in order. Raises ValueError (before any compute) if the
    list is empty, a prompt plus max_new_tokens does not fit in the cache or top_logprobs is
    out of range.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
      raise ValueError('Sampler.sample: the prompt list is empty.')
    ids = [self.encode(p) for p in prompts]
    lengths = [len(x) for x in ids]
    self._check_length(max(lengths), max_new_tokens, f'prompt #{int(np.argmax(lengths))}')
    if stream and self.tokenizer is None:
      raise ValueError('Sampler.sample: stream=True needs a tokenizer to produce text.')
    vocab_size = self.model.config.vocab_size
    if not _is_int(top_logprobs) or not 0 <= top_logprobs <= vocab_size:
      raise ValueError(f'Sampler.sample: top_logprobs must be an integer in [0, {vocab_size}] '
                       f'(the vocabulary size), got {top_logprobs!r}.')
    if top_logprobs and not return_logprobs:
      raise ValueError(f'Sampler.sample: top_logprobs={top_logprobs} needs return_logprobs=True.')
    stop_ids, stop_strings = self._stops(stop_tokens)
    chunk = self.stream_chunk if stream else (_STOP_STRING_CHUNK if stop_strings else None)
    steps = self._generate(ids, max_new_tokens, sampling, seed, stop_ids, stop_strings, chunk,
                           return_logits, return_logprobs, top_logprobs)

    def results(state, tokens_BO, step, final):
      """The completions so far; `final`: with the logits / log-probs asked for."""
      logits, logprobs, top_ids, top_logps = jax.device_get(
          (state.logits_BOV, state.logprobs_BO, state.top_ids_BOn, state.top_logprobs_BOn)
          if final else (None,) * 4)
      row = lambda x, i: None if x is None else x[i]
      return [self._completion(p, tokens_BO[i, :step], row(logits, i), stop_ids, stop_strings,
                               row(logprobs, i),
                               None if top_ids is None else (top_ids[i], top_logps[i]))
              for i, p in enumerate(prompts)]

    if not stream:
      for chunk_out in steps:
        pass
      return results(*chunk_out[:3], True)

    # A live row holds back what could be the start of a stop string split across chunks.
    hold = max((len(x) for x in stop_strings), default=1) - 1

    def pieces():
      emitted = [''] * len(ids)
      for state, tokens_BO, step, done_B in steps:
        last = done_B.all() or step >= max_new_tokens
        texts = [c.text if done_B[i] or last else c.text[:len(c.text) - hold]
                 for i, c in enumerate(results(state, tokens_BO, step, False))]
        yield [stream_delta(emitted, i, t) for i, t in enumerate(texts)], [bool(d) for d in done_B]
      return results(state, tokens_BO, step, True)

    return SampleStream(pieces())

  def score(self, prompts, continuations, *, batch_size: int = 16) -> list[np.ndarray]:
    """Per-token float32 log-probs of `continuations[i]` after `prompts[i]` under the weights
    this sampler holds, in batched forwards (gemma_jax.scoring.score: text prompts get BOS, text
    continuations none; raw log-softmax, no sampling rules)."""
    from gemma_jax import scoring  # pylint: disable=g-import-not-at-top (a cycle)
    return scoring.score(nnx.merge(self._graphdef, self._params), self.tokenizer, prompts,
                         continuations, batch_size=batch_size)

  def chat(self, *, system: str | None = None, sampling: SamplingParams = GREEDY,
           seed: int = 0):
    """A new multi-turn `gemma_jax.chat.ChatSession` with its own cache of `cache_length`
    tokens."""
    from gemma_jax.chat import ChatSession  # pylint: disable=g-import-not-at-top (a cycle)
    return ChatSession(self, system=system, sampling=sampling, seed=seed)


def stream_delta(emitted: list[str], i: int, text: str) -> str:
  """The part of row i's `text` not yet emitted (updating `emitted[i]`); holds back an incomplete
  UTF-8 tail. Streamed samples and chat replies both emit through it."""
  text = text.rstrip('\ufffd')
  if not text.startswith(emitted[i]):  # detokenization revised earlier text: wait for more
    return ''
  new, emitted[i] = text[len(emitted[i]):], text
  return new


def _stop_string_cut(tokenizer, ids: Sequence[int], stop_strings: Sequence[str]):
  """(n, text): the first n ids complete the earliest stop string; text is what precedes it.
  None when no stop string occurs in the decoded ids."""
  ids = [int(t) for t in ids]
  text = tokenizer.decode(ids)
  hits = [text.find(s) for s in stop_strings if s in text]
  if not hits:
    return None
  lo, hi = 1, len(ids)  # smallest prefix whose text contains a stop string (monotone in n)
  while lo < hi:
    mid = (lo + hi) // 2
    if any(s in tokenizer.decode(ids[:mid]) for s in stop_strings):
      hi = mid
    else:
      lo = mid + 1
  return lo, text[:min(hits)]
