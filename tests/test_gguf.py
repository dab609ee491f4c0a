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
from hf_models import FAMILIES  # noqa: E402

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


# --- Gemma 4: files laid out as llama.cpp's Gemma4Model converter writes them. ---

# The tiny vocabulary with Gemma 4's control pieces (the converter types the thought-channel
# pieces USER_DEFINED, 4, so that they are rendered) and its last pieces reordered so that some
# merges of higher rank sit right of overlapping ones ('her': 'er' before 'he').
_GEMMA4_TOKENS = (['<pad>', '<eos>', '<bos>', '<unk>', '<|turn>', '<turn|>'] + _TINY_TOKENS[6:-4]
                  + ['er', 'in', 'he', 'th', '<|channel>', '<channel|>'])
_GEMMA4_TYPES = [3] * 6 + [6] * 256 + [1] * (TINY_V - 262) + [4, 4]
GEMMA4_V = len(_GEMMA4_TOKENS)


def _merges(tokens, types=_GEMMA4_TYPES):
  """The merge list a SentencePiece-converted Hugging Face tokenizer has: every split of a normal
  multi-character piece into two normal pieces, ordered by the piece (its score)."""
  normal = [t for t, kind in zip(tokens, types) if kind == 1]
  return [(p[:k], p[k:]) for p in normal for k in range(1, len(p))
          if p[:k] in normal and p[k:] in normal]


def _tiny_gemma4_model(family, seed=11):
  """tests/hf_models.py's `family` with the tiny Gemma 4 GGUF vocabulary."""
  config = FAMILIES[family]()
  config.vocab_size = config.vocab_size_per_layer_input = GEMMA4_V
  config.initializer_range = 0.1
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # as make_hf_model: Gemma 4 multiplies by its norm weights
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith(('router.scale', 'per_expert_scale')):
        p.normal_(1.0, 0.5)
    for name, b in model.named_buffers():
      if name.endswith('layer_scalar'):
        b.uniform_(0.5, 1.5)
  return model.eval()


