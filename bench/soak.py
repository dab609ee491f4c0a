r"""Soak test of preemption and resume: kill a training job dozens of times, end bit-identical.

  python bench/soak.py                          # 50 kills, ~10-15 min on 2 CPU cores
  python bench/soak.py --kills=10 --steps=60 --seed=3 --workdir=/tmp/soak

Not part of CI. First an uninterrupted reference run of train.py (configs/quickstart.py, a small
tiny-gemma1 job checkpointing every --checkpoint_every steps, keeping 2), timed. Then the same
command in another workdir, started again and again and killed each time at a random moment:

  sigkill    SIGKILL at a random moment after the first step compiled
  sigterm    SIGTERM likewise: train.py must finish the step, save it and exit with 75
  term+kill  SIGTERM, then SIGKILL within a second (a preemption whose grace period ran out)
  mid-save   SIGKILL from inside a checkpoint save (bench/soak_runner.py: while Orbax writes,
             just before or after the manifest seals it, or while older steps are pruned)
  startup    SIGKILL or SIGTERM before the first step compiled (imports, restore, compile)

until the job exits 0. After a few kills (--damage) the newest sealed checkpoint is damaged on
purpose (its biggest file truncated or one byte flipped): the rerun must reject it by step and
resume from the one before. Every restart shares one JAX compilation cache, so restarts skip
compiling. At the end the soak run's per-step metrics (metrics.jsonl without wall-clock fields,
with each batch's CRC-32) and final params must equal the reference bit for bit, and no SIGTERM
may lose a step (the rerun resumes from the step train.py said it stopped after). The exit status
is 1 otherwise, and the soak stops at the first anomaly (an unexpected exit status, a traceback,
a hang), printing the attempt, its command line and its output.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gemma_jax.preemption import EXIT_CODE as PREEMPTED  # noqa: E402
from gemma_jax.train_checkpoints import MANIFEST_FILE, TRAIN_CHECKPOINT_DIR  # noqa: E402

KINDS = {'sigkill': 0.25, 'sigterm': 0.35, 'term+kill': 0.1, 'mid-save': 0.2, 'startup': 0.1}
MID_SAVE_PHASES = ('write', 'seal', 'sealed', 'prune')
WALL_CLOCK = ('step_time_s', 'tokens_per_s')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--kills', type=int, default=50, help='kills to survive')
  p.add_argument('--steps', type=int, default=250, help='training steps of the job')
  p.add_argument('--seed', type=int, default=0, help='seed of the kill plan and timings')
  p.add_argument('--workdir', default=None,
                 help='new or empty directory for both runs, the logs and the JAX cache '
                      '(default: a new temporary directory, kept)')
  p.add_argument('--damage', type=int, default=5,
                 help='times to damage the newest checkpoint on purpose between restarts')
  p.add_argument('--checkpoint_every', type=int, default=5)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--seq_len', type=int, default=48)
  p.add_argument('--timeout', type=float, default=600, help='seconds before an attempt hangs')
  args = p.parse_args(argv)
  if args.kills < 0 or args.steps < 2 or args.damage < 0 or args.checkpoint_every < 1:
    p.error('--kills and --damage must be >= 0, --steps >= 2, --checkpoint_every >= 1')
  return args


def train_flags(args, workdir: str) -> list[str]:
  """train.py's flags for the job (the same for the reference and every soak attempt)."""
  overrides = {'model.preset': 'tiny-gemma1', 'steps': args.steps,
               'batch_size': args.batch_size, 'seq_len': args.seq_len,
               'checkpoint_every': args.checkpoint_every, 'keep_checkpoints': 2,
               'log_every': 1, 'eval_every': 0, 'exact_match.examples': 0,
               'optimizer.warmup_steps': 5}
  return ([f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', f'--workdir={workdir}']
          + [f'--config.{k}={v}' for k, v in overrides.items()])


class Attempt:
  """One process of the job: started, watched line by line on stdout, maybe signalled."""

  def __init__(self, cmd: list[str], env: dict[str, str], log_prefix: str):
    self.cmd, self.env, self.log_prefix = cmd, env, log_prefix
    self.t0 = time.time()
    self.err_file = open(log_prefix + '.err', 'w')
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=self.err_file, text=True)
    self.lines: list[tuple[float, str]] = []  # (seconds since start, line)
    self.compiled = threading.Event()
    self.last_step = None  # the newest step whose progress line was printed
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    with open(self.log_prefix + '.out', 'w') as log:
      for line in iter(self.proc.stdout.readline, ''):
        log.write(line)
        self.lines.append((time.time() - self.t0, line.rstrip('\n')))
        m = re.match(r'step (\d+)/', line)
        if m:
          self.last_step = int(m.group(1))
        if line.startswith('First step compiled'):
          self.compiled.set()

  def signal(self, sig: int) -> int | None:
    """Sends `sig` if the process still runs; returns the newest step printed before it."""
    step = self.last_step
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
    return step

  def finish(self, timeout: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) once the process ended; raises TimeoutError on a hang."""
    try:
      rc = self.proc.wait(timeout=max(1.0, timeout - (time.time() - self.t0)))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise TimeoutError(f'no exit within {timeout:.0f}s') from None
    self._reader.join()
    self.err_file.close()
    with open(self.log_prefix + '.err') as f:
      err = f.read()
    return rc, '\n'.join(line for _, line in self.lines), err

  def seen(self, prefix: str) -> float | None:
    """Seconds after start when a stdout line starting with `prefix` came (None: not yet)."""
    return next((t for t, line in self.lines if line.startswith(prefix)), None)


def plan_kills(rng: random.Random, kills: int) -> list[str]:
  """`kills` kinds in a random order, in the proportions of KINDS (each kind at least once when
  there are enough kills)."""
  counts = {k: int(round(share * kills)) for k, share in KINDS.items()}
  while sum(counts.values()) > kills:
    counts[max(counts, key=counts.get)] -= 1
  while sum(counts.values()) < kills:
    counts[min(counts, key=counts.get)] += 1
  plan = [k for k, n in counts.items() for _ in range(n)]
  rng.shuffle(plan)
  return plan


def sealed_steps(workdir: str) -> list[int]:
  """The job's sealed checkpoint steps (a step directory with a manifest), oldest first."""
  directory = os.path.join(workdir, TRAIN_CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.exists(os.path.join(directory, d, MANIFEST_FILE)))


