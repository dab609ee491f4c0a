"""The real Gemma 3 270M (Q4_K_M GGUF) against transformers loading the same file.

transformers is the reference: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`
dequantises with the same `gguf` routines, so in float32 the two forwards may differ only by
floating-point summation order. Both models are loaded once per module (~1 min together).
"""

import gguf
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_jax.config import AttentionType, get_preset
from gemma_jax.convert import load_gguf
from gemma_jax.convert.gguf import config_from_gguf, open_gguf
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


# --- Tiny GGUF files written in llama.cpp's conventions, for every supported architecture. ---

TINY_V = 320  # 6 special pieces + 256 byte pieces + 58 normal pieces.
_TINY_TOKENS = (['<pad>', '<eos>', '<bos>', '<unk>', '<start_of_turn>', '<end_of_turn>']
                + [f'<0x{b:02X}>' for b in range(256)]
                + ['\u2581'] + [chr(c) for c in range(ord('a'), ord('z') + 1)]
                + ['\u2581' + chr(c) for c in range(ord('a'), ord('z') + 1)]
                + ['\u2581the', 'th', 'he', 'in', 'er'])
# Which tensors the tiny files quantise (the rest stay F32): one of each common kind.
_QUANT = {'ffn_up': gguf.GGMLQuantizationType.Q8_0, 'attn_v': gguf.GGMLQuantizationType.F16,
          'ffn_gate': gguf.GGMLQuantizationType.Q5_0}
_GGUF_NAMES = {
    'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output', 'self_attn.q_norm': 'attn_q_norm',
    'self_attn.k_norm': 'attn_k_norm', 'input_layernorm': 'attn_norm',
    'pre_feedforward_layernorm': 'ffn_norm', 'post_feedforward_layernorm': 'post_ffw_norm',
    'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}


def _tiny_hf_model(arch):
  """A random transformers model whose hyperparameters a GGUF file can express exactly."""
  common = dict(vocab_size=TINY_V, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                head_dim=32, initializer_range=0.1)
  if arch == 'gemma':
    config = transformers.GemmaConfig(num_hidden_layers=2, num_key_value_heads=1, **common)
  elif arch == 'gemma2':
    config = transformers.Gemma2Config(
        num_hidden_layers=4, num_key_value_heads=2, query_pre_attn_scalar=32, sliding_window=4,
        attn_logit_softcapping=1.5, final_logit_softcapping=3.0, **common)
  else:
    config = transformers.Gemma3TextConfig(
        num_hidden_layers=7, num_key_value_heads=2, query_pre_attn_scalar=32, sliding_window=4,
        rope_parameters={
            'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6},
            'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0}}, **common)
  torch.manual_seed(7)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.normal_(0.0, 0.5)
  return model.eval()


def write_tiny_gguf(path, model, arch, *, written_arch=None, tokens=_TINY_TOKENS, pattern=None):
  """Writes `model` as llama.cpp would: GGUF names, norms + 1, some tensors quantised.

  Returns the HF tensors as the file holds them (after quantisation round trips).
  """
  c = model.config
  w = gguf.GGUFWriter(str(path), written_arch or arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if arch == 'gemma3':
    w.add_rope_freq_base(c.rope_parameters['full_attention']['rope_theta'])
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(c.rope_parameters['full_attention']['factor'])
  else:
    w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  if arch != 'gemma':
    w.add_sliding_window(c.sliding_window)
  if pattern is not None:
    w.add_sliding_window_pattern(pattern)
  if arch == 'gemma2':
    w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
  w.add_tokenizer_model('llama')
  w.add_token_list(tokens)
  w.add_token_scores([0.0] * 262 + [-float(i) for i in range(len(tokens) - 262)])
  w.add_token_types([3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 262))
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_space_prefix(False)

  held = {}
  for name, value in model.state_dict().items():
    if name == 'lm_head.weight':
      continue
    value = value.numpy()
    if name == 'model.embed_tokens.weight':
      gname = 'token_embd.weight'
    elif name == 'model.norm.weight':
      gname = 'output_norm.weight'
    else:
      layer, rest = name.removeprefix('model.layers.').split('.', 1)
      rest = rest.removesuffix('.weight')
      if rest == 'post_attention_layernorm':  # Gemma 1 calls its pre-FFW norm this.
        rest = 'ffn_norm' if arch == 'gemma' else 'post_attention_norm'
      else:
        rest = _GGUF_NAMES[rest]
      gname = f'blk.{layer}.{rest}.weight'
    kind = gname.split('.')[-2]
    if 'norm' in kind:
      w.add_tensor(gname, value + np.float32(1.0))
      held[name] = (value + np.float32(1.0)) - np.float32(1.0)  # Not exactly value in float32.
    elif kind in _QUANT:
      q = gguf.quants.quantize(value, _QUANT[kind])
      w.add_tensor(gname, q, raw_dtype=_QUANT[kind])
      held[name] = gguf.quants.dequantize(q, _QUANT[kind]).reshape(value.shape)
    else:
      w.add_tensor(gname, value)
      held[name] = value
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held


@pytest.mark.parametrize('arch', ['gemma', 'gemma2', 'gemma3'])
def test_tiny_gguf_per_architecture(arch, tmp_path):
  source = _tiny_hf_model(arch)
  held = write_tiny_gguf(tmp_path / 'tiny.gguf', source, arch)
  model, tokenizer = load_gguf(tmp_path / 'tiny.gguf')
  assert tokenizer.vocab_size == TINY_V
  assert tokenizer.decode(tokenizer.encode('the cat', add_bos=False)) == 'the cat'
  assert model.config.family == {'gemma': 1, 'gemma2': 2, 'gemma3': 3}[arch]

  mine = hf_tensors_from_model(model)
  assert sorted(mine) == sorted(held)
  for name, value in held.items():  # Norms came back zero-centred; F16/Q8_0/Q5_0 dequantised.
    np.testing.assert_array_equal(mine[name], value, err_msg=name)

  # The source architecture with the file's (dequantised) weights is the logit reference.
  source.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()}, strict=False)
  tokens = np.array([[2, 40, 300, 7, 299, 262, 5, 100, 31, 4, 18, 250, 66, 1]])
  with torch.no_grad():
    want = source(torch.as_tensor(tokens)).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens))[0])
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
  if arch != 'gemma':  # transformers reads gemma2/gemma3 GGUF files: same tensors.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file='tiny.gguf', dtype=torch.float32)
    for name, value in theirs.state_dict().items():
      if name != 'lm_head.weight':
        np.testing.assert_array_equal(mine[name], value.numpy(), err_msg=name)


