"""Sampler: logits equal a full forward at every step, parity with transformers' greedy generate
(sliding-window test models of Gemma 2, 3 and 4, and the real Gemma 3 270M), the KV cache's size,
sampling rules, stops, chat, streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gemma_jax import sampler as sampler_lib
from gemma_jax.config import AttentionType, get_preset
from gemma_jax.convert import load_hf
from gemma_jax.sampler import GREEDY, Sampler, SamplingParams
from gemma_jax.transformer import Transformer
from conftest import REAL_NEW, REAL_PROMPTS  # the shared `real` fixture's batch
from hf_models import FAMILIES, NORM_STD, make_hf_model
from test_sampling import renormalised

# Prompts of different lengths (token ids); the longest is longer than the windows (4 or 8).
PROMPTS = [[2, 17, 33, 91, 5], [2, 8], [2] + list(range(40, 60)),
           [2, 77, 78, 79, 80, 81, 82, 83, 84]]
NEW = 40  # > 4 windows: the local layers' ring buffers wrap several times


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


_forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT)[0])


def _full_logits(model, ids):
  """Logits [T, V] of one uncached (jitted) forward over `ids`, right-padded to a multiple of 64
  so that few lengths compile: causal attention lets no padding change an earlier logit."""
  padded = list(ids) + [0] * (-len(ids) % 64)
  return np.asarray(_forward(model, jnp.asarray([padded], jnp.int32))[0, :len(ids)])


TINY = ['tiny-gemma1', 'tiny-gemma2', 'tiny-gemma3', 'tiny-gemma4', 'tiny-gemma4-moe']


@pytest.fixture(scope='module')
def tiny_models():
  return {name: Transformer(get_preset(name), rngs=nnx.Rngs(0)) for name in TINY}


def _hf_window8(family):
  """A random transformers model with window 8; post-norm scales ~5 make the block outputs
  dominate the tied embedding, so greedy decoding does not just repeat the last token."""
  config = FAMILIES[family]()
  config.sliding_window = 8
  config.initializer_range = 0.1
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.normal_(5.0 if 'post' in name else 0.0, NORM_STD)
  model.generation_config.eos_token_id = None
  return model


@pytest.fixture(scope='module', params=['gemma2', 'gemma3', 'gemma4-ple', 'gemma4-moe'])
def hf_pair(request, tmp_path_factory):
  """(family, transformers model, ours on the same weights). Gemma 4: the window-4 test models
  (per-layer inputs and KV sharing; experts), whose norms multiply by their (random) scales."""
  if request.param.startswith('gemma4'):
    hf = make_hf_model(request.param)
    hf.generation_config.eos_token_id = None
  else:
    hf = _hf_window8(request.param)
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return request.param, hf, load_hf(path)


@pytest.mark.parametrize('name', TINY)
def test_decode_logits_equal_full_forward(tiny_models, name):
  """At every step the logits equal a full forward's; the log-probs (and top 3) are its raw
  log_softmax, although the draw was penalised and tempered."""
  model = tiny_models[name]
  s = Sampler(model, cache_length=64)
  rule = SamplingParams(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5)
  out = s.sample(PROMPTS, NEW, sampling=rule, seed=1, return_logits=True, return_logprobs=True,
                 top_logprobs=3)
  for ids, c in zip(PROMPTS, out):
    assert len(c.tokens) == NEW and c.finish_reason == 'length'
    full = _full_logits(model, ids + c.tokens)[len(ids) - 1:-1]
    assert _rel_err(c.logits, full) <= 1e-5, name
    logp = np.asarray(jax.nn.log_softmax(full, axis=-1))
    np.testing.assert_allclose(c.logprobs, logp[np.arange(NEW), c.tokens], rtol=0, atol=1e-4)
    top_ids = np.array([[t for t, _ in step] for step in c.top_logprobs])
    top_vals = np.array([[v for _, v in step] for step in c.top_logprobs])
    np.testing.assert_array_equal(top_ids, np.argsort(-logp, axis=-1)[:, :3])
    np.testing.assert_allclose(top_vals, np.sort(logp, axis=-1)[:, ::-1][:, :3], atol=1e-4)


def test_repetition_penalty_greedy_equals_transformers(tmp_path):
  """A random Gemma 3 (window 4), a batch of left-padded prompts, 16 greedy tokens with
  repetition_penalty 1.5: every row equals transformers' generate with the same penalty, run
  alone (its prompt counts too), and the penalty changes what plain greedy would say."""
  hf = make_hf_model('gemma3')
  hf.generation_config.eos_token_id = None
  hf.save_pretrained(tmp_path)
  s = Sampler(load_hf(tmp_path), cache_length=64)
  rule = SamplingParams(temperature=0.0, repetition_penalty=1.5)
  out = s.sample(PROMPTS, 16, sampling=rule)
  for ids, c in zip(PROMPTS, out):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                        repetition_penalty=1.5)[0, len(ids):]
    assert c.tokens == ref.tolist()
  assert [c.tokens for c in out] != [c.tokens for c in s.sample(PROMPTS, 16)]


def test_frequency_and_presence_penalties_follow_a_step_by_step_reference(tiny_models):
  """Greedy with all three penalties on a left-padded batch equals a reference that, at each
  step, runs a full forward over prompt + tokens so far and applies vLLM's formula (repetition
  over prompt and output, frequency and presence over the output only) before the argmax."""
  model = tiny_models['tiny-gemma3']
  rep, freq, pres = 1.3, 0.7, 0.4
  rule = SamplingParams(temperature=0.0, repetition_penalty=rep, frequency_penalty=freq,
                        presence_penalty=pres)
  out = Sampler(model, cache_length=64).sample(PROMPTS, 16, sampling=rule)
  V = model.config.vocab_size
  for ids, c in zip(PROMPTS, out):
    gen = []
    for _ in range(16):
      logits = _full_logits(model, ids + gen)[-1]
      counts = np.bincount(np.asarray(gen, int), minlength=V)
      seen = np.isin(np.arange(V), ids) | (counts > 0)
      logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
      gen.append(int(np.argmax(logits - freq * counts - pres * (counts > 0))))
    assert c.tokens == gen
  plain = Sampler(model, cache_length=64).sample(PROMPTS, 16)
  assert [c.tokens for c in out] != [c.tokens for c in plain]


def test_sliding_window_greedy_equals_transformers(hf_pair):
  """Window-8 (Gemma 2/3) and window-4 (Gemma 4) models, a batch of left-padded prompts, 48
  greedy tokens (the rings wrap 6 to 12 times): every row equals transformers' greedy generate
  run alone, and the logits behind each token equal a full forward over the same tokens."""
  family, hf, model = hf_pair
  out = Sampler(model, cache_length=96).sample(PROMPTS, 48, return_logits=True)
  for ids, c in zip(PROMPTS, out):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):]
    assert c.tokens == ref.tolist(), family
    full = _full_logits(model, ids + c.tokens)[len(ids) - 1:-1]
    assert _rel_err(c.logits, full) <= 1e-5, family
  assert len({t for c in out for t in c.tokens}) > 20  # not a degenerate repetition


def _expected_cache_bytes(config, batch_size, cache_length, itemsize):
  """From the config's fields alone: every layer but the last num_kv_shared_layers keeps k and v
  [B, S, K, H] and int32 slot positions [B, S] (S: the window on local layers, at most the
  cache), plus the int32 end index."""
  total = 4
  for kind in config.attention_types[:config.num_layers - config.num_kv_shared_layers]:
    if kind == AttentionType.LOCAL:
      S, K, H = min(config.sliding_window, cache_length), config.num_kv_heads, config.head_dim
    else:
      S, K = cache_length, config.num_global_kv_heads or config.num_kv_heads
      H = config.global_head_dim or config.head_dim
    total += batch_size * S * (2 * K * H * itemsize + 4)
  return total


def test_cache_bytes_leave_out_kv_shared_layers():
  """Sampler.cache_bytes (abstract: nothing allocated) counts only the layers that keep keys and
  values, equals what init_cache really allocates, and tiny-gemma4's 2 KV-shared layers (one
  local, one global) make its cache smaller than the same model's without sharing."""
  config = get_preset('tiny-gemma4')
  assert config.num_kv_shared_layers == 2
  measured = {}
  for cfg in (config, config.replace(num_kv_shared_layers=0)):
    model = nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0)))
    for cache_length, dtype in [(64, jnp.float32), (64, jnp.bfloat16), (6, jnp.bfloat16)]:
      got = Sampler(model, cache_length=cache_length, cache_dtype=dtype).cache_bytes(3)
      assert got == _expected_cache_bytes(cfg, 3, cache_length, jnp.dtype(dtype).itemsize)
      allocated = model.init_cache(3, cache_length, dtype)
      assert got == sum(x.nbytes for x in jax.tree.leaves(allocated))
      measured[cfg.num_kv_shared_layers, cache_length, dtype] = got
  for cache_length, dtype in [(64, jnp.float32), (64, jnp.bfloat16), (6, jnp.bfloat16)]:
    assert measured[2, cache_length, dtype] < measured[0, cache_length, dtype]


