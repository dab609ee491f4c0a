r"""The long fuzz run of every file reader gemma_jax ships (tests/fuzz_cases.py; CI runs a sample).

  python bench/fuzz.py --cases 3000 --seed 1          # ~3000 mutated files over all readers
  python bench/fuzz.py --cases 200 --readers gguf,jsonl --show crash,config
  python bench/fuzz.py --real_gguf artifacts/gemma-3-270m-q4_k_m.gguf   # + the real header

--cases is split evenly over the readers. Each case writes one mutated file (or checkpoint
directory) and runs the reader in this process under its time limit; the table gives, per reader,
how many ended in each outcome (tests/fuzz_cases.py: error = the clear ValueError naming the
file; same / data / config = loaded, equal to the unmutated file's result / with other numbers or
text / with another config; crash, hang, memory = failures), the slowest case and the largest
growth of peak RSS in one case. --show prints the cases of the given outcomes. Exit status 1 when
any case crashed, hung or grew memory past the bound.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import fuzz_cases  # noqa: E402
import fuzz_files  # noqa: E402


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--cases', type=int, default=3000, help='mutated files in all')
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--readers', help='comma-separated reader names (default: all)')
  p.add_argument('--real_gguf', help='also fuzz this GGUF file cut after its tensor table')
  p.add_argument('--show', default='crash,hang,memory',
                 help='comma-separated outcomes whose cases are printed')
  args = p.parse_args()
  start = time.time()
  with tempfile.TemporaryDirectory(prefix='gemma_jax_fuzz_') as workdir:
    readers = fuzz_files.make_readers(workdir, args.real_gguf)
    names = args.readers.split(',') if args.readers else list(readers)
    unknown = sorted(set(names) - set(readers))
    if unknown:
      p.error(f'--readers: unknown {unknown}; known: {sorted(readers)}')
    per = {n: args.cases // len(names) + (i < args.cases % len(names))
           for i, n in enumerate(names)}
    show = set(args.show.split(','))

    def progress(o):
      if o.kind in show:
        print(f'{o.kind:7s} {o.reader}: {o.mutation}: {o.message}', flush=True)

    outcomes = fuzz_cases.run(readers, per, args.seed, workdir, progress)
  print(f'\n{len(outcomes)} cases, seed {args.seed}, {time.time() - start:.0f} s, '
        f'peak RSS {fuzz_cases._rss_mb():.0f} MB\n')
  print(fuzz_cases.table(outcomes))
  return int(any(o.kind in ('crash', 'hang', 'memory') for o in outcomes))


if __name__ == '__main__':
  sys.exit(main())