@pytest.fixture(scope='module')
def tiny_gemma3_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
  write_tiny_gguf(path, _tiny_hf_model('gemma3'), 'gemma3')
  return path


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / 'model.gguf'
  path.write_text('{"this": "is json"}')
  with pytest.raises(ValueError, match=r'model\.gguf: not a GGUF file'):
    load_gguf(path)
  with pytest.raises(ValueError, match='GGUF file not found'):
    load_gguf(tmp_path / 'missing.gguf')


@pytest.mark.parametrize('keep', [0.5, 0.999])
def test_truncated_file(keep, tiny_gemma3_gguf, tmp_path):
  data = tiny_gemma3_gguf.read_bytes()
  path = tmp_path / 'cut.gguf'
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(ValueError, match=r'cut\.gguf: truncated or corrupt GGUF file'):
    load_gguf(path)


def test_unsupported_architecture(tmp_path):
  write_tiny_gguf(tmp_path / 'llama.gguf', _tiny_hf_model('gemma'), 'gemma', written_arch='llama')
  with pytest.raises(ValueError, match=r"llama\.gguf: unsupported GGUF architecture 'llama'"):
    load_gguf(tmp_path / 'llama.gguf')


def test_vocab_mismatch(tmp_path):
  tokens = _TINY_TOKENS + ['\u2581extra']
  write_tiny_gguf(tmp_path / 'v.gguf', _tiny_hf_model('gemma2'), 'gemma2', tokens=tokens)
  with pytest.raises(ValueError, match=r'v\.gguf: vocabulary mismatch: the tokenizer has 321 '
                                       r'tokens but token_embd\.weight has 320 rows'):
    load_gguf(tmp_path / 'v.gguf')


@pytest.mark.parametrize('pattern', [None, 3, [True, True, False, True, False, False, True]])
def test_sliding_window_pattern(pattern, tmp_path):
  """Default: llama.cpp's 5 local : 1 global; else the file's period or per-layer flags."""
  write_tiny_gguf(tmp_path / 'p.gguf', _tiny_hf_model('gemma3'), 'gemma3', pattern=pattern)
  types = config_from_gguf(open_gguf(tmp_path / 'p.gguf')).attention_types
  if pattern is None:
    want = 'LLLLLGL'
  elif pattern == 3:
    want = 'LLGLLGL'
  else:
    want = ''.join('L' if p else 'G' for p in pattern)
  assert ''.join('L' if t == AttentionType.LOCAL else 'G' for t in types) == want


@pytest.mark.slow  # ~40 s: reads the GGUF file again; the CLI itself is tested on tiny files.
def test_cli_converts_the_real_model(gguf_path, ours, tmp_path):
  """The README's first step: GGUF -> native bfloat16 checkpoint with its tokenizer."""
  from gemma_jax import checkpoint
  from gemma_jax.convert.__main__ import main
  from gemma_jax.tokenizer import Tokenizer
  from gemma_jax.transformer import flat_params

  dst = tmp_path / 'gemma3-270m'
  assert main(['--from', 'gguf', '--src', str(gguf_path), '--dst', str(dst),
               '--dtype', 'bfloat16']) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['gemma3-270m']  # No temp folder left.
  restored = checkpoint.load_params(dst)
  model, tokenizer = ours
  assert restored.config == model.config and restored.dtype == jnp.bfloat16
  want = flat_params(model)
  for name, value in flat_params(restored).items():
    assert value.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name].astype(jnp.bfloat16)),
                                  err_msg=name)
  saved = Tokenizer(str(dst / 'tokenizer.model'))
  text = 'Hello <start_of_turn>user\nWie geht es dir? 안녕하세요 12345'
  assert saved.encode(text) == tokenizer.encode(text)
