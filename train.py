r"""Fine-tunes a Gemma model as one config file describes.

  python train.py --config=configs/quickstart.py --workdir=/tmp/run [--config.steps=100 ...]

Rerunning the same command resumes from the newest intact checkpoint in --workdir. SIGTERM (a
preemption) or Ctrl-C saves a checkpoint at the step reached and exits with status 75
(gemma_jax.preemption.EXIT_CODE); a second Ctrl-C stops at once. Every config key is
listed in gemma_jax/train_config.py; `--config.a.b=value` overrides one (unknown keys fail here,
before any work). The final params-only checkpoint for sample.py lands in WORKDIR/final.
"""

import importlib.util
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gemma_jax import distributed
from gemma_jax import preemption
from gemma_jax import train_checkpoints
from gemma_jax import train_config
from gemma_jax import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def _unknown_overrides(argv) -> list[str]:
  """The `--config.a.b=v` arguments whose key is not in the config file's config."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None:
    return []
  spec = importlib.util.spec_from_file_location('train_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  bad = []
  for arg in argv:
    if arg.startswith('--config.'):
      node = config
      for part in arg[len('--config.'):].split('=', 1)[0].split('.'):
        if not hasattr(node, 'keys') or part not in node:
          bad.append(arg)
          break
        node = node[part]
  return bad


def _parse_flags(argv):
  """absl's parsing, with errors that name the offending --config override."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    unknown = _unknown_overrides(argv)
    reason = (f'unknown config key in {", ".join(unknown)} (every key is listed in '
              'gemma_jax/train_config.py)' if unknown else str(e))
    print(f'train.py: error: {reason}', file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.maybe_initialize_distributed()  # multi-host runs: before any other JAX call
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except trainer.Preempted as e:  # every process says so: each names the signal it saw
    print(f'train.py: {e}', file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except (train_config.ConfigError, trainer.NonFiniteLossError, train_checkpoints.CheckpointError,
          train_checkpoints.CheckpointSaveError) as e:
    print(f'train.py: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