def damage_newest(rng: random.Random, workdir: str, mode: str) -> tuple[int, str]:
  """Truncates (mode 'truncate') or flips one bit of ('flip') the biggest file its manifest lists
  in the newest sealed checkpoint; returns (step, file)."""
  step = sealed_steps(workdir)[-1]
  directory = os.path.join(workdir, TRAIN_CHECKPOINT_DIR, str(step))
  with open(os.path.join(directory, MANIFEST_FILE)) as f:
    files = json.load(f)['files']
  name = max(files, key=lambda n: files[n]['bytes'])
  path, size = os.path.join(directory, name), files[name]['bytes']
  if mode == 'truncate':
    os.truncate(path, rng.randrange(size))
  else:
    with open(path, 'r+b') as f:
      f.seek(rng.randrange(size))
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
  return step, name


def train_records(workdir: str) -> list[dict]:
  """Per-step training records of metrics.jsonl, without the wall-clock fields."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK}
            for r in map(json.loads, f) if 'loss' in r]


def params_identical(reference: str, soak: str) -> str | None:
  """None when the final params of both workdirs are bit-identical, else what differs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma_jax import checkpoint  # pylint: disable=g-import-not-at-top

  def flat(workdir):
    params = nnx.state(checkpoint.load_params(os.path.join(workdir, 'final')), nnx.Param)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}

  ref, got = flat(reference), flat(soak)
  if ref.keys() != got.keys():
    return f'different parameter names: {sorted(ref.keys() ^ got.keys())[:5]}'
  differ = [k for k in ref if ref[k].dtype != got[k].dtype or ref[k].shape != got[k].shape
            or ref[k].tobytes() != got[k].tobytes()]
  return f'{len(differ)} of {len(ref)} params differ, e.g. {differ[:3]}' if differ else None


