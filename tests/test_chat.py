"""gemma_jax.chat: multi-turn sessions on the real Gemma 3 270M keep their cache, and encode every
turn as training data does (`Tokenizer.encode_chat`); on a Gemma 4 tokenizer (a small one trained
in test_tokenizer, a random tiny-gemma4) every turn is fed in Gemma 4's format."""

import numpy as np
import pytest
from flax import nnx

from gemma_jax.config import get_preset
from gemma_jax.sampler import Sampler
from gemma_jax.sampling import SamplingParams
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.transformer import Transformer, flat_params, model_from_params
from test_tokenizer import small_tokenizer_model


def _reply_ids(reply):
  """The ids a chat keeps for a model turn's content: what was sampled, without the stop token
  (the turn's closing end of turn, <end_of_turn> or Gemma 4's <turn|>, replaces it)."""
  return reply.tokens[:-1] if reply.finish_reason == 'stop' else reply.tokens


def _encode_chat_as_sampled(tok, messages, replies, **kwargs):
  """`encode_chat(messages)` with each model turn's content ids (its target-mask run before the
  closing <end_of_turn>) replaced by the ids the model sampled, which the reply's text need not
  re-encode to."""
  ids, mask = tok.encode_chat(messages, **kwargs)
  out, runs, i = [], 0, 0
  while i < len(ids):
    if not mask[i]:
      out.append(ids[i])
      i += 1
      continue
    j = i
    while j < len(ids) and mask[j]:
      j += 1
    assert ids[j - 1] == tok.end_of_turn_id
    out += _reply_ids(replies[runs]) + [tok.end_of_turn_id]
    runs, i = runs + 1, j
  assert runs == len(replies)
  return out


def test_real_chat_keeps_its_cache(real):
  """Turn 2 from the cache equals sampling the whole encoded conversation from scratch."""
  _, tok, s, _ = real
  chat = s.chat()
  first = chat.send('Name a color.', 12)
  used = chat.tokens_used
  second = chat.send('And a fruit?', 12)
  assert chat.tokens_used > used and len(chat.history) == 4
  # The same conversation as token ids: the reply's own tokens, closed by <end_of_turn>.
  first_ids = tok.encode_chat(chat.history[:1], add_generation_prompt=True)[0]
  ids = (first_ids + _reply_ids(first) + [tok.end_of_turn_id]
         + tok.encode('\n', add_bos=False)
         + tok.encode_chat(chat.history[2:3], add_generation_prompt=True, add_bos=False)[0])
  assert s.sample([ids], 12)[0].tokens == second.tokens
  assert first.tokens == s.sample([first_ids], 12)[0].tokens
  with pytest.raises(ValueError, match='the conversation so far'):
    chat.send('x ' * 300, 12)


def test_real_chat_first_turn_is_encode_chat(real):
  """A user message starting with a newline: encode_chat keeps the header's newline apart, where
  encode(format_chat(...)) merges the two into one token."""
  _, tok, s, _ = real
  user = {'role': 'user', 'content': '\nName a color.'}
  want = tok.encode_chat([user], add_generation_prompt=True)[0]
  assert want != tok.encode(tok.format_chat([user]))
  chat = s.chat()
  reply = chat.send(user['content'], 4)
  assert chat.ids == want + _reply_ids(reply) + [tok.end_of_turn_id]


def test_real_chat_ids_are_encode_chat_of_the_conversation(real):
  """After two turns, the next turn is fed exactly as encode_chat writes the whole conversation
  (system message folded in, newline-led messages), with the replies as sampled."""
  _, tok, s, _ = real
  system = {'role': 'system', 'content': 'Answer in one word.'}
  chat = s.chat(system=system['content'])
  replies = [chat.send(m, 6) for m in ('Name a color.', '\nAnd a fruit?')]
  next_user = {'role': 'user', 'content': '\n\nAnd a tree?'}
  messages = [system] + chat.history + [next_user]
  want = _encode_chat_as_sampled(tok, messages, replies, add_generation_prompt=True)
  assert tok.encode(tok.format_chat(messages)) != tok.encode_chat(
      messages, add_generation_prompt=True)[0]  # a different encoding would not match
  third = chat.send(next_user['content'], 6)
  assert chat.ids == want + _reply_ids(third) + [tok.end_of_turn_id]


def _random_model(config, seed=0):
  """A random `config` model from numpy draws (one trace, no per-parameter random kernels)."""
  rng = np.random.default_rng(seed)
  abstract = flat_params(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  return model_from_params(config, {name: rng.normal(0.0, 0.1, x.shape).astype(np.float32)
                                    for name, x in abstract.items()})


@pytest.mark.parametrize('penalty', [1.0, 1.5], ids=['greedy', 'repetition_penalty'])
def test_gemma4_chat_feeds_gemma4_turns(penalty):
  """Turn after turn, a session on a Gemma 4 tokenizer holds <bos>, the system turn, then
  <|turn>user\\n...<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>, the reply as sampled
  and <turn|>; its cache holds exactly those ids (the second reply equals sampling them afresh,
  also with a repetition penalty, which counts the whole conversation as `sample` counts its
  prompt)."""
  tok = Tokenizer(small_tokenizer_model())
  s = Sampler(_random_model(get_preset('tiny-gemma4').replace(vocab_size=tok.vocab_size)), tok,
              cache_length=128)
  text = lambda x: tok.encode(x, add_bos=False)
  turn, end = tok.piece_to_id('<|turn>'), tok.piece_to_id('<turn|>')

  def user_turn(message):
    return ([turn] + text('user\n') + text(message) + [end] + text('\n') + [turn] + text('model\n')
            + [tok.piece_to_id('<|channel>')] + text('thought\n') + [tok.piece_to_id('<channel|>')])

  system = 'Answer in one word.'
  rule = SamplingParams(temperature=0.0, repetition_penalty=penalty)
  chat = s.chat(system=system, sampling=rule)
  before = [tok.bos_id, turn] + text('system\n') + text(system) + [end] + text('\n')
  replies = []
  # The second turn appends 32 tokens to the cache (one prefill shape to compile).
  for message in ('Name a color.', 'Name a fruit. Answer in one word.'):
    prompt = before + user_turn(message)
    replies.append(chat.send(message, 4))
    assert chat.ids == prompt + _reply_ids(replies[-1]) + [end]
    before = chat.ids + text('\n')
  assert s.sample([prompt], 4, sampling=rule)[0].tokens == replies[-1].tokens
  # The same ids as encode_chat writes the conversation, with the replies as sampled.
  assert chat.ids + text('\n') == _encode_chat_as_sampled(
      tok, [{'role': 'system', 'content': system}] + chat.history, replies)
