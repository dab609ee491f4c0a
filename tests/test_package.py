"""gemma_jax installs like a package (`pip install -e .`, done by run_tests.sh and quickstart.sh).

Researchers import it from experiment code outside this checkout, so the checks run in a fresh
interpreter started in a temporary directory, without the repository on PYTHONPATH (pytest.ini puts
it on this process's sys.path, which would hide a missing install).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

_REPO = pathlib.Path(__file__).resolve().parent.parent

_PROBE = """
import importlib.metadata, json
import gemma_jax, gemma_jax.config, gemma_jax.convert, gemma_jax.trainer
dist = importlib.metadata.distribution('gemma-jax')
print(json.dumps({'files': [gemma_jax.__file__, gemma_jax.convert.__file__],
                  'requires': dist.requires or []}))
"""


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> dict:
  """What a fresh interpreter outside the repository sees of the installed gemma_jax."""
  cwd = tmp_path_factory.mktemp('elsewhere')
  assert _REPO not in cwd.resolve().parents, 'the probe must run outside the repository'
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run([sys.executable, '-c', _PROBE], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, (
      'gemma_jax is not importable outside the repository; run `bash run_tests.sh` or '
      f'`pip install --no-deps -e .`:\n{proc.stderr}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _key(req: Requirement) -> tuple:
  """Name and bounds, so spelling (`ml_collections` vs `ml-collections`) does not matter."""
  return canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras))


def _read_requirements(name: str) -> list[Requirement]:
  """Requirement lines of a requirements file, without comments and `-r` includes."""
  lines = (line.split('#', 1)[0].strip() for line in (_REPO / name).read_text().splitlines())
  return [Requirement(line) for line in lines if line and not line.startswith('-r')]


def test_import_resolves_to_this_checkout(installed):
  assert pathlib.Path(installed['files'][0]).resolve() == _REPO / 'gemma_jax' / '__init__.py'
  assert (pathlib.Path(installed['files'][1]).resolve()
          == _REPO / 'gemma_jax' / 'convert' / '__init__.py')


def test_declared_requirements_match_requirement_files(installed):
  runtime, test = [], []
  for req in map(Requirement, installed['requires']):
    if req.marker is None:
      runtime.append(_key(req))
    elif req.marker.evaluate({'extra': 'test'}):
      test.append(_key(req))
  # Stale metadata after editing a requirements file: rerun `bash run_tests.sh`.
  assert sorted(runtime) == sorted(map(_key, _read_requirements('requirements.txt')))
  # The `test` extra in pyproject.toml is a copy of requirements-test.txt, minus its `-r` line.
  assert '-r requirements.txt' in (_REPO / 'requirements-test.txt').read_text().splitlines()
  assert sorted(test) == sorted(map(_key, _read_requirements('requirements-test.txt')))