class Anomaly(Exception):
  """An attempt ended in a way a correct trainer never ends: the soak stops there."""


def expected_status(sigs: tuple[int, ...], where: str) -> set[int]:
  """The exit statuses allowed after sending `sigs` (in order) to a job at `where`: 'startup'
  (before the first step compiled), 'loop' or 'end' (after the last step printed). 0 is always
  allowed: the job finished before the signal landed, or a SIGTERM came during the last step,
  which is not interrupted."""
  ok = {0}
  if signal.SIGKILL in sigs:
    ok.add(-signal.SIGKILL)
  if signal.SIGTERM in sigs:
    ok.add(PREEMPTED if where != 'end' else 0)
    if where != 'loop':  # outside the training loop SIGTERM keeps its default action
      ok.add(-signal.SIGTERM)
  return ok


def launch(kind: str, rng: random.Random, flags: list[str], env: dict[str, str], log: str):
  """Starts one attempt of `kind`: (Attempt, note); mid-save ones under bench/soak_runner.py."""
  if kind != 'mid-save':
    return Attempt([sys.executable, 'train.py'] + flags, env, log), ''
  phase, save = rng.choice(MID_SAVE_PHASES), rng.choice((1, 2))
  env = dict(env, SOAK_KILL_PHASE=phase, SOAK_KILL_SAVE=str(save),
             SOAK_KILL_DELAY=f'{rng.uniform(0, 0.3):.3f}')
  return Attempt([sys.executable, os.path.join('bench', 'soak_runner.py')] + flags, env, log), (
      f'save #{save}, {phase}')


