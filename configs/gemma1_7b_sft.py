"""Gemma 1 7B full fine-tuning on several GPUs/TPUs (FSDP x tensor parallelism, bfloat16 compute).

  python train.py --config=configs/gemma1_7b_sft.py --workdir=/ckpt/g7b \\
      --config.model.init=official --config.model.init_path=/data/gemma-7b   # or init=hf

Initial weights, tokenizer and data: as in configs/gemma1_2b_sft.py, which this config builds on.
Memory: float32 master weights + AdamW = 16 bytes/parameter (8.5B: ~137 GB) sharded over the
mesh, so it needs several accelerators (e.g. 8 x 80 GB: fsdp 4 x tensor 2); remat='full' keeps
only block inputs; 2 micro-batches per step; loss_chunk=512 fuses the output head into the loss
so the float32 [B, T, 256000] logits (2.1 GB per 1 x 2048 row, plus their gradient) never exist
whole (gemma_jax/loss.py).
"""

from configs import gemma1_2b_sft  # the base: only the size-dependent settings differ


def get_config():
  c = gemma1_2b_sft.get_config()
  c.batch_size = 16  # global rows per optimizer step (2 micro-batches of 8)
  c.model.preset = 'gemma1-7b'
  c.model.remat = 'full'
  c.loss_chunk = 512
  c.optimizer.grad_accum_steps = 2
  c.mesh.tensor = 2  # 2-way tensor parallel x FSDP over the other devices (mesh.fsdp = -1)
  return c
