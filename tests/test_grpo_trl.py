"""Our GRPO loss equals TRL's `GRPOTrainer._compute_loss` on the same weights and batch: the loss
(1e-5), the KL and clip-fraction metrics and the policy gradients (1e-4 relative), for
loss_type 'grpo', 'dr_grpo' and 'dapo', with and without the k3 KL to a reference model (beta),
on the first inner iteration (no old log-probs: the ratio is pi / stop_gradient(pi) = 1) and a
later one (old log-probs that differ, so both clip bounds, 1 - 0.2 and 1 + 0.28, bind), at
temperature 1 and 0.7. TRL's KL is its plain k3 (`use_bias_correction_kl=False`; see
`_grpo_trainer`).

The model: a small random-weight Gemma 3 (tests/hf_models.py), saved with `save_pretrained`
twice, as the reference (its weights) and the policy (the weights plus a small random
perturbation); transformers and our `load_hf` each read both directories.

The batch: 3 prompts of different lengths with 2 completions each (made-up ids, no <pad>/<eos>
inside), as TRL's generation leaves them: completions that stopped end with their <eos>, one
ran to max_completion_length without one, one is only its <eos>. TRL's side is its own
`_compute_loss`: prompt_ids left-padded, completion_ids right-padded, completion_mask 1 up to
and including the <eos>; the trainer scores completion token j from the position before it,
dividing the logits by the temperature (its fused LM head), and so does it for the reference's
log-probs (computed here by the trainer's own `_get_per_token_logps_and_entropies` on its
reference model) and for the old ones. transformers numbers a left-padded row's positions from
the first padding slot; RoPE depends only on position differences, so this is our positions
0..n-2 up to rounding. Ours is an [N, T] batch: row i = prompt_i + completion_i, tokens =
ids[:-1], targets = ids[1:], loss_mask 1 on the completion's targets (its <eos> included), and
old_logps[i, t] = TRL's old_per_token_logps[i, j] where targets[i, t] is completion token j.
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
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from gemma_jax import trainer
from gemma_jax.convert import hf_tensors_from_model, load_hf
from gemma_jax.objectives.grpo import GRPO
from hf_models import save_reference_and_policy
from test_dpo_trl import PAD, EOS, _tokenizer

MAX_LEN = 8  # max_completion_length
EPSILON, EPSILON_HIGH = 0.2, 0.28  # asymmetric, so that the two clip bounds are told apart
# Per prompt: its length, then each completion's (tokens before <eos>, whether it stopped).
GROUPS = [(3, [(4, True), (MAX_LEN, False)]),
          (6, [(0, True), (5, True)]),
          (4, [(2, True), (MAX_LEN - 1, True)])]
OLD_NOISE = 0.3  # std of old log-prob - current log-prob: ratios beyond both clip bounds


def _draw_rows(vocab_size: int) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, completion ids) of each row: no <pad>/<eos>/<bos> inside, <eos> if stopped."""
  rng = np.random.default_rng(0)
  draw = lambda n: [int(i) for i in rng.integers(3, vocab_size, n)]
  rows = []
  for prompt_len, completions in GROUPS:
    prompt = draw(prompt_len)
    rows += [(prompt, draw(n) + ([EOS] if stopped else [])) for n, stopped in completions]
  return rows


def _trl_inputs(rows, advantages) -> dict[str, torch.Tensor]:
  """TRL's training inputs: prompts left-padded, completions right-padded (without the
  optional old/ref log-probs)."""
  P = max(len(p) for p, _ in rows)
  C = max(len(c) for _, c in rows)
  out = {k: torch.zeros(len(rows), n, dtype=torch.long) for k, n in
         (('prompt_ids', P), ('prompt_mask', P), ('completion_ids', C), ('completion_mask', C))}
  for i, (prompt, completion) in enumerate(rows):
    out['prompt_ids'][i, P - len(prompt):] = torch.tensor(prompt)
    out['prompt_mask'][i, P - len(prompt):] = 1
    out['completion_ids'][i, :len(completion)] = torch.tensor(completion)
    out['completion_mask'][i, :len(completion)] = 1
  out['prompt_ids'][out['prompt_mask'] == 0] = PAD
  out['advantages'] = torch.as_tensor(advantages)
  out['num_items_in_batch'] = out['completion_mask'].sum()
  return out


