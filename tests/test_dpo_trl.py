"""Our DPO-family losses equal TRL's on the same weights and batch: sigmoid DPO and IPO against
`DPOTrainer.compute_loss` (loss, reward metrics, gradients), SimPO against `CPOTrainer.cpo_loss`,
conservative DPO (label smoothing) against the same formula in `cpo_loss`, and ln 2 at step 1.

The model: a small random-weight Gemma 3 (tests/hf_models.py: local + global layers, QK-norm),
saved with `save_pretrained` twice, as the reference (its weights) and the policy (the weights plus
a small random perturbation); transformers and our `load_hf` each read both directories.

The batch: 3 pairs with different prompt and reply lengths (made-up token ids, no <pad>/<eos>
inside). TRL's side is its own pipeline: text of one word per token, a WordLevel tokenizer,
`DPOTrainer`'s dataset preparation (which appends <eos> to both replies) and its
`DataCollatorForPreference`, giving [all chosen; all rejected] rows of prompt + reply + <eos>,
right-padded to the longest, with `completion_mask` 1 on the reply tokens; the trainer scores
token t+1 from position t where completion_mask[t + 1] is 1. Ours is a [P, 2, T] batch (pair p:
[p, 0] chosen, [p, 1] rejected) encoded as gemma_jax.preference_data.encode_pair does: tokens =
ids[:-1], targets = ids[1:], loss_mask 1 on targets that are reply tokens (so loss_mask[t] =
completion_mask[t + 1]), positions 0..n-2, segment_ids 1 on the row and 0 on padding.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from datasets import Dataset
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from gemma_jax import trainer
from gemma_jax.convert import hf_tensors_from_model, load_hf
from gemma_jax.objectives.dpo import DPO, preference_losses
from hf_models import save_reference_and_policy

PAD, EOS, BOS = 0, 1, 2  # the HF Gemma config's ids
# (prompt length, chosen length, rejected length) of each pair, <eos> not counted.
LENGTHS = [(4, 5, 3), (7, 2, 6), (2, 6, 6)]
LN2 = float(np.float32(math.log(2.0)))
# TRL's metric name -> ours.
METRICS = {'rewards/accuracies': 'reward_accuracy', 'rewards/margins': 'reward_margin',
           'rewards/chosen': 'chosen_rewards', 'rewards/rejected': 'rejected_rewards',
           'logps/chosen': 'chosen_logps', 'logps/rejected': 'rejected_logps'}


def _tokenizer(vocab_size: int):
  """A tokenizer whose token i is the word `w{i}` (ids 0, 1, 2: <pad>, <eos>, <bos>)."""
  vocab = {f'w{i}': i for i in range(vocab_size)}
  vocab.update({'<pad>': PAD, '<eos>': EOS, '<bos>': BOS})
  del vocab['w0'], vocab['w1'], vocab['w2']
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<pad>'))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='<eos>',
                                 bos_token='<bos>')


def _text(ids) -> str:
  return ' '.join(f'w{i}' for i in ids)


def _our_batch(pairs) -> dict[str, np.ndarray]:
  """[P, 2, T] rows of prompt + reply + <eos>, shifted and masked as encode_pair does."""
  rows = [(p, p + reply + [EOS]) for p, c, r in pairs for reply in (c, r)]
  T = max(len(ids) for _, ids in rows) - 1
  out = {k: np.zeros((len(rows), T), np.float32 if k == 'loss_mask' else np.int32)
         for k in ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')}
  for i, (prompt, ids) in enumerate(rows):
    n = len(ids) - 1
    out['tokens'][i, :n], out['targets'][i, :n] = ids[:-1], ids[1:]
    out['loss_mask'][i, len(prompt) - 1:n] = 1  # targets ids[len(prompt):], the reply
    out['positions'][i, :n], out['segment_ids'][i, :n] = np.arange(n), 1
  return {k: v.reshape(len(pairs), 2, T) for k, v in out.items()}


@pytest.fixture(scope='module')
def case(tmp_path_factory):
  """The saved reference and policy, the pairs, TRL's tokenizer and dataset, our batch."""
  V, dirs = save_reference_and_policy(tmp_path_factory.mktemp)
  rng = np.random.default_rng(0)
  draw = lambda n: [int(i) for i in rng.integers(3, V, n)]  # no <pad>, <eos>, <bos>
  pairs = [(draw(p), draw(c), draw(r)) for p, c, r in LENGTHS]
  dataset = Dataset.from_dict({'prompt': [_text(p) for p, _, _ in pairs],
                               'chosen': [' ' + _text(c) for _, c, _ in pairs],
                               'rejected': [' ' + _text(r) for _, _, r in pairs]})
  return types.SimpleNamespace(dirs=dirs, pairs=pairs, tokenizer=_tokenizer(V), dataset=dataset,
                               batch=_our_batch(pairs), out=str(tmp_path_factory.mktemp('trl')),
                               grad_fns={})


