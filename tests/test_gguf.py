"""The real Gemma 3 270M (Q4_K_M GGUF) against transformers loading the same file.

transformers is the reference: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`
dequantises with the same `gguf` routines, so in float32 the two forwards may differ only by
floating-point summation order. Both models are loaded once per module (~1 min together).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.config import get_preset
from gemma_jax.convert import load_gguf
from gemma_jax.convert.hf import hf_tensors_from_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

_LONG = ' '.join(
    f'Paragraph {i}: the river rose {i * 7 % 13} feet overnight, and the ferryman, who had '
    f'crossed it {1000 + 37 * i} times, decided for once to wait until the water calmed.'
    for i in range(16))
PROMPTS = {
    'prose': 'The history of the Roman Empire spans more than a thousand years, from the '
             'founding of the city to the fall of Constantinople.',
    'code': 'def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n'
            '    return a\n\nprint([fibonacci(i) for i in range(10)])\n',
    'chat': None,  # Built from the tokenizer's chat format below.
    'digits': '3.14159265358979 + 2.71828182845904 = 5.85987448204883; 1234567890 * 42 = '
              '51851851380; 2024-06-30T23:59:59Z',
    'long': _LONG,  # ~600 tokens: crosses the 512-token sliding window of the local layers.
}
BUCKETS = (64, 640)  # Prompts are right-padded to one of these: two compilations in total.
MAX_REL_DIFF = 1e-3


@pytest.fixture(scope='module')
def ours(gguf_path):
  return load_gguf(gguf_path, dtype=jnp.float32)


@pytest.fixture(scope='module')
def reference(gguf_path):
  pytest.importorskip('accelerate')  # transformers needs it to load GGUF files.
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope='module')
def forward(ours):
  """Jitted logits of one right-padded row: [T] ids -> [T, V] (compiled once per bucket)."""
  model, _ = ours
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, tokens_1T):
    return nnx.merge(graphdef, state)(tokens_1T)[0][0]

  def run(ids):
    bucket = next(b for b in BUCKETS if b >= len(ids))
    padded = jnp.asarray([list(ids) + [0] * (bucket - len(ids))], jnp.int32)
    return logits(state, padded)

  return run


def _prompt_ids(tokenizer, name):
  if name == 'chat':
    text = tokenizer.format_chat([{'role': 'user', 'content': 'Name three rivers in Africa.'}])
  else:
    text = PROMPTS[name]
  return tokenizer.encode(text, add_bos=True)


def test_config_and_tokenizer(ours):
  model, tokenizer = ours
  assert model.config == get_preset('gemma3-270m')
  assert tokenizer.vocab_size == model.config.vocab_size == 262_144
  assert tokenizer.encode('<start_of_turn>user\n', add_bos=False)[0] == tokenizer.start_of_turn_id


def test_tensors_equal_transformers(ours, reference):
  """Same dequantised weights, norms zero-centred the same way, same orientation."""
  model, _ = ours
  mine = hf_tensors_from_model(model)
  theirs = {k: v.numpy() for k, v in reference.state_dict().items() if k != 'lm_head.weight'}
  assert sorted(mine) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(mine[name], value, err_msg=name)


@pytest.mark.parametrize('name', list(PROMPTS))
def test_logits_match_transformers(name, ours, reference, forward):
  _, tokenizer = ours
  ids = _prompt_ids(tokenizer, name)
  assert (len(ids) > 512) == (name == 'long')
  got = np.asarray(forward(ids))[:len(ids)]
  with torch.no_grad():
    want = reference(torch.tensor([ids])).logits[0].numpy()
  rel = float(np.abs(got - want).max() / np.abs(want).max())
  print(f'\n{name}: {len(ids)} tokens, max|d|/max|ref| = {rel:.2e}')
  assert rel <= MAX_REL_DIFF, (name, rel)
  mismatched = np.flatnonzero(got.argmax(-1) != want.argmax(-1))
  assert mismatched.size == 0, f'{name}: argmax differs at positions {mismatched[:10]}'


def test_greedy_continuation_matches_generate(ours, reference, forward):
  """32 greedy tokens by repeated full forwards equal transformers' generate(do_sample=False)."""
  _, tokenizer = ours
  prompt = tokenizer.encode('The three most important inventions of the nineteenth century were')
  new_tokens = 32
  with torch.no_grad():
    out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             max_new_tokens=new_tokens, do_sample=False)
  want = out[0, len(prompt):].tolist()
  assert len(want) == new_tokens, 'transformers stopped early (EOS); choose another prompt'
  ids = list(prompt)
  for _ in range(new_tokens):
    ids.append(int(jnp.argmax(forward(ids)[len(ids) - 1])))
  got = ids[len(prompt):]
  print(f'\ngreedy: {tokenizer.decode(got)!r}')
  assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