def soak(args, rng: random.Random, soak_dir: str, logs: str, env: dict[str, str],
         t_first: float, t_step: float) -> dict:
  """Runs the soak attempts until the job exits 0 (see the module docstring); returns the tally.
  Raises Anomaly at the first attempt that ends in an unexpected way."""
  plan = plan_kills(rng, args.kills)
  slots = range(max(0, len(plan) - 1))  # damage after a kill, never after the last one
  damage_after = set(rng.sample(slots, min(args.damage, len(slots))))
  flags = train_flags(args, soak_dir)
  tally = {'attempts': [], 'kinds': collections.Counter(), 'sigterm': collections.Counter(),
           'rejected': [], 'unexpected_rejections': [], 'damaged': [], 'term_lost': [],
           'term_excluded': [], 'kill_lost': 0, 'damage_lost': 0,
           'midsave': collections.Counter(), 'midsave_cut': 0}
  pending = []  # attempts since the last one that printed where it resumed
  expected_damage = {}  # step -> file of a deliberate damage not reported yet
  damage_due = 0
  t_start = time.time()
  for number in range(1, len(plan) + 2):
    kind = plan[number - 1] if number <= len(plan) else 'none'
    attempt, note = launch(kind, rng, flags, env, os.path.join(logs, f'attempt_{number:03d}'))
    sigs, sent_step, where = (), None, 'loop'
    if kind == 'startup':
      sigs = (rng.choice((signal.SIGKILL, signal.SIGTERM)),)
      delay = rng.uniform(0, t_first)
      note = f'{signal.Signals(sigs[0]).name} {delay:.2f}s after launch'
    elif kind in ('sigkill', 'sigterm', 'term+kill'):
      while not attempt.compiled.wait(0.05) and attempt.proc.poll() is None:
        if time.time() - attempt.t0 > args.timeout:
          break
      # Spread the kills over the job: expected progress of ~(steps left / kills left).
      kills_left = sum(1 for k in plan[number:] if k != 'startup')
      window = 2.0 * (args.steps - (_resume_step(attempt.lines) or 0)) / (kills_left + 1)
      delay = rng.uniform(0, t_step * max(1.0, window))
      sigs = {'sigkill': (signal.SIGKILL,), 'sigterm': (signal.SIGTERM,),
              'term+kill': (signal.SIGTERM, signal.SIGKILL)}[kind]
      note = f'{delay:.2f}s after the first step'
    if sigs:
      time.sleep(delay)
      where = 'startup' if not attempt.compiled.is_set() else 'loop'
      sent_step = attempt.signal(sigs[0])
      where = 'end' if sent_step == args.steps else where
      if len(sigs) > 1:
        grace = rng.uniform(0, 1.0)
        time.sleep(grace)
        attempt.signal(sigs[1])
        note += f', SIGKILL {grace:.2f}s later'
    try:
      rc, out, err = attempt.finish(args.timeout)
    except TimeoutError as e:
      raise Anomaly(_describe(number, kind, note, attempt, None, str(e))) from None
    if 'First step compiled' in out:
      t_first = attempt.seen('First step compiled')  # warm cache from now on
    resumed = _resume_step(attempt.lines)
    stop = re.search(r'Stopped by (\w+) after step (\d+)', err)
    killed_in = re.search(r'soak_runner: SIGKILL .*?: step (\d+) \((\w+)\)', err)
    if killed_in:
      note += f': {err[killed_in.start() + 21:killed_in.end()]}'
    record = {'number': number, 'kind': kind, 'note': note, 'status': rc, 'resumed': resumed,
              'last_step': attempt.last_step, 'sent_step': sent_step,
              'stopped': int(stop.group(2)) if stop else None}
    tally['attempts'].append(record)
    print(_line(record, time.time() - t_start), flush=True)
    problem = None
    if rc not in expected_status(sigs or ((signal.SIGKILL,) if kind == 'mid-save' else ()),
                                 where):
      problem = f'exit status {rc} after {"+".join(signal.Signals(s).name for s in sigs)} ' \
                f'({where})'
    elif 'Traceback' in err:
      problem = 'a traceback on stderr'
    elif rc == 0 and 'Done: final params' not in out:
      problem = 'exit status 0 without "Done"'
    elif rc == PREEMPTED and not (stop and stop.group(1) == 'SIGTERM'):
      problem = f'exit status {PREEMPTED} without "Stopped by SIGTERM after step N" on stderr'
    elif rc == PREEMPTED and sent_step is not None and record['stopped'] < sent_step:
      problem = f'stopped after step {record["stopped"]}, before step {sent_step} it had printed'
    if problem:
      raise Anomaly(_describe(number, kind, note, attempt, rc, problem))

    for step, reason in re.findall(r'Checkpoint at step (\d+) is damaged: (.*?)\. Moved aside',
                                   out):
      if expected_damage.pop(int(step), None) is not None:
        tally['rejected'].append((int(step), reason))
      else:
        tally['unexpected_rejections'].append((number, int(step), reason))
    if resumed is not None:
      for p in pending:  # what the attempts since the previous resume lost
        if p['status'] == PREEMPTED and not p.get('damaged'):
          tally['term_lost'].append((p['number'], p['sent_step'], p['stopped'], resumed))
        elif p['status'] == PREEMPTED:
          tally['term_excluded'].append(p['number'])
          tally['damage_lost'] += p['stopped'] - resumed
        elif p['last_step'] is not None:
          tally['damage_lost' if p.get('damaged') else 'kill_lost'] += max(
              0, p['last_step'] - resumed)
      pending = []
    if killed_in:
      tally['midsave'][killed_in.group(2)] += 1
      tally['midsave_cut'] += int(killed_in.group(1)) not in sealed_steps(soak_dir)
    if rc == 0:
      break
    tally['kinds'][kind] += 1
    if signal.SIGTERM in sigs:
      tally['sigterm'][('grace' if kind == 'term+kill' else where, rc)] += 1
    pending.append(record)
    damage_due += number - 1 in damage_after
    if damage_due and len(sealed_steps(soak_dir)) >= 2:
      step, path = damage_newest(rng, soak_dir, mode := rng.choice(('truncate', 'flip')))
      expected_damage[step] = path
      tally['damaged'].append((step, path, mode))
      for p in pending:
        p['damaged'] = True
      damage_due -= 1
      print(f'        damaged the checkpoint of step {step}: {mode} {path}', flush=True)
  tally['wall_s'] = time.time() - t_start
  tally['unreported_damage'] = expected_damage
  return tally