def _hf(path):
  return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _trl_dpo(case, loss_type: str, beta: float, policy_dir: str):
  """TRL's loss, `_metrics` and policy gradients {HF name: array} for one batch."""
  args = DPOConfig(output_dir=case.out, report_to=[], loss_type=[loss_type], beta=beta,
                   bf16=False, gradient_checkpointing=False, use_cpu=True,
                   per_device_train_batch_size=len(case.pairs), seed=0)
  dpo = DPOTrainer(model=_hf(policy_dir), ref_model=_hf(case.dirs['reference']), args=args,
                   train_dataset=case.dataset, processing_class=case.tokenizer)
  examples = [dpo.train_dataset[i] for i in range(len(case.pairs))]
  for e, (p, c, r) in zip(examples, case.pairs):  # TRL tokenized the text into our ids
    assert (e['prompt_ids'], e['chosen_ids'], e['rejected_ids']) == (p, c + [EOS], r + [EOS])
  inputs = dpo.data_collator(examples)
  dpo.model.train()
  loss = dpo.compute_loss(dpo.model, inputs)  # = _compute_loss(model, inputs, False)
  loss.backward()
  grads = {k: p.grad.numpy() for k, p in dpo.model.named_parameters()}
  metrics = {k: v[-1] for k, v in dpo._metrics['train'].items()}  # pylint: disable=protected-access
  return loss.item(), metrics, grads


def _ours(case, objective, policy_dir: str):
  """Our loss, metrics (per pair) and policy gradients {HF name: array}; the jitted gradient
  function is compiled once per objective (the policy and reference share one graph)."""
  graphdef, params, rest = nnx.split(load_hf(policy_dir), nnx.Param, ...)
  if objective not in case.grad_fns:
    loss_fn = trainer.make_loss_fn(graphdef, rest, objective=objective)
    case.grad_fns[objective] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  reference = nnx.split(load_hf(case.dirs['reference']), nnx.Param, ...)[1]
  batch = {k: jnp.asarray(v) for k, v in case.batch.items()}
  count = objective.count(batch)
  (loss, aux), grads = case.grad_fns[objective](params, batch, count, None, reference)
  metrics = {k: float(v) for k, v in objective.metrics(aux, count).items()}
  return float(loss), metrics, hf_tensors_from_model(nnx.merge(graphdef, grads, rest))


def _norm(grads) -> float:
  return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


# IPO's loss is (d - 1 / (2 beta))^2: beta 0.5 keeps it near 3, where 1e-5 is ~30 float32 ulps
# (at TRL's default 0.1 it is ~32 and the two frameworks' rounding alone differs by ~8e-6).
@pytest.mark.parametrize('loss_type, beta', [('sigmoid', 0.1), ('ipo', 0.5)])
def test_dpo_loss_metrics_and_gradients_equal_trl(case, loss_type, beta):
  """Policy != reference: loss (1e-5), reward accuracy and margins, chosen/rejected rewards and
  log-probs, the total gradient norm (1e-4 relative) and every tensor's gradient equal TRL's."""
  objective = DPO(loss=loss_type, beta=beta)
  loss, metrics, grads = _ours(case, objective, case.dirs['policy'])
  trl_loss, trl_metrics, trl_grads = _trl_dpo(case, loss_type, beta, case.dirs['policy'])

  assert abs(loss - trl_loss) <= 1e-5, (loss, trl_loss)
  assert 0 < trl_metrics['rewards/accuracies'] < 1  # some pairs each way: the comparison bites
  assert metrics['reward_accuracy'] == trl_metrics['rewards/accuracies']
  for theirs, ours in METRICS.items():
    assert metrics[ours] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-6), theirs
  assert set(grads) == set(trl_grads)
  norm, trl_norm = _norm(grads), _norm(trl_grads)
  assert abs(norm - trl_norm) <= 1e-4 * trl_norm, (norm, trl_norm)
  for name, g in trl_grads.items():  # and each tensor's, 1e-4 relative
    assert np.linalg.norm(grads[name] - g) <= 1e-4 * np.linalg.norm(g), name


def test_first_step_loss_is_exactly_ln2_in_both(case):
  """Policy = reference (the same saved weights): our sigmoid loss and TRL's are exactly
  float32(ln 2); rewards, margins and accuracy are 0."""
  objective = DPO(loss='sigmoid', beta=0.1)
  loss, metrics, _ = _ours(case, objective, case.dirs['reference'])
  trl_loss, trl_metrics, _ = _trl_dpo(case, 'sigmoid', 0.1, case.dirs['reference'])
  assert loss == LN2 and trl_loss == LN2
  for theirs, ours in METRICS.items():
    if not theirs.startswith('logps'):
      assert metrics[ours] == 0.0 and trl_metrics[theirs] == 0.0, theirs


