"""`python -m gemma_jax.convert`: every direction on tiny models; failures that leave no trace."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import checkpoint
from gemma_jax.config import get_preset
from gemma_jax.convert import load_hf
from gemma_jax.convert.__main__ import main
from gemma_jax.convert.gguf_tokenizer import sentencepiece_model_from_gguf
from gemma_jax.convert.hf import hf_config_from_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from hf_models import hf_logits, make_hf_model  # noqa: E402
from test_gguf import TINY_V, _tiny_hf_model, write_tiny_gguf  # noqa: E402
from test_official import official_tree  # noqa: E402

TOKENS = np.array([[2, 5, 77, 130, 9, 200, 31, 4, 18, 250, 66, 1]])


def _logits(model):
  return np.asarray(model(jnp.asarray(TOKENS))[0])


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """A tiny Gemma 3 GGUF file and the 320-piece SentencePiece model rebuilt from it."""
  root = tmp_path_factory.mktemp('files')
  write_tiny_gguf(root / 'tiny.gguf', _tiny_hf_model('gemma3'), 'gemma3')
  (root / 'tokenizer.model').write_bytes(sentencepiece_model_from_gguf(root / 'tiny.gguf'))
  return root


@pytest.fixture(scope='module')
def hf_dir(files, tmp_path_factory):
  """A transformers checkpoint shaped like the tiny-gemma3 preset (V=512), with tokenizer.model."""
  config = transformers.Gemma3TextConfig(**hf_config_from_config(get_preset('tiny-gemma3')))
  config.initializer_range = 0.1
  torch.manual_seed(11)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  path = tmp_path_factory.mktemp('hf') / 'src'
  model.save_pretrained(path)
  (path / 'tokenizer.model').write_bytes((files / 'tokenizer.model').read_bytes())
  return path, model


def _listing(path):
  return sorted(p.name for p in path.iterdir())


def test_hf_to_native_and_back(hf_dir, tmp_path, capsys):
  src, reference = hf_dir
  assert main(['--from', 'hf', '--src', str(src), '--dst', str(tmp_path / 'native')]) == 0
  assert 'wrote' in capsys.readouterr().err  # Progress lines go to stderr.
  assert _listing(tmp_path) == ['native']
  assert _listing(tmp_path / 'native') == ['config.json', 'params', 'tokenizer.model']
  assert (tmp_path / 'native' / 'tokenizer.model').read_bytes() == (
      src / 'tokenizer.model').read_bytes()
  native = checkpoint.load_params(tmp_path / 'native')
  np.testing.assert_array_equal(_logits(native), _logits(load_hf(src)))

  assert main(['--to', 'hf', '--src', str(tmp_path / 'native'), '--dst', str(tmp_path / 'hf')]) == 0
  assert 'tokenizer.model' in _listing(tmp_path / 'hf')
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32)
  for name, value in reference.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), value.numpy(), err_msg=name)


def test_official_to_native_in_bfloat16(files, tmp_path):
  torch.manual_seed(12)
  reference = transformers.AutoModelForCausalLM.from_config(
      transformers.Gemma3TextConfig(**hf_config_from_config(get_preset('tiny-gemma3'))),
      dtype=torch.float32).eval()
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(tmp_path / 'kaggle' / 'ckpt',
                                official_tree(reference, transposed_gating=True))
  # Kaggle ships tokenizer.model beside the checkpoint folder: the CLI looks there too.
  (tmp_path / 'kaggle' / 'tokenizer.model').write_bytes((files / 'tokenizer.model').read_bytes())
  dst = tmp_path / 'out' / 'native'
  assert main(['--from', 'official', '--src', str(tmp_path / 'kaggle' / 'ckpt'), '--preset',
               'tiny-gemma3', '--dtype', 'bfloat16', '--dst', str(dst)]) == 0
  native = checkpoint.load_params(dst)
  assert native.embedder.input_embedding[...].dtype == jnp.bfloat16
  assert checkpoint.tokenizer_path(dst) is not None
  want = hf_logits(reference, TOKENS)
  assert np.abs(_logits(native) - want).max() / np.abs(want).max() < 0.05  # bfloat16 weights.


def test_gguf_to_native(files, tmp_path):
  assert main(['--from', 'gguf', '--src', str(files / 'tiny.gguf'), '--dst',
               str(tmp_path / 'n')]) == 0
  assert checkpoint.load_params(tmp_path / 'n').config.vocab_size == TINY_V
  assert (tmp_path / 'n' / 'tokenizer.model').read_bytes() == (
      files / 'tokenizer.model').read_bytes()


def test_gemma4_gguf_to_native(tmp_path):
  """A gemma4 file (llama.cpp's layout, 'gemma4' merge-list tokenizer) -> native checkpoint."""
  from gemma_jax.convert import load_gguf
  from gemma_jax.tokenizer import Tokenizer
  from gemma_jax.transformer import flat_params
  from test_gguf import _tiny_gemma4_model, write_gemma4_gguf

  write_gemma4_gguf(tmp_path / 'g4.gguf', _tiny_gemma4_model('gemma4-ple'))
  assert main(['--from', 'gguf', '--src', str(tmp_path / 'g4.gguf'), '--dst',
               str(tmp_path / 'n')]) == 0
  native = checkpoint.load_params(tmp_path / 'n')
  model, tokenizer = load_gguf(tmp_path / 'g4.gguf')
  assert native.config == model.config and native.config.per_layer_input_dim == 6
  want = flat_params(model)
  for name, value in flat_params(native).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
  saved = Tokenizer(str(tmp_path / 'n' / 'tokenizer.model'))
  assert saved.chat_format == 'gemma4'
  text = '<|turn>user\nthe inner herd<turn|>'
  assert saved.encode(text) == tokenizer.encode(text)


def _fails(argv, tmp_path, capsys, message):
  assert main(argv) == 1
  err = capsys.readouterr().err
  assert message in err, err
  assert 'Traceback' not in err
  assert not (tmp_path / 'dst').exists()
  assert not [p for p in _listing(tmp_path) if '.tmp-' in p]  # No temporary folder left either.


def test_failures_leave_nothing(files, hf_dir, tmp_path, capsys):
  dst = str(tmp_path / 'dst')
  (tmp_path / 'notes.gguf').write_text('plain text')
  _fails(['--from', 'gguf', '--src', str(tmp_path / 'notes.gguf'), '--dst', dst], tmp_path,
         capsys, 'notes.gguf: not a GGUF file')
  _fails(['--to', 'hf', '--src', str(files), '--dst', dst], tmp_path, capsys,
         'no params/ directory')
  # A tokenizer with more pieces (320) than the model has embedding rows (256).
  small = make_hf_model('gemma3')
  small.save_pretrained(tmp_path / 'small')
  _fails(['--from', 'hf', '--src', str(tmp_path / 'small'), '--tokenizer',
          str(files / 'tokenizer.model'), '--dst', dst], tmp_path, capsys,
         'vocabulary mismatch: the tokenizer has 320 pieces but the model has only 256')
  src, _ = hf_dir
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(
      tmp_path / 'kaggle', official_tree(make_hf_model('gemma2'), transposed_gating=False))
  _fails(['--from', 'official', '--src', str(tmp_path / 'kaggle'), '--preset', 'tiny-gemma3',
          '--dst', dst], tmp_path, capsys, "Does the preset 'tiny-gemma3' match")


def test_interrupted_write_leaves_nothing(hf_dir, tmp_path, monkeypatch):
  src, _ = hf_dir

  def crash(model, directory, tokenizer=None):
    os.makedirs(os.path.join(directory, 'params'))  # Half-written, then killed.
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint, 'save_params', crash)
  with pytest.raises(KeyboardInterrupt):
    main(['--from', 'hf', '--src', str(src), '--dst', str(tmp_path / 'dst')])
  assert _listing(tmp_path) == []