def _gemma4_writer(path, c, *, rope_freqs=True):
  """A GGUFWriter holding what the converter writes before the weights, from `c`, the
  transformers config as a dict (its hparams): metadata, tokenizer, rope_freqs."""
  L, types = c['num_hidden_layers'], c['layer_types']
  # Older config.json files name the global layers' head dim and kv heads at the top level
  # (global_head_dim, num_global_key_value_heads, the latter read with attention_k_eq_v).
  overrides = {int(i): v for i, v in c['per_layer_config'].items()}[types.index('full_attention')]
  H_g, K = overrides['head_dim'], c['num_key_value_heads']
  K_g = overrides.get('num_key_value_heads', K) if c['attention_k_eq_v'] else None
  F, first_shared = c['intermediate_size'], L - c['num_kv_shared_layers']
  rope = c['rope_parameters']
  w = gguf.GGUFWriter(str(path), 'gemma4')
  w.add_block_count(L)
  w.add_context_length(c['max_position_embeddings'])
  w.add_embedding_length(c['hidden_size'])
  w.add_feed_forward_length([F * (2 if i >= first_shared else 1) for i in range(L)]
                            if c['use_double_wide_mlp'] else F)
  w.add_head_count(c['num_attention_heads'])
  w.add_head_count_kv([K if t == 'sliding_attention' else K_g for t in types]
                      if K_g is not None else K)
  w.add_rope_freq_base(rope['full_attention']['rope_theta'])
  w.add_rope_freq_base_swa(rope['sliding_attention']['rope_theta'])
  w.add_layer_norm_rms_eps(c['rms_norm_eps'])
  if c['num_experts']:
    w.add_expert_count(c['num_experts'])
    w.add_expert_used_count(c['top_k_experts'])
    w.add_expert_feed_forward_length(c['moe_intermediate_size'])
  w.add_key_length(H_g)
  w.add_value_length(H_g)
  if c['final_logit_softcapping']:
    w.add_final_logit_softcapping(c['final_logit_softcapping'])
  w.add_sliding_window(c['sliding_window'])
  w.add_shared_kv_layers(c['num_kv_shared_layers'])
  w.add_embedding_length_per_layer_input(c['hidden_size_per_layer_input'] or 0)
  w.add_sliding_window_pattern([t == 'sliding_attention' for t in types])
  w.add_key_length_swa(c['head_dim'])
  w.add_value_length_swa(c['head_dim'])
  w.add_rope_dimension_count(H_g)
  w.add_rope_dimension_count_swa(c['head_dim'])
  w.add_tokenizer_model('gemma4')
  w.add_token_list(_GEMMA4_TOKENS)
  w.add_token_scores([-1000.0] * len(_GEMMA4_TOKENS))
  w.add_token_types(_GEMMA4_TYPES)
  w.add_token_merges([f'{a} {b}' for a, b in _merges(_GEMMA4_TOKENS)])
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_space_prefix(False)
  w.add_add_bos_token(True)

  if rope_freqs:  # generate_extra_tensors: proportional RoPE as frequency factors
    rotated = int(H_g * rope['full_attention']['partial_rotary_factor'] / 2)
    w.add_tensor('rope_freqs.weight',
                 np.array([1.0] * rotated + [1e30] * (H_g // 2 - rotated), np.float32))
  return w


def write_gemma4_gguf(path, model, *, outtype=gguf.GGMLQuantizationType.F16,
                      split_experts=False, rope_freqs=True):
  """Writes a transformers Gemma 4 text model as llama.cpp's converter does (conversion/gemma.py
  `Gemma4Model` over `Gemma3Model` and `TextModel`): its metadata keys and their final values,
  the 'gemma4' tokenizer (placeholder scores, a merge list), the generated rope_freqs, names
  from the gguf package's own TensorNameMap for gemma4 (after the converter's renames of
  layer_scalar, experts and the router/per-expert scales), norms as they are, 1-D tensors, norms,
  routers and scales in F32 and the rest in `outtype` (F16 where that cannot be made).
  Returns the HF tensors as the file holds them."""
  w = _gemma4_writer(path, model.config.to_dict(), rope_freqs=rope_freqs)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, model.config.num_hidden_layers)
  held = {}

  def add(gname, value, name):
    qtype = outtype
    if (value.ndim <= 1 or gname.endswith('_norm.weight') or not gname.endswith('.weight')
        or '.ffn_gate_inp.' in gname):
      qtype = gguf.GGMLQuantizationType.F32
    try:
      q = gguf.quants.quantize(value, qtype)
    except gguf.QuantError:
      qtype = gguf.GGMLQuantizationType.F16
      q = gguf.quants.quantize(value, qtype)
    w.add_tensor(gname, q, raw_dtype=qtype)
    held[name] = np.asarray(gguf.quants.dequantize(q, qtype), np.float32).reshape(value.shape)

  for name, value in model.state_dict().items():
    if name == 'lm_head.weight':
      continue
    value = value.numpy()
    bid = name.split('.')[2] if name.startswith('model.layers.') else None
    if name.endswith('router.scale'):
      add(f'blk.{bid}.ffn_gate_inp.scale', value, name)
    elif name.endswith('router.per_expert_scale'):
      add(f'blk.{bid}.ffn_down_exps.scale', value, name)
    elif split_experts and name.endswith('experts.gate_up_proj'):
      F = value.shape[1] // 2
      add(f'blk.{bid}.ffn_gate_exps.weight', value[:, :F], name + ':gate')
      add(f'blk.{bid}.ffn_up_exps.weight', value[:, F:], name + ':up')
      held[name] = np.concatenate([held.pop(name + ':gate'), held.pop(name + ':up')], axis=1)
    else:
      if name.endswith('layer_scalar') or ('.experts.' in name and not name.endswith('.weight')):
        name_w = name + '.weight'
      else:
        name_w = name
      add(names.get_name(name_w, try_suffixes=('.weight', '.bias')), value, name)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held


def _without_representation(config):
  """A config with the fields that can spell one model two ways blanked (checked per layer type)."""
  return config.replace(name='', global_head_dim=None, num_global_kv_heads=None)


@pytest.mark.parametrize('family,outtype', [('gemma4-ple', gguf.GGMLQuantizationType.F16),
                                            ('gemma4-moe', gguf.GGMLQuantizationType.BF16)])
def test_tiny_gemma4_gguf(family, outtype, tmp_path):
  """PLE + KV sharing + double-wide MLPs + k = v + partial RoPE; MoE: llama.cpp's layout gives
  the source model's tensors and logits."""
  from gemma_jax.convert.hf import config_from_hf

  source = _tiny_gemma4_model(family)
  held = write_gemma4_gguf(tmp_path / 'g4.gguf', source, outtype=outtype)
  model, tokenizer = load_gguf(tmp_path / 'g4.gguf')
  assert tokenizer.chat_format == 'gemma4' and tokenizer.vocab_size == GEMMA4_V
  want_config = config_from_hf(source.config.to_dict())
  assert _without_representation(model.config) == _without_representation(want_config)
  for kind in (AttentionType.GLOBAL, AttentionType.LOCAL):
    assert model.config.layer_head_dim(kind) == want_config.layer_head_dim(kind)
    assert model.config.layer_kv_heads(kind) == want_config.layer_kv_heads(kind)

  mine = hf_tensors_from_model(model)
  assert sorted(mine) == sorted(held)
  for name, value in held.items():  # norms as stored (no 1 subtracted); F16/BF16 dequantised
    np.testing.assert_array_equal(mine[name], value, err_msg=name)

  source.load_state_dict({k: torch.from_numpy(v) for k, v in held.items()}, strict=False)
  tokens = np.array([[2, 40, 300, 7, 299, 262, 5, 100, 31, 4, 18, 250, 66, 1, 9, 3, 77, 8]])
  with torch.no_grad():
    want = source(torch.as_tensor(tokens)).logits.numpy()
  got = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens)))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize('preset', ['gemma4-e2b', 'gemma4-e4b', 'gemma4-26b-a4b', 'gemma4-31b'])