def _our_batch(rows, advantages, old_logps=None) -> dict[str, np.ndarray]:
  """[N, T] rows of prompt + completion, shifted and masked; `old_logps` [N, C] is TRL's
  completion-aligned old_per_token_logps, moved onto our targets."""
  T = max(len(p) + len(c) for p, c in rows) - 1
  out = {k: np.zeros((len(rows), T), np.float32 if k == 'loss_mask' else np.int32)
         for k in ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')}
  if old_logps is not None:
    out['old_logps'] = np.zeros((len(rows), T), np.float32)
  for i, (prompt, completion) in enumerate(rows):
    ids = prompt + completion
    n, start = len(ids) - 1, len(prompt) - 1  # targets[start] is the completion's first token
    out['tokens'][i, :n], out['targets'][i, :n] = ids[:-1], ids[1:]
    out['loss_mask'][i, start:n] = 1
    out['positions'][i, :n], out['segment_ids'][i, :n] = np.arange(n), 1
    if old_logps is not None:
      out['old_logps'][i, start:n] = old_logps[i, :len(completion)]
  out['advantages'] = np.asarray(advantages, np.float32)
  return out


@pytest.fixture(scope='module')
def case(tmp_path_factory):
  """The saved reference and policy, our params of both, the rows and their advantages. Torch
  runs on one thread here: this model's matmuls are tiny, and on a busy 2-core machine its
  thread pool made each ~100x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  V, dirs = save_reference_and_policy(tmp_path_factory.mktemp)
  rows = _draw_rows(V)
  # Not centred per group (as GRPO's are): a mean advantage of 0 would hide a wrong loss scale.
  advantages = np.random.default_rng(1).normal(0.3, 1, len(rows)).astype(np.float32)
  assert (advantages > 0).any() and (advantages < 0).any()
  graphdef, params, rest = nnx.split(load_hf(dirs['policy']), nnx.Param, ...)
  ref_params = nnx.split(load_hf(dirs['reference']), nnx.Param, ...)[1]
  yield types.SimpleNamespace(
      dirs=dirs, rows=rows, advantages=advantages, tokenizer=_tokenizer(V),
      dataset=Dataset.from_dict({'prompt': ['w3 w4'] * len(rows)}),
      out=str(tmp_path_factory.mktemp('trl')), graphdef=graphdef, params=params, rest=rest,
      ref_params=ref_params, grad_fns={})
  torch.set_num_threads(threads)


def _hf(path):
  return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _zero_reward(completions, **kwargs):
  """Never called (nothing is generated); GRPOTrainer needs a reward function."""
  del kwargs
  return [0.0] * len(completions)


def _grpo_trainer(case, loss_type: str, beta: float, temperature: float, policy_dir: str,
                  ) -> GRPOTrainer:
  """A GRPOTrainer on the policy (and, for beta != 0, the reference), in train mode with no
  gradient accumulation; nothing is generated."""
  # use_bias_correction_kl (TRL >= 1.x defaults to True) multiplies the k3 KL by the ratio
  # pi / pi_old, which changes the KL's gradient even where the ratio is 1 (and its value and
  # the logged 'kl' where old log-probs differ); ours is the plain k3 KL, GRPO's.
  args = GRPOConfig(output_dir=case.out, report_to='none', use_cpu=True, bf16=False, seed=0,
                    loss_type=loss_type, beta=beta, epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
                    temperature=temperature, max_completion_length=MAX_LEN, num_generations=2,
                    per_device_train_batch_size=len(case.rows), use_bias_correction_kl=False,
                    activation_checkpointing=False)
  grpo = GRPOTrainer(model=_hf(policy_dir), reward_funcs=_zero_reward, args=args,
                     train_dataset=case.dataset, processing_class=case.tokenizer)
  if beta:  # TRL built its reference from the policy's directory: give it the reference weights
    grpo.ref_model.load_state_dict(_hf(case.dirs['reference']).state_dict())
  grpo.model.train()
  grpo.current_gradient_accumulation_steps = 1
  return grpo


def _trl_logps(grpo: GRPOTrainer, model, inputs) -> torch.Tensor:
  """[N, C] completion log-probs at the trainer's temperature, as its generation step takes
  them (no gradient)."""
  ids = torch.cat([inputs['prompt_ids'], inputs['completion_ids']], 1)
  mask = torch.cat([inputs['prompt_mask'], inputs['completion_mask']], 1)
  with torch.no_grad():
    logps, _, _ = grpo._get_per_token_logps_and_entropies(  # pylint: disable=protected-access
        model, ids, mask, inputs['completion_ids'].size(1))
  return logps


def _trl_grpo(case, loss_type: str, beta: float, temperature: float, old: bool,
              policy_dir: str | None = None):
  """TRL's loss, `_metrics`, policy gradients {HF name: array}, and the old log-probs it was
  given ([N, C] numpy, or None); the policy is read from `policy_dir` (default: the policy's)."""
  grpo = _grpo_trainer(case, loss_type, beta, temperature, policy_dir or case.dirs['policy'])
  inputs = _trl_inputs(case.rows, case.advantages)
  mask = inputs['completion_mask'].float()
  if beta:
    inputs['ref_per_token_logps'] = _trl_logps(grpo, grpo.ref_model, inputs)
  old_logps = None
  if old:  # the policy before this inner iteration's updates: the current one, perturbed
    noise = torch.from_numpy(np.random.default_rng(2).normal(0, OLD_NOISE, mask.shape))
    inputs['old_per_token_logps'] = (_trl_logps(grpo, grpo.model, inputs)
                                     + noise.float()) * mask
    old_logps = inputs['old_per_token_logps'].numpy()
  loss = grpo._compute_loss(grpo.model, inputs)  # pylint: disable=protected-access
  loss.backward()
  grads = {k: p.grad.numpy() for k, p in grpo.model.named_parameters()}
  metrics = {k: v[-1] for k, v in grpo._metrics['train'].items()}  # pylint: disable=protected-access
  return loss.item(), metrics, grads, old_logps


def _ours(case, objective: GRPO, batch, policy=None):
  """Our loss, metrics and policy gradients {HF name: array} of `policy` (default: the policy's
  params), with the reference's params when beta != 0. The jitted gradient function is
  compiled once per objective (the tests below share them: compiling is most of their time)."""
  if objective not in case.grad_fns:
    loss_fn = trainer.make_loss_fn(case.graphdef, case.rest, objective=objective)
    case.grad_fns[objective] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  count = objective.count(batch)
  reference = case.ref_params if objective.needs_reference else None
  params = case.params if policy is None else policy
  (loss, aux), grads = case.grad_fns[objective](params, batch, count, None, reference)
  metrics = {k: float(v) for k, v in objective.metrics(objective.named(aux), count).items()}
  return float(loss), metrics, hf_tensors_from_model(nnx.merge(case.graphdef, grads, case.rest))


def _norm(grads) -> float:
  return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


# Each loss type on-policy (no old log-probs), with the KL at temperature 0.7 and 1 and without
# it; then old log-probs (both clip regions bind) with the KL at temperature 0.7. The first three
# are also the first-iteration test's objectives. Each objective costs one compile (~5 s on 2
# busy cores): this is the fewest that cover every term.
CASES = [('grpo', 0.04, False, 0.7), ('dr_grpo', 0.0, False, 1.0), ('dapo', 0.04, False, 1.0),
         ('dapo', 0.04, True, 0.7)]


def _objective(loss_type: str, beta: float, temperature: float) -> GRPO:
  return GRPO(loss_type=loss_type, beta=beta, epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
              temperature=temperature, max_completion_length=MAX_LEN)


@pytest.mark.parametrize('loss_type, beta, old, temperature', CASES)
def test_grpo_loss_metrics_and_gradients_equal_trl(case, loss_type, beta, old, temperature):
  """Policy != reference: the loss (1e-5), the KL and clip fraction, the total gradient norm
  (1e-4 relative) and every tensor's gradient equal TRL's `_compute_loss`."""
  trl_loss, trl_metrics, trl_grads, old_logps = _trl_grpo(case, loss_type, beta, temperature,
                                                           old)
  batch = _our_batch(case.rows, case.advantages, old_logps)
  loss, metrics, grads = _ours(case, _objective(loss_type, beta, temperature), batch)

  assert abs(loss - trl_loss) <= 1e-5, (loss, trl_loss)
  if old:  # both clip regions bind, on some tokens: the comparison bites
    assert trl_metrics['clip_ratio/low_mean'] > 0 and trl_metrics['clip_ratio/high_mean'] > 0
  else:
    assert trl_metrics['clip_ratio/region_mean'] == 0
  assert metrics['clip_fraction'] == pytest.approx(trl_metrics['clip_ratio/region_mean'],
                                                   abs=1e-6)
  if beta:
    assert trl_metrics['kl'] > 0
    assert metrics['kl'] == pytest.approx(trl_metrics['kl'], rel=1e-5)
  assert set(grads) == set(trl_grads)
  norm, trl_norm = _norm(grads), _norm(trl_grads)
  assert abs(norm - trl_norm) <= 1e-4 * trl_norm, (norm, trl_norm)
  for name, g in trl_grads.items():  # and each tensor's, 1e-4 relative
    assert np.linalg.norm(grads[name] - g) <= 1e-4 * np.linalg.norm(g), name


@pytest.mark.parametrize('loss_type, beta, temperature', [c[:2] + c[3:] for c in CASES[:3]])
def test_first_iteration_ratio_is_one_and_kl_is_zero(case, loss_type, beta, temperature):
  """No old log-probs and policy = reference (the same saved weights): the ratio is 1 and the
  KL 0, so our loss and TRL's are minus the advantages aggregated as the loss type says
  (per-completion mean, / (N * max_completion_length), / completion tokens), to float32
  rounding; the clip fraction and (beta > 0) the KL are exactly 0 in both."""
  trl_loss, trl_metrics, _, _ = _trl_grpo(case, loss_type, beta, temperature, False,
                                          policy_dir=case.dirs['reference'])
  loss, metrics, _ = _ours(case, _objective(loss_type, beta, temperature),
                           _our_batch(case.rows, case.advantages), policy=case.ref_params)
  A = case.advantages.astype(np.float64)
  n = np.array([len(c) for _, c in case.rows], np.float64)  # completion tokens of each row
  expected = {'grpo': -A.mean(), 'dr_grpo': -(A * n).sum() / (len(A) * MAX_LEN),
              'dapo': -(A * n).sum() / n.sum()}[loss_type]
  assert abs(loss - expected) <= 1e-6 and abs(trl_loss - expected) <= 1e-6, (
      loss, trl_loss, expected)
  assert metrics['clip_fraction'] == 0.0 and trl_metrics['clip_ratio/region_mean'] == 0.0
  if beta:
    assert metrics['kl'] == 0.0 and trl_metrics['kl'] == 0.0
