"""Reward functions for RL with verifiable rewards (objective 'grpo', config.grpo.rewards).

A reward function is a plain Python callable

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

called once per rollout batch with one entry per completion: `prompts[i]` the prompt's user text,
`completions[i]` the completion's text (up to, without, its end of turn), and every other field of
the prompt's data record as a keyword argument holding one value per completion (e.g. `answer`).
It returns one finite number per completion. (TRL's reward functions have the same shape.)

`config.grpo.rewards` names them: a built-in below, or 'package.module:function' for your own (an
import of your module, nothing else is executed). `config.grpo.reward_weights` weighs them; the
reward of a completion is the weighted sum. Built-ins:

  exact_match  1.0 when the completion, stripped, equals the `answer` field, stripped
  numeric      1.0 when the last number in the completion (commas removed) equals the number in
               the `answer` field
  format       1.0 when the whole stripped completion matches config.grpo.format_pattern (a
               Python regex, re.fullmatch)
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFn = Callable[..., Sequence[float]]
_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')


class RewardError(ValueError):
  """A reward function is missing, failed, or returned something other than one number per
  completion; the message names it."""


def _answers(fields: Mapping[str, Sequence[Any]], name: str, n: int) -> Sequence[Any]:
  if 'answer' not in fields:
    raise RewardError(f"reward '{name}' reads the records' 'answer' field; the prompts have "
                      f'fields {sorted(fields)}.')
  return fields['answer']


def exact_match(prompts, completions, **fields) -> list[float]:
  """1.0 where the stripped completion equals the stripped `answer`."""
  answers = _answers(fields, 'exact_match', len(completions))
  return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]


def _last_number(text: str) -> float | None:
  found = _NUMBER.findall(text.replace(',', ''))
  return float(found[-1]) if found else None


def numeric(prompts, completions, **fields) -> list[float]:
  """1.0 where the completion's last number equals the `answer`'s number."""
  answers = _answers(fields, 'numeric', len(completions))
  out = []
  for c, a in zip(completions, answers):
    got, want = _last_number(c), _last_number(str(a))
    out.append(float(got is not None and want is not None and got == want))
  return out


def format_match(prompts, completions, *, pattern: str, **fields) -> list[float]:
  """1.0 where the whole stripped completion matches `pattern`."""
  regex = re.compile(pattern, re.DOTALL)
  return [float(regex.fullmatch(c.strip()) is not None) for c in completions]


BUILT_IN = {'exact_match': exact_match, 'numeric': numeric, 'format': format_match}


def resolve(name: str, format_pattern: str = '') -> RewardFn:
  """The reward function `name` names (a built-in or 'module:function')."""
  if name == 'format':
    if not format_pattern:
      raise RewardError("reward 'format' needs config.grpo.format_pattern (a regex).")
    try:
      re.compile(format_pattern)
    except re.error as e:
      raise RewardError(f'config.grpo.format_pattern={format_pattern!r} is not a regex: {e}.')
    return functools.partial(format_match, pattern=format_pattern)
  if name in BUILT_IN:
    return BUILT_IN[name]
  if ':' not in name:
    raise RewardError(f'config.grpo.rewards: unknown reward {name!r}; built-ins are '
                      f"{sorted(BUILT_IN)}, or name your own as 'package.module:function'.")
  module_name, _, attr = name.partition(':')
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except (any import failure, named)
    raise RewardError(f'config.grpo.rewards: cannot import {module_name!r} for reward {name!r}: '
                      f'{type(e).__name__}: {e}') from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise RewardError(f'config.grpo.rewards: {module_name!r} has no function {attr!r}.')
  return fn


def score(fns: Mapping[str, RewardFn], weights: Sequence[float], prompts: Sequence[str],
          completions: Sequence[str], fields: Mapping[str, Sequence[Any]],
          ) -> tuple[list[float], dict[str, list[float]]]:
  """(weighted total per completion, each function's rewards by name). A function that raises
  or returns anything but len(completions) finite numbers raises RewardError naming it (with
  the last frame of its traceback)."""
  per_fn = {}
  for name, fn in fns.items():
    try:
      values = fn(list(prompts), list(completions), **{k: list(v) for k, v in fields.items()})
    except RewardError:
      raise
    except Exception as e:  # pylint: disable=broad-except (a user's function: summarise it)
      frame = traceback.extract_tb(e.__traceback__)[-1]
      raise RewardError(f'reward function {name!r} raised {type(e).__name__}: {e} (at '
                        f'{frame.filename}:{frame.lineno}, in {frame.name}).') from e
    per_fn[name] = _check(name, values, len(completions))
  totals = [sum(w * per_fn[name][i] for name, w in zip(fns, weights))
            for i in range(len(completions))]
  return totals, per_fn


def _check(name: str, values: Any, n: int) -> list[float]:
  try:
    values = list(values)
  except TypeError:
    raise RewardError(f'reward function {name!r} returned {type(values).__name__}; expected a '
                      f'list of {n} numbers.') from None
  if len(values) != n:
    raise RewardError(f'reward function {name!r} returned {len(values)} values for {n} '
                      'completions.')
  out = []
  for i, v in enumerate(values):
    if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
      raise RewardError(f'reward function {name!r} returned {v!r} (a {type(v).__name__}) for '
                        f'completion {i}; expected a number.')
    v = float(v)
    if not math.isfinite(v):
      raise RewardError(f'reward function {name!r} returned {v} for completion {i}; rewards '
                        'must be finite.')
    out.append(v)
  return out