def _cpo_loss(out: str, loss_type: str, beta: float, label_smoothing: float, gamma: float,
              chosen, rejected):
  """TRL's `CPOTrainer.cpo_loss` with its settings read from a real `CPOConfig`."""
  c = CPOConfig(output_dir=out, report_to=[], loss_type=loss_type, beta=beta, cpo_alpha=0.0,
                label_smoothing=label_smoothing, simpo_gamma=gamma, bf16=False, use_cpu=True)
  self = types.SimpleNamespace(beta=c.beta, label_smoothing=c.label_smoothing,
                               loss_type=c.loss_type, simpo_gamma=c.simpo_gamma, alpha=c.alpha,
                               accelerator=types.SimpleNamespace(device=torch.device('cpu')))
  return CPOTrainer.cpo_loss(self, chosen, rejected)


def test_simpo_loss_and_gradients_equal_trl_cpo(case):
  """SimPO (reference-free, length-normalised): our loss, rewards and policy gradients equal
  CPOTrainer's `get_batch_logps(average_log_prob=True)` + `cpo_loss` (loss_type='simpo',
  cpo_alpha=0) on the same transformers forward."""
  beta, gamma = 2.0, 0.5
  objective = DPO(loss='simpo', beta=beta, simpo_gamma=gamma)
  loss, metrics, grads = _ours(case, objective, case.dirs['policy'])

  inputs = DataCollatorForPreference(pad_token_id=PAD)([
      {'prompt_ids': p, 'chosen_ids': c + [EOS], 'rejected_ids': r + [EOS]}
      for p, c, r in case.pairs])
  # CPOTrainer's labels: the sequence with -100 off the reply (on the prompt and the padding).
  labels = inputs['input_ids'].masked_fill(inputs['completion_mask'] == 0, -100)
  policy = _hf(case.dirs['policy'])
  logits = policy(inputs['input_ids'], attention_mask=inputs['attention_mask']).logits
  logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
  chosen, rejected = logps.chunk(2)  # [all chosen; all rejected]
  losses, reward_c, reward_r = _cpo_loss(case.out, 'simpo', beta, 0.0, gamma, chosen, rejected)
  losses.mean().backward()
  trl_grads = {k: p.grad.numpy() for k, p in policy.named_parameters()}

  assert abs(loss - losses.mean().item()) <= 1e-5, (loss, losses.mean().item())
  assert metrics['reward_accuracy'] == (reward_c > reward_r).float().mean().item()
  assert metrics['reward_margin'] == pytest.approx((reward_c - reward_r).mean().item(), rel=1e-5)
  assert metrics['chosen_rewards'] == pytest.approx(reward_c.mean().item(), rel=1e-5)
  norm, trl_norm = _norm(grads), _norm(trl_grads)
  assert abs(norm - trl_norm) <= 1e-4 * trl_norm, (norm, trl_norm)
  for name, g in trl_grads.items():
    assert np.linalg.norm(grads[name] - g) <= 1e-4 * np.linalg.norm(g), name


@pytest.mark.parametrize('loss_type', ['sigmoid', 'simpo'])
def test_label_smoothing_equals_trl_cpo_formula(tmp_path, loss_type):
  """Conservative DPO / SimPO with label smoothing (TRL's DPOTrainer 'sigmoid' has none; its
  CPOTrainer keeps the formula): `preference_losses` equals `cpo_loss` given the same scores
  (the log-ratios for sigmoid, the length-averaged log-probs for simpo)."""
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = (rng.normal(-20, 5, 8).astype(np.float32) for _ in range(4))
  lc, lr = (rng.integers(1, 12, 8).astype(np.float32) for _ in range(2))
  beta, eps, gamma = 0.3, 0.2, 0.5
  losses, reward_c, reward_r = preference_losses(pc, pr, rc, rr, lc, lr, loss=loss_type,
                                                 beta=beta, label_smoothing=eps, simpo_gamma=gamma)
  if loss_type == 'sigmoid':
    chosen, rejected = pc - rc, pr - rr
  else:
    chosen, rejected = pc / lc, pr / lr
  trl_losses, trl_c, trl_r = _cpo_loss(str(tmp_path), loss_type, beta, eps, gamma,
                                       torch.as_tensor(chosen), torch.as_tensor(rejected))
  np.testing.assert_allclose(losses, trl_losses.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(reward_c, trl_c.numpy(), rtol=1e-6)
  np.testing.assert_allclose(reward_r, trl_r.numpy(), rtol=1e-6)