def test_top_k_1_equals_greedy(tiny_models):
  s = Sampler(tiny_models['tiny-gemma3'], cache_length=64)
  greedy = [c.tokens for c in s.sample(PROMPTS, NEW)]
  for seed in (0, 1):
    top1 = s.sample(PROMPTS, NEW, sampling=SamplingParams(temperature=1.5, top_k=1), seed=seed)
    assert [c.tokens for c in top1] == greedy


def test_sampler_first_token_frequencies(tiny_models):
  """Through the Sampler: 4096 rows of one prompt (row keys differ) match top-k/top-p."""
  model = tiny_models['tiny-gemma2']
  logits = _full_logits(model, PROMPTS[0])[-1]
  top = np.sort(logits)[::-1]
  # A temperature that spreads the top 5 over a factor e^2, so top-k and top-p both bind.
  rule = SamplingParams(temperature=float(top[0] - top[4]) / 2, top_k=5, top_p=0.9)
  out = Sampler(model, cache_length=32).sample([PROMPTS[0]] * 4096, 1, sampling=rule, seed=3)
  draws = np.array([c.tokens[0] for c in out])
  ref = renormalised(logits, rule)
  freq = np.bincount(draws, minlength=len(ref)) / len(draws)
  assert np.all(freq[ref == 0] == 0) and np.count_nonzero(ref) >= 3
  np.testing.assert_allclose(freq, ref, atol=0.03)