def _resume_step(lines) -> int | None:
  for _, line in lines:
    m = re.match(r'Resuming from the checkpoint at step (\d+)', line)
    if m or line.startswith('Starting at step 0'):
      return int(m.group(1)) if m else 0
  return None


def _line(r: dict, elapsed: float) -> str:
  start = '?' if r['resumed'] is None else r['resumed']
  last = '-' if r['last_step'] is None else r['last_step']
  stop = f', stopped after step {r["stopped"]}' if r['stopped'] is not None else ''
  return (f'{elapsed:5.0f}s #{r["number"]:<3d} from step {start:<4} {r["kind"]:9s} '
          f'({r["note"]}): exit {r["status"]}, last step printed {last}{stop}')


def _describe(number, kind, note, attempt, rc, problem) -> str:
  extra = ' '.join(f'{k}={v}' for k, v in attempt.env.items()
                   if k.startswith(('SOAK_', 'JAX_COMP')))
  return (f'attempt #{number} ({kind}, {note}): {problem}\n  command: {extra} '
          f'{" ".join(attempt.cmd)}\n  exit status: {rc}\n  logs: {attempt.log_prefix}.out/.err\n'
          '--- stdout (tail) ---\n' + '\n'.join(l for _, l in attempt.lines[-15:])
          + '\n--- stderr (tail) ---\n' + _tail(attempt.log_prefix + '.err'))


def _tail(path: str, chars: int = 3000) -> str:
  with open(path, errors='replace') as f:
    return f.read()[-chars:]


def reference_run(args, directory: str, logs: str, env: dict[str, str]):
  """The uninterrupted run: (wall seconds, seconds to the first step, seconds per step)."""
  attempt = Attempt([sys.executable, 'train.py'] + train_flags(args, directory), env,
                    os.path.join(logs, 'reference'))
  rc, out, _ = attempt.finish(args.timeout)
  wall = time.time() - attempt.t0
  if rc != 0:
    raise Anomaly(f'the reference run failed with exit status {rc}:\n'
                  + '\n'.join(out.splitlines()[-10:]) + '\n' + _tail(attempt.log_prefix + '.err'))
  first, last = attempt.seen('First step compiled'), attempt.seen(f'step {args.steps}/')
  return wall, first, (last - first) / (args.steps - 1)


