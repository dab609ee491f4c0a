"""Multi-turn chat sessions in Gemma's control-token format (Gemma 1-3 or Gemma 4, whichever the
tokenizer has; see gemma_jax.tokenizer), on a `Sampler`, keeping the KV cache across turns so each
turn feeds only its new tokens.

A session drives its sampler's prefill and decode loop (gemma_jax.sampler) and encodes every turn
with `Tokenizer.encode_chat`, the encoding training data uses, so a conversation costs the same
ids here as in the data the model was tuned on.
"""

from __future__ import annotations

import jax

from gemma_jax.sampler import Completion, SampleStream, Sampler, stream_delta
from gemma_jax.sampling import GREEDY, SamplingParams


class ChatSession:
  """A conversation in Gemma's control-token format that keeps its KV cache across turns.

  Turns are tokenised by `Tokenizer.encode_chat`, the encoding training data and exact-match
  evaluation use, with each model turn's content replaced by the tokens actually sampled. Each
  `send` appends only the new tokens to the cache -- the previous reply's closing end of turn and
  newline, and the new user turn with the model turn's header -- and decodes the reply until the
  end of turn or `<eos>`. In Gemma 1-3 that is `<end_of_turn>\\n<start_of_turn>user\\n...
  <end_of_turn>\\n<start_of_turn>model\\n`; in Gemma 4 `<turn|>\\n<|turn>user\\n...<turn|>\\n
  <|turn>model\\n<|channel>thought\\n<channel|>` (a `system` message is Gemma 4's first turn, and
  is folded into the first user turn in Gemma 1-3). `history` holds the messages; `ids` the
  conversation's token ids; `tokens_used` the cache slots taken (out of `sampler.cache_length`;
  the first turn's prefill padding included).
  """

  def __init__(self, sampler: Sampler, *, system: str | None = None,
               sampling: SamplingParams = GREEDY, seed: int = 0):
    if sampler.tokenizer is None:
      raise ValueError('ChatSession needs a Sampler with a tokenizer.')
    self.sampler, self.system, self.sampling, self.seed = sampler, system, sampling, seed
    self.history: list[dict[str, str]] = []
    self._cache = None
    self._fed: list[int] = []  # ids in the cache, in order (without the prefill padding)
    self._pending: list[int] = []  # ids of the last reply not yet in the cache
    self._position = 0  # position of the first pending token
    self.tokens_used = 0
    self._busy = False

  @property
  def ids(self) -> list[int]:
    """The conversation so far as token ids (a copy): those in the cache, then the pending ones
    the next `send` feeds first (the last reply's closing end of turn, `tokenizer.end_of_turn_id`,
    preceded by its last sampled token when the reply was cut by length)."""
    return self._fed + self._pending

  def send(self, message: str, max_new_tokens: int = 256, *,
           stream: bool = False) -> Completion | SampleStream:
    """Adds a user turn and returns the model's reply (`stream=True`: a `SampleStream` of str
    pieces whose `.result` is the Completion). Raises ValueError when the conversation would
    overflow the cache."""
    s, tok = self.sampler, self.sampler.tokenizer
    if self._busy:
      raise ValueError('ChatSession: consume the previous streamed reply before sending again.')
    if not isinstance(message, str):
      raise ValueError(f'ChatSession.send: message must be a str, got {type(message).__name__}.')
    user = {'role': 'user', 'content': message}
    if self._cache is None:
      msgs = ([{'role': 'system', 'content': self.system}] if self.system is not None else [])
      ids = tok.encode_chat(msgs + [user], add_generation_prompt=True)[0]
    else:
      # encode_chat writes a newline after every end of turn; the pending ids end with one.
      ids = (self._pending + tok.encode('\n', add_bos=False)
             + tok.encode_chat([user], add_generation_prompt=True, add_bos=False)[0])
    s._check_length(self.tokens_used + len(ids), max_new_tokens, 'the conversation so far')
    if self._cache is None:
      cache = s._prefill_fresh([ids], max_new_tokens)
    else:
      cache = s._prefill_more(self._cache, ids[:-1], self._position)
    self._cache, self._busy = None, True  # donated: unusable until this turn completes
    key = jax.random.fold_in(jax.random.key(self.seed), len(self.history))[None]
    state = s._start(cache, [ids[-1]], [self._position + len(ids) - 1], key, max_new_tokens,
                     False)
    stop_ids, _ = s._stops(None)
    # A repetition penalty counts the whole conversation, as generate() on its ids would.
    steps = s._run(state, max_new_tokens, self.sampling, stop_ids, [],
                   s.stream_chunk if stream else None, prompt_ids=[self._fed + ids])

    def finish(state, tokens_BO, step):
      reply = s._completion(message, tokens_BO[0, :step], None, stop_ids, [])
      self._cache = state.cache
      self.tokens_used = int(state.cache['end_index'])
      # The loop fed the turn's ids and every sampled token but the last.
      self._fed += ids + [int(t) for t in tokens_BO[0, :step - 1]]
      self._position += len(ids) + step - 1
      last = reply.tokens[-1]
      # A stop token (end of turn or <eos>) is replaced by the end of turn closing the turn.
      self._pending = ([last] if reply.finish_reason == 'length' else []) + [tok.end_of_turn_id]
      self.history += [user, {'role': 'model', 'content': reply.text}]
      self._busy = False
      return reply

    if not stream:
      for chunk_out in steps:
        pass
      return finish(*chunk_out[:3])

    def pieces():
      emitted = ['']
      for chunk_out in steps:
        text = s._completion(message, chunk_out[1][0, :chunk_out[2]], None, stop_ids, []).text
        yield stream_delta(emitted, 0, text), [bool(chunk_out[3][0])]
      return finish(*chunk_out[:3])

    return SampleStream(pieces())