def test_seeded_sampling_is_reproducible_and_independent_of_batch(tiny_models):
  """Row i draws from fold_in(key(seed), i): a prompt's sample does not depend on its companions."""
  s = Sampler(tiny_models['tiny-gemma3'], cache_length=64)
  rule = SamplingParams(temperature=1.0, top_p=0.95)
  batch = s.sample(PROMPTS, NEW, sampling=rule, seed=5)
  again = s.sample(PROMPTS, NEW, sampling=rule, seed=5)
  assert [c.tokens for c in batch] == [c.tokens for c in again]
  others = s.sample([PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[3]], NEW, sampling=rule, seed=5)
  assert others[0].tokens == batch[0].tokens and others[3].tokens == batch[3].tokens
  assert s.sample(PROMPTS, NEW, sampling=rule, seed=6)[0].tokens != batch[0].tokens


def test_greedy_rows_independent_of_batch(tiny_models):
  s = Sampler(tiny_models['tiny-gemma2'], cache_length=64)
  batch = s.sample(PROMPTS, 30)
  for ids, c in zip(PROMPTS, batch):
    assert s.sample([ids], 30)[0].tokens == c.tokens


def test_rows_stop_independently_and_then_emit_padding(tiny_models):
  s = Sampler(tiny_models['tiny-gemma1'], cache_length=64)
  free = s.sample(PROMPTS, 30)
  stop = free[0].tokens[6]  # row 0 stops at its 7th token (or earlier if it repeats)
  ids = [s.encode(p) for p in PROMPTS]
  *_, (_, tokens_BO, step, done) = s._generate(ids, 30, GREEDY, 0, [stop])
  for i, c in enumerate(free):
    k = c.tokens.index(stop) + 1 if stop in c.tokens else 30
    assert list(tokens_BO[i, :k]) == c.tokens[:k]
    assert np.all(tokens_BO[i, k:] == s.pad_id)  # padding after the stop
    assert bool(done[i]) == (stop in c.tokens)
  assert step == 30 or done.all()
  stopped = s.sample(PROMPTS, 30, stop_tokens=[stop])
  assert stopped[0].finish_reason == 'stop' and stopped[0].tokens[-1] == stop
  assert any(c.finish_reason == 'length' and len(c.tokens) == 30 for c in stopped)