def report(args, tally: dict, ref_wall: float, verdicts: list[tuple[str, bool]]) -> str:
  """The soak's table."""
  kinds = ', '.join(f'{k} {n}' for k, n in sorted(tally['kinds'].items()))
  rows = [('kills survived', f'{sum(tally["kinds"].values())} of {args.kills} planned '
           f'({kinds})')]
  if tally['midsave']:
    rows.append(('  SIGKILLs inside a save', ', '.join(
        f'{p} {n}' for p, n in sorted(tally['midsave'].items()))
        + f'; {tally["midsave_cut"]} of them left their step unfinished'))
  where = {'loop': 'in the training loop', 'startup': 'before the first step',
           'end': 'after the last step', 'grace': 'then SIGKILL within 1s'}
  for w in where:
    seen = sorted((rc, n) for (w2, rc), n in tally['sigterm'].items() if w2 == w)
    if seen:
      rows.append((f'  SIGTERM {where[w]}', ', '.join(f'exit {rc}: {n}' for rc, n in seen)))
  rows.append(('restarts', f'{len(tally["attempts"]) - 1}'))
  rows.append(('damaged on purpose', f'{len(tally["damaged"])} ('
               + ', '.join(f'step {s} {m}' for s, _, m in tally['damaged']) + ')'))
  rows.append(('rejected as damaged', f'{len(tally["rejected"])} of them'
               + (f', plus {len(tally["unexpected_rejections"])} not damaged by us: '
                  f'{tally["unexpected_rejections"]}' if tally['unexpected_rejections'] else '')))
  terms = tally['term_lost']
  rows.append(('SIGTERM stops checked', f'{len(terms)} (+{len(tally["term_excluded"])} whose '
               'checkpoint we then damaged)'))
  rows.append(('steps lost to SIGTERM', f'{sum(stop - res for _, _, stop, res in terms)} '
               '(goal 0)'))
  rows.append(('  printed/stopped/resumed', ' '.join(
      f'{"-" if sent is None else sent}/{stop}/{res}' for _, sent, stop, res in terms)))
  rows.append(('steps lost to SIGKILL', f'{tally["kill_lost"]} (recomputed)'))
  rows.append(('steps lost to our damage', f'{tally["damage_lost"]} (recomputed)'))
  wall, restarts = tally['wall_s'], max(1, len(tally['attempts']) - 1)
  rows.append(('wall time', f'soak {wall:.0f}s vs reference {ref_wall:.0f}s: overhead '
               f'{wall - ref_wall:.0f}s (x{wall / ref_wall:.1f}), '
               f'{(wall - ref_wall) / restarts:.1f}s per restart'))
  rows += [(name, 'yes' if ok else 'NO') for name, ok in verdicts]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv=None) -> int:
  args = parse_args(argv)
  base = args.workdir or tempfile.mkdtemp(prefix='gemma_soak_')
  if os.path.exists(base) and os.listdir(base):
    sys.exit(f'soak.py: --workdir={base} is not empty: give a new or empty directory')
  ref_dir, soak_dir, logs = (os.path.join(base, d) for d in ('reference', 'soak', 'logs'))
  os.makedirs(logs)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(base, 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  rng = random.Random(args.seed)
  print(f'Soak in {base}: {args.steps} steps, {args.kills} kills, seed {args.seed}', flush=True)
  try:
    ref_wall, t_first, t_step = reference_run(args, ref_dir, logs, env)
    print(f'Reference: {ref_wall:.1f}s ({t_first:.1f}s to the first step, '
          f'{1000 * t_step:.0f} ms a step with checkpoints)', flush=True)
    tally = soak(args, rng, soak_dir, logs, env, t_first, t_step)
  except Anomaly as e:
    print(f'\nANOMALY (seed {args.seed}, workdir {base}): {e}', flush=True)
    return 1
  got, want = train_records(soak_dir), train_records(ref_dir)
  params = params_identical(ref_dir, soak_dir)
  verdicts = [
      ('metrics.jsonl has each step once',
       [r['step'] for r in got] == list(range(1, args.steps + 1))),
      ('per-step metrics bit-identical', got == want),
      ('final params bit-identical', params is None),
      ('no SIGTERM lost a step', all(stop == res for _, _, stop, res in tally['term_lost'])),
      ('every damaged checkpoint rejected', not tally['unreported_damage']),
  ]
  print('\n' + report(args, tally, ref_wall, verdicts), flush=True)
  if params:
    print(f'final params: {params}')
  if got != want:
    bad = next((g, w) for g, w in zip(got + [None] * len(want), want) if g != w)
    print(f'first differing record: soak {bad[0]} vs reference {bad[1]}')
  return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == '__main__':
  sys.exit(main())