def test_usage_errors(files, tmp_path, capsys):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  for argv, message in [
      (['--from', 'gguf', '--src', str(files / 'tiny.gguf'), '--dst', str(tmp_path / 'full')],
       'already exists and is not an empty directory'),
      (['--from', 'gguf', '--src', str(files / 'tiny.gguf'), '--preset', 'gemma3-270m', '--dst',
        str(tmp_path / 'x')], '--preset applies to --from official only'),
      (['--from', 'official', '--src', str(files), '--dst', str(tmp_path / 'x')],
       '--from official needs --preset'),
      (['--from', 'hf', '--src', str(tmp_path / 'missing'), '--dst', str(tmp_path / 'x')],
       'does not exist'),
  ]:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
  assert _listing(tmp_path) == ['full'] and _listing(tmp_path / 'full') == ['keep.txt']


def test_module_entry_point(tmp_path):
  (tmp_path / 'x.gguf').write_bytes(b'\x00' * 64)
  run = subprocess.run([sys.executable, '-m', 'gemma_jax.convert', '--from', 'gguf', '--src',
                        str(tmp_path / 'x.gguf'), '--dst', str(tmp_path / 'out')],
                       capture_output=True, text=True, timeout=120,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert run.returncode == 1
  assert 'x.gguf: not a GGUF file' in run.stderr and 'Traceback' not in run.stderr
  assert _listing(tmp_path) == ['x.gguf']