def test_decode_compiles_once_per_bucket(tiny_models):
  s = Sampler(tiny_models['tiny-gemma1'], cache_length=64)
  s.sample([[2, 3, 4]], 5)
  sizes = (sampler_lib._decode._cache_size(), sampler_lib._prefill._cache_size())
  s.sample([[2, 9, 9, 9, 9]], 7)  # same buckets (prefill 16, output 16): no new compile
  s.sample([[2, 5]], 12, stop_tokens=[3])
  assert (sampler_lib._decode._cache_size(), sampler_lib._prefill._cache_size()) == sizes


@pytest.mark.parametrize('name', ['tiny-gemma1', 'tiny-gemma3'])
def test_decode_loop_reads_weights_in_place(name):
  """The compiled decode loop needs no weight-sized scratch: XLA must not transpose or slice
  (copy) projection weights on every step, which would double the bytes a step moves."""
  model = nnx.eval_shape(lambda: Transformer(get_preset(name), rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  decode_state = jax.eval_shape(lambda: sampler_lib.DecodeState.create(
      model.init_cache(1, 16), [3], [0], jax.random.split(jax.random.key(0), 1),
      max_new_tokens=16, pad_id=0))
  compiled = sampler_lib._decode.lower(
      graphdef, params, decode_state, jax.ShapeDtypeStruct((8,), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.int32), sampling=GREEDY, pad_id=0).compile()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * param_bytes


def test_decode_state_carries_penalty_counts_only_when_asked():
  """Default sampling carries no [B, V] history; penalties add generated-token counts (zeros)
  and, for the repetition penalty only, the prompt's tokens."""
  V = 32
  state = sampler_lib.DecodeState.create(
      {}, [3, 4], [0, 0], jax.random.split(jax.random.key(0), 2), max_new_tokens=4, pad_id=0)
  assert state.with_history(GREEDY, V, [[1, 3], [4]]) is state
  assert state.counts_BV is None and state.prompt_BV is None and state.logprobs_BO is None
  freq = state.with_history(SamplingParams(frequency_penalty=0.5), V, [[1, 3], [4]])
  assert freq.counts_BV.shape == (2, V) and not freq.counts_BV.any() and freq.prompt_BV is None
  rep = state.with_history(SamplingParams(repetition_penalty=1.2), V, [[1, 3, 99], [4]])
  assert [np.flatnonzero(row).tolist() for row in rep.prompt_BV] == [[1, 3], [4]]


def test_multi_process_jobs_get_a_clear_error(tiny_models, monkeypatch):
  """Sampling runs in one process; a multi-process job is told so instead of failing deep inside."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match='sampling runs in one process'):
    Sampler(tiny_models['tiny-gemma1'], cache_length=32)


def test_cache_past_max_seq_len_is_an_error(tiny_models):
  """Positions past max_seq_len were never trained: a cache reaching them is refused up front."""
  model = tiny_models['tiny-gemma3']
  assert model.config.max_seq_len == 4096
  with pytest.raises(ValueError, match=r"cache_length=4097 exceeds the model's max_seq_len=4096"):
    Sampler(model, cache_length=4097)
  assert Sampler(model, cache_length=4096).cache_length == 4096


def test_errors(tiny_models):
  s = Sampler(tiny_models['tiny-gemma1'], cache_length=32)
  with pytest.raises(ValueError, match='prompt list is empty'):
    s.sample([], 4)
  with pytest.raises(ValueError, match=r'prompt #1 \(30 tokens\) \+ max_new_tokens \(4\) exceeds '
                                       r'cache_length=32'):
    s.sample([[2, 3], [2] * 30], 4)
  with pytest.raises(ValueError, match='max_new_tokens must be a positive integer'):
    s.sample([[2, 3]], 0)
  with pytest.raises(ValueError, match='no tokenizer'):
    s.sample(['text'], 4)
  with pytest.raises(ValueError, match=r'top_logprobs must be an integer in \[0, 512\].*600'):
    s.sample([[2, 3]], 4, return_logprobs=True, top_logprobs=600)
  with pytest.raises(ValueError, match='top_logprobs=2 needs return_logprobs=True'):
    s.sample([[2, 3]], 4, top_logprobs=2)


# The real Gemma 3 270M (GGUF), against transformers loading the same file (fixture `real` in
# conftest.py).


@pytest.fixture(scope='module')
def hf_real(gguf_path):
  """transformers' float32 model of the same GGUF file."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def test_real_270m_batch_greedy_equals_transformers(real, hf_real):
  _, tok, _, out = real
  hf = hf_real
  for prompt, c in zip(REAL_PROMPTS, out):
    ids = tok.encode(prompt)
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), max_new_tokens=REAL_NEW, do_sample=False,
                        eos_token_id=[tok.eos_id, tok.end_of_turn_id])[0, len(ids):].tolist()
    assert c.tokens == ref, prompt
    assert c.text == tok.decode(ref[:-1] if c.finish_reason == 'stop' else ref)
  assert sum(len(c.tokens) for c in out) > 150


