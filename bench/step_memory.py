r"""Memory of one training step from XLA's own buffer plan: compiled, never run (no allocation).

    python bench/step_memory.py                    # gemma1-2b and gemma1-7b on one device
    python bench/step_memory.py --runs gemma1-7b:2:2048:full:bfloat16:512

Each run is PRESET:BATCH:SEQ:REMAT:PARAM_DTYPE:LOSS_CHUNK. The trainer's train step (bf16 compute,
AdamW, the state donated) is lowered with abstract inputs and compiled for this machine's first
device; `memory_analysis()` gives the bytes of the state (arguments), the step's temporaries and
its outputs that do not reuse a donated input. Their sum is the step's peak on one device.

Run it on the GPU for that card's plan. On a CPU host the plan is XLA:CPU's, which says little
about a GPU: it computes bfloat16 in float32, has no cuDNN attention, and its scheduler does not
follow remat (gemma1-2b, float32 params, 8 x 2048: the same 217.7 GB of temporaries with remat none, dots
and full). There it still compares loss_chunk settings, whose scan orders the work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import train_bench  # noqa: E402  (bench/, the same run configuration)
from gemma_jax import sharding, train_config, train_state, trainer  # noqa: E402

GB = 1e9
DEFAULT_RUNS = ('gemma1-2b:8:2048:none:bfloat16:0', 'gemma1-2b:8:2048:none:bfloat16:512',
                'gemma1-7b:2:2048:full:bfloat16:0', 'gemma1-7b:2:2048:full:bfloat16:512')


def step_memory(preset: str, batch: int, seq: int, remat: str, param_dtype: str,
                loss_chunk: int) -> dict:
  """Bytes of XLA's plan for one jitted, donated train step on one device."""
  config = train_bench.bench_config(argparse.Namespace(
      preset=preset, dtype='bfloat16', param_dtype=param_dtype, remat=remat,
      loss_chunk=loss_chunk))
  mesh = sharding.make_mesh({'fsdp': 1}, devices=jax.devices()[:1])
  plan = train_state.plan_train_state(train_config.model_config(config), config, mesh)
  step = trainer.jit_train_step(
      trainer.make_train_step(plan.graphdef, plan.rest, plan.tx, plan.schedule, mesh=mesh,
                              loss_chunk=loss_chunk),
      mesh, plan.abstract)
  i32, f32 = jnp.int32, jnp.float32
  batch_spec = {k: jax.ShapeDtypeStruct((batch, seq), t) for k, t in (
      ('tokens', i32), ('targets', i32), ('loss_mask', f32), ('positions', i32),
      ('segment_ids', i32))}
  t0 = time.time()
  compiled = step.lower(plan.abstract, batch_spec).compile()
  m = compiled.memory_analysis()
  new_out = m.output_size_in_bytes - m.alias_size_in_bytes
  return dict(state=m.argument_size_in_bytes, temp=m.temp_size_in_bytes, new_out=new_out,
              peak=m.argument_size_in_bytes + m.temp_size_in_bytes + new_out,
              compile_s=time.time() - t0)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', nargs='+', default=list(DEFAULT_RUNS),
                      help='PRESET:BATCH:SEQ:REMAT:PARAM_DTYPE:LOSS_CHUNK')
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f'XLA buffer plan on {device.platform} ({device.device_kind}); jax {jax.__version__}; '
        'bf16 compute, AdamW, state donated')
  print('| preset | batch x seq | remat | params + AdamW | loss_chunk | state GB | temporaries GB '
        '| new outputs GB | peak GB | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for run in args.runs:
    try:
      preset, batch, seq, remat, param_dtype, chunk = run.split(':')
      r = step_memory(preset, int(batch), int(seq), remat, param_dtype, int(chunk))
    except ValueError as e:
      raise SystemExit(f'--runs {run!r}: {e} (expected PRESET:BATCH:SEQ:REMAT:PARAM_DTYPE:'
                       'LOSS_CHUNK, e.g. gemma1-7b:2:2048:full:bfloat16:512)') from None
    print(f'| {preset} | {batch} x {seq} | {remat} | {param_dtype} | {chunk} '
          f'| {r["state"] / GB:.2f} | {r["temp"] / GB:.2f} | {r["new_out"] / GB:.2f} '
          f'| {r["peak"] / GB:.2f} | {r["compile_s"]:.0f} |', flush=True)


if __name__ == '__main__':
  main()