def test_gemma4_real_sizes(preset, tmp_path):
  """The metadata the converter writes for each official size (from transformers' own config of
  the preset) reads back as that preset; the weights are tiny stand-ins (8 vocabulary rows), and
  only their names matter here (attn_v where k != v, a router per MoE layer)."""
  from gemma_jax.convert.hf import hf_config_from_config

  want = get_preset(preset)
  c = transformers.Gemma4TextConfig(**hf_config_from_config(want)).to_dict()
  w = _gemma4_writer(tmp_path / 'r.gguf', c)
  L, D, I = want.num_layers, want.embed_dim, want.per_layer_input_dim
  w.add_tensor('token_embd.weight', np.zeros((8, D), np.float32))
  if I:
    w.add_tensor('per_layer_token_embd.weight', np.zeros((8, L * I), np.float32))
  for i, kind in enumerate(want.attention_types):
    if want.kv_source(i) is None and not want.k_eq_v(kind):
      w.add_tensor(f'blk.{i}.attn_v.weight', np.zeros(1, np.float32))
    if want.num_experts:
      w.add_tensor(f'blk.{i}.ffn_gate_inp.weight', np.zeros(1, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  got = config_from_gguf(open_gguf(tmp_path / 'r.gguf'))
  assert got.replace(name=want.name) == want.replace(vocab_size=8)


def test_gemma4_split_experts(tmp_path):
  """ffn_gate_exps + ffn_up_exps (llama.cpp's other expert layout) equal the fused tensor."""
  from gemma_jax.convert.gguf import hf_tensors_from_gguf
  from gemma_jax.convert.hf import model_from_hf_tensors

  source = _tiny_gemma4_model('gemma4-moe')
  tensors = {}
  for split in (False, True):
    path = tmp_path / f'split{split}.gguf'
    write_gemma4_gguf(path, source, outtype=gguf.GGMLQuantizationType.F32, split_experts=split)
    reader = open_gguf(path)
    assert any(t.name.endswith('ffn_gate_exps.weight') for t in reader.tensors) == split
    config = config_from_gguf(reader, str(path))
    tensors[split] = hf_tensors_from_gguf(reader, str(path), config)
  assert sorted(tensors[True]) == sorted(tensors[False])
  for name, value in tensors[False].items():
    np.testing.assert_array_equal(tensors[True][name], value, err_msg=name)
  model_from_hf_tensors(config, tensors[True])  # every expected tensor is there


def test_gemma4_tokenizer_from_merges(tmp_path):
  """The 'gemma4' tokenizer (merges, placeholder scores) rebuilt as SentencePiece encodes as
  Hugging Face's BPE over the same vocabulary and merges does."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import models, normalizers
  from gemma_jax.convert.gguf_tokenizer import tokenizer_from_gguf

  write_gemma4_gguf(tmp_path / 't.gguf', _tiny_gemma4_model('gemma4-dense'))
  ours = tokenizer_from_gguf(tmp_path / 't.gguf')
  reference = HFTokenizer(models.BPE(
      vocab={t: i for i, t in enumerate(_GEMMA4_TOKENS)}, merges=_merges(_GEMMA4_TOKENS),
      unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  reference.normalizer = normalizers.Replace(' ', '\u2581')
  reference.add_special_tokens(['<|turn>', '<turn|>', '<|channel>', '<channel|>'])
  assert ours.encode('her', add_bos=False) == [ours.piece_to_id(p) for p in ('h', 'er')]
  texts = ['the cat', 'there in the inner herd', 'the  theatre!', ' thin heron, ünïcödé',
           '<|turn>user\nhi there<turn|>', '<|channel>thought\n<channel|>the', 'ththe heer']
  for text in texts:
    assert ours.encode(text, add_bos=False) == reference.encode(text).ids, text
    assert ours.decode(ours.encode(text, add_bos=False)) == text


def test_gemma4_without_rope_freqs(tmp_path):
  write_gemma4_gguf(tmp_path / 'r.gguf', _tiny_gemma4_model('gemma4-dense'), rope_freqs=False)
  with pytest.raises(ValueError, match=r"r\.gguf: no rope_freqs\.weight"):
    load_gguf(tmp_path / 'r.gguf')
