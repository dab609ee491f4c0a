"""Model hyperparameters: `ModelConfig` and the named presets of every Gemma text model.

Numbers follow transformers' `GemmaConfig`, `Gemma2Config` and `Gemma3TextConfig` (checked by
tests/test_config.py) and the official checkpoints (Gemma 1/2 embeddings padded to 256128 rows).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class AttentionType(enum.Enum):
  """Global attention sees every earlier token; local attention only the last `sliding_window`."""

  GLOBAL = 'global'
  LOCAL = 'local'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and behaviour of one Gemma decoder.

  Dimension alphabet: L num_layers, D embed_dim, F hidden_dim, N num_heads, K num_kv_heads,
  H head_dim, V vocab_size.
  """

  name: str
  num_layers: int  # L
  embed_dim: int  # D
  hidden_dim: int  # F
  num_heads: int  # N
  head_dim: int  # H
  num_kv_heads: int  # K
  vocab_size: int  # V
  attention_types: tuple[AttentionType, ...]  # one per layer
  sliding_window: int | None = None  # window of LOCAL layers: query q sees key k iff q - k < window
  query_pre_attn_scalar: float | None = None  # queries scaled by this**-0.5; None: head_dim
  attn_logits_soft_cap: float | None = None
  final_logit_soft_cap: float | None = None
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  use_qk_norm: bool = False
  rope_base_global: float = 10_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0  # linear RoPE scaling: positions divided by this factor
  rope_scale_local: float = 1.0
  rms_norm_eps: float = 1e-6
  max_seq_len: int = 8192
  family: int = 1  # 1, 2 or 3: which Gemma generation (what the HF exporter writes)

  def __post_init__(self):
    if len(self.attention_types) != self.num_layers:
      raise ValueError(
          f'ModelConfig {self.name!r}: attention_types has {len(self.attention_types)} entries '
          f'but num_layers is {self.num_layers}.'
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'ModelConfig {self.name!r}: num_heads={self.num_heads} is not a multiple of '
          f'num_kv_heads={self.num_kv_heads}.'
      )
    if AttentionType.LOCAL in self.attention_types and not self.sliding_window:
      raise ValueError(f'ModelConfig {self.name!r}: LOCAL layers need a sliding_window.')

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def fused_qkv(self) -> bool:
    """Official checkpoints fuse q, k and v into one `qkv_einsum` when N == K (Gemma 1 7B)."""
    return self.num_heads == self.num_kv_heads

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (attention types as strings); inverse of `from_dict`."""
    d = dataclasses.asdict(self)
    d['attention_types'] = [t.value for t in self.attention_types]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'ModelConfig: unknown keys {unknown}; expected some of {sorted(known)}.')
    d = dict(d)
    d['attention_types'] = tuple(AttentionType(t) for t in d['attention_types'])
    return cls(**d)


G, LO = AttentionType.GLOBAL, AttentionType.LOCAL

# Each generation's layer pattern as a period (see `layer_pattern`); importers use it where a file
# does not spell the pattern out.
PATTERN_PERIOD = {1: 1, 2: 2, 3: 6}


def layer_pattern(num_layers: int, period: int) -> tuple[AttentionType, ...]:
  """The one rule for local/global layers: every `period`-th layer is GLOBAL, the rest LOCAL.
  Period 1: all global (Gemma 1); 2: local, global, ... (Gemma 2); 6: five local layers, then one
  global, repeated (Gemma 3)."""
  if period < 1:
    raise ValueError(f'layer pattern period must be >= 1, got {period}.')
  return tuple(G if (i + 1) % period == 0 else LO for i in range(num_layers))


def _gemma1(name, L, D, F, N, H, K, V=256_128) -> ModelConfig:
  return ModelConfig(name=name, num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N,
                     head_dim=H, num_kv_heads=K, vocab_size=V,
                     attention_types=layer_pattern(L, PATTERN_PERIOD[1]), family=1)


def _gemma2(name, L, D, F, N, H, K, query_pre_attn_scalar, V=256_128) -> ModelConfig:
  return ModelConfig(name=name, num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N,
                     head_dim=H, num_kv_heads=K, vocab_size=V,
                     attention_types=layer_pattern(L, PATTERN_PERIOD[2]),
                     sliding_window=4096, query_pre_attn_scalar=query_pre_attn_scalar,
                     attn_logits_soft_cap=50.0, final_logit_soft_cap=30.0,
                     use_post_attn_norm=True, use_post_ffw_norm=True, family=2)


def _gemma3(name, L, D, F, N, H, K, window, query_pre_attn_scalar, rope_scale_global,
            max_seq_len, V=262_144) -> ModelConfig:
  return ModelConfig(name=name, num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N,
                     head_dim=H, num_kv_heads=K, vocab_size=V,
                     attention_types=layer_pattern(L, PATTERN_PERIOD[3]),
                     sliding_window=window, query_pre_attn_scalar=query_pre_attn_scalar,
                     use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
                     rope_base_global=1_000_000.0, rope_base_local=10_000.0,
                     rope_scale_global=rope_scale_global, max_seq_len=max_seq_len, family=3)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _gemma1('gemma1-2b', L=18, D=2048, F=16384, N=8, H=256, K=1),
        _gemma1('gemma1-7b', L=28, D=3072, F=24576, N=16, H=256, K=16),
        _gemma2('gemma2-2b', L=26, D=2304, F=9216, N=8, H=256, K=4, query_pre_attn_scalar=256),
        _gemma2('gemma2-9b', L=42, D=3584, F=14336, N=16, H=256, K=8, query_pre_attn_scalar=256),
        _gemma2('gemma2-27b', L=46, D=4608, F=36864, N=32, H=128, K=16,
                query_pre_attn_scalar=144),
        _gemma3('gemma3-270m', L=18, D=640, F=2048, N=4, H=256, K=1, window=512,
                query_pre_attn_scalar=256, rope_scale_global=1.0, max_seq_len=32768),
        _gemma3('gemma3-1b', L=26, D=1152, F=6912, N=4, H=256, K=1, window=512,
                query_pre_attn_scalar=256, rope_scale_global=1.0, max_seq_len=32768),
        _gemma3('gemma3-4b', L=34, D=2560, F=10240, N=8, H=256, K=4, window=1024,
                query_pre_attn_scalar=256, rope_scale_global=8.0, max_seq_len=131072),
        _gemma3('gemma3-12b', L=48, D=3840, F=15360, N=16, H=256, K=8, window=1024,
                query_pre_attn_scalar=256, rope_scale_global=8.0, max_seq_len=131072),
        _gemma3('gemma3-27b', L=62, D=5376, F=21504, N=32, H=128, K=16, window=1024,
                query_pre_attn_scalar=168, rope_scale_global=8.0, max_seq_len=131072),
        # Tiny models for tests and the CPU quickstart: same code paths, seconds to compile.
        _gemma1('tiny-gemma1', L=2, D=64, F=128, N=4, H=16, K=1, V=512),
        _gemma2('tiny-gemma2', L=2, D=64, F=128, N=4, H=16, K=2, query_pre_attn_scalar=16,
                V=512).replace(sliding_window=8),
        _gemma3('tiny-gemma3', L=6, D=64, F=128, N=4, H=16, K=2, window=8,
                query_pre_attn_scalar=16, rope_scale_global=8.0, max_seq_len=4096, V=512),
    ]
}


def get_preset(name: str) -> ModelConfig:
  """Returns the named preset; raises ValueError listing the known names otherwise."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f'Unknown model preset {name!r}; known presets: {", ".join(PRESETS)}.') from None
