"""LoRA on real weights: rank-16 adapters on Gemma 3 270M (the bundled GGUF) for the quickstart task.

  python train.py --config=configs/gemma3_270m_lora.py --workdir=/tmp/g3_270m_lora

Same data, steps and evaluation as configs/gemma3_270m_sft.py, but only the adapters train
(gemma_jax/lora.py: every attention and MLP projection; the embedding and norms stay frozen), so
the optimiser state is that of ~3.8M parameters instead of 268M. Checkpoints hold the adapters
only; WORKDIR/final is the merged model, which sample.py reads like any other.
"""

from configs import gemma3_270m_sft  # the base: same data, steps and evaluation


def get_config():
  c = gemma3_270m_sft.get_config()
  c.learning_rate = 1e-3  # adapters start at zero and need a larger step than full fine-tuning
  c.lora.rank = 16
  c.lora.alpha = 32.0
  return c