def test_real_stream_pieces_add_up_to_the_text(real):
  _, _, s, out = real
  stream = s.sample(REAL_PROMPTS, REAL_NEW, stream=True)
  pieces = list(stream)
  assert len(pieces) >= REAL_NEW // s.stream_chunk
  assert [c.tokens for c in stream.result] == [c.tokens for c in out]
  for i, c in enumerate(stream.result):
    assert ''.join(p[i] for p in pieces) == c.text
    assert stream.done[i] == (c.finish_reason == 'stop')


def test_real_stop_string(real):
  _, tok, s, out = real
  free = out[2]
  assert ' 9,' in free.text
  stopped = s.sample(REAL_PROMPTS, REAL_NEW, stop_tokens=[' 9,'])[2]
  assert stopped.finish_reason == 'stop'
  assert stopped.text == free.text[:free.text.index(' 9,')]
  assert ' 9,' in tok.decode(stopped.tokens) and ' 9,' not in tok.decode(stopped.tokens[:-1])
  assert stopped.tokens == free.tokens[:len(stopped.tokens)]
  stream = s.sample(REAL_PROMPTS, REAL_NEW, stop_tokens=[' 9,'], stream=True)
  pieces = list(stream)  # never shows a stop string's first half, which a later chunk completes
  for i, c in enumerate(stream.result):
    assert ''.join(p[i] for p in pieces) == c.text
  assert stream.result[2].text == stopped.text


def test_real_logprobs_equal_transformers(real, hf_real):
  """16 greedy tokens with return_logprobs and top_logprobs=4: each token's log-prob and the
  top 4 alternatives equal transformers' float32 log_softmax over the same tokens (<= 1e-4)."""
  _, tok, s, out = real
  got = s.sample(REAL_PROMPTS, 16, return_logprobs=True, top_logprobs=4)
  for prompt, c, full in zip(REAL_PROMPTS, got, out):
    assert c.tokens == full.tokens[:len(c.tokens)]
    ids = tok.encode(prompt)
    with torch.no_grad():
      logits = hf_real(torch.tensor([ids + c.tokens])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(ids) - 1:len(ids) - 1 + len(c.tokens)].numpy()
    assert len(c.logprobs) == len(c.tokens) == len(c.top_logprobs)
    np.testing.assert_allclose(c.logprobs, logp[np.arange(len(c.tokens)), c.tokens], rtol=0,
                               atol=1e-4)
    top_ids = np.array([[t for t, _ in step] for step in c.top_logprobs])
    top_vals = np.array([[v for _, v in step] for step in c.top_logprobs])
    np.testing.assert_array_equal(top_ids, np.argsort(-logp, axis=-1)[:, :4])
    np.testing.assert_allclose(top_vals, np.sort(logp, axis=-1)[:, ::-1][:, :4], rtol=0,
                               atol=1e-4)
    assert top_ids[:, 0].tolist() == c.tokens  # greedy: the most likely token
