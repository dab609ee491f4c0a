"""Model hyperparameters: `ModelConfig` and the named presets of every Gemma text model.

Numbers follow transformers' `GemmaConfig`, `Gemma2Config`, `Gemma3TextConfig` and
`Gemma4TextConfig` (checked by tests/test_config.py) and the official checkpoints (Gemma 1/2
embeddings padded to 256128 rows).
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
  H head_dim, V vocab_size, I per_layer_input_dim, E num_experts.

  Gemma 4 (family 4, transformers' `Gemma4TextConfig`) adds: GLOBAL layers with their own H and K
  (`global_head_dim`, `num_global_kv_heads`), keys that are also the values there
  (`attention_k_eq_v`), RoPE on only a fraction of H there (`rope_fraction_global`, transformers'
  'proportional' RoPE), the last `num_kv_shared_layers` layers reusing the keys and values of the
  last earlier layer of their type (and a double-wide MLP where `double_wide_mlp`), per-layer input
  embeddings (`per_layer_input_dim` > 0) and mixture-of-experts blocks beside the MLP
  (`num_experts` > 0). Its norms multiply by their scale (Gemma 1-3: by 1 + scale), its values
  are RMS-normed, its queries are not scaled (`query_pre_attn_scalar` 1) and every layer ends with
  a learned `layer_scalar`.
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
  family: int = 1  # 1..4: which Gemma generation (what the HF exporter writes)
  # Gemma 4 (defaults: off).
  global_head_dim: int | None = None  # H of GLOBAL layers; None: head_dim
  num_global_kv_heads: int | None = None  # K of GLOBAL layers; None: num_kv_heads
  attention_k_eq_v: bool = False  # GLOBAL layers project keys only; values are those keys
  rope_fraction_global: float = 1.0  # fraction of H rotated on GLOBAL layers (the rest: angle 0)
  num_kv_shared_layers: int = 0  # the last layers reuse k/v of the last earlier layer of their type
  double_wide_mlp: bool = False  # KV-shared layers have an MLP of width 2F
  per_layer_input_dim: int = 0  # I: per-layer input embedding width (0: none)
  per_layer_vocab_size: int | None = None  # rows of the per-layer table; None: vocab_size
  num_experts: int = 0  # E: experts of each layer's MoE block (0: dense layers only)
  num_experts_per_token: int = 0  # top-k experts each token is routed to
  expert_hidden_dim: int = 0  # F of one expert

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
    k_global = self.layer_kv_heads(AttentionType.GLOBAL)
    if self.num_heads % k_global:
      raise ValueError(f'ModelConfig {self.name!r}: num_heads={self.num_heads} is not a multiple '
                       f'of num_global_kv_heads={k_global}.')
    if self.num_experts:
      if not 0 < self.num_experts_per_token <= self.num_experts:
        raise ValueError(
            f'ModelConfig {self.name!r}: num_experts_per_token={self.num_experts_per_token} '
            f'must be in 1..num_experts={self.num_experts}.')
      if self.expert_hidden_dim < 1:
        raise ValueError(f'ModelConfig {self.name!r}: MoE layers need expert_hidden_dim >= 1.')
    if not 0 <= self.num_kv_shared_layers < self.num_layers:
      raise ValueError(f'ModelConfig {self.name!r}: num_kv_shared_layers='
                       f'{self.num_kv_shared_layers} must be in 0..num_layers-1.')
    for i in range(self.first_kv_shared_layer, self.num_layers):
      self.kv_source(i)  # every shared layer has a source of its type
    if self.family < 4 and (self.per_layer_input_dim or self.num_experts or self.attention_k_eq_v
                            or self.num_kv_shared_layers or self.global_head_dim
                            or self.num_global_kv_heads or self.rope_fraction_global != 1.0):
      raise ValueError(f'ModelConfig {self.name!r}: Gemma 4 features need family=4.')

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def fused_qkv(self) -> bool:
    """Official checkpoints fuse q, k and v into one `qkv_einsum` when N == K (Gemma 1 7B)."""
    return self.num_heads == self.num_kv_heads and self.family < 4

  @property
  def norm_plus_one(self) -> bool:
    """Gemma 1-3 norms multiply by (1 + scale), zero-initialised; Gemma 4's by scale."""
    return self.family < 4

  def layer_head_dim(self, attn_type: AttentionType) -> int:
    """H of a layer of this type."""
    if attn_type == AttentionType.GLOBAL and self.global_head_dim:
      return self.global_head_dim
    return self.head_dim

  def layer_kv_heads(self, attn_type: AttentionType) -> int:
    """K of a layer of this type."""
    if attn_type == AttentionType.GLOBAL and self.num_global_kv_heads:
      return self.num_global_kv_heads
    return self.num_kv_heads

  def k_eq_v(self, attn_type: AttentionType) -> bool:
    """Whether a layer of this type uses its keys as values (no value projection)."""
    return self.attention_k_eq_v and attn_type == AttentionType.GLOBAL

  @property
  def first_kv_shared_layer(self) -> int:
    return self.num_layers - self.num_kv_shared_layers

  def kv_source(self, layer: int) -> int | None:
    """The layer whose keys and values layer `layer` reuses (the last earlier non-shared layer
    of its type), or None when it computes its own."""
    if layer < self.first_kv_shared_layer:
      return None
    kind = self.attention_types[layer]
    for j in range(self.first_kv_shared_layer - 1, -1, -1):
      if self.attention_types[j] == kind:
        return j
    raise ValueError(f'ModelConfig {self.name!r}: KV-shared layer {layer} ({kind.value}) has no '
                     f'earlier {kind.value} layer to share keys and values with.')

  def layer_hidden_dim(self, layer: int) -> int:
    """F of layer `layer`'s MLP: doubled on KV-shared layers where `double_wide_mlp`."""
    wide = self.double_wide_mlp and self.kv_source(layer) is not None
    return self.hidden_dim * (2 if wide else 1)

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


def gemma4_pattern(num_layers: int, period: int) -> tuple[AttentionType, ...]:
  """Gemma 4's layers: `layer_pattern`, with the last layer always GLOBAL (transformers'
  Gemma4TextConfig forces it)."""
  return layer_pattern(num_layers - 1, period) + (G,)


def _gemma4(name, L, D, F, N, H, K, *, window, period, V=262_144, **extras) -> ModelConfig:
  """A Gemma 4 config: post-norms, QK-norm, unscaled queries, RoPE 10k local / 1M global."""
  return ModelConfig(name=name, num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N,
                     head_dim=H, num_kv_heads=K, vocab_size=V,
                     attention_types=gemma4_pattern(L, period), sliding_window=window,
                     query_pre_attn_scalar=1.0, use_post_attn_norm=True, use_post_ffw_norm=True,
                     use_qk_norm=True, rope_base_global=1_000_000.0, rope_base_local=10_000.0,
                     family=4, **extras)


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
        # Gemma 4 (google-deepmind/gemma gm/nn/gemma4, transformers' convert_gemma4_weights.py):
        # global layers with H 512, proportional RoPE over a quarter of it, final soft-cap 30.
        _gemma4('gemma4-e2b', L=35, D=1536, F=6144, N=8, H=256, K=1, window=512, period=5,
                global_head_dim=512, rope_fraction_global=0.25, final_logit_soft_cap=30.0,
                num_kv_shared_layers=20, double_wide_mlp=True, per_layer_input_dim=256,
                max_seq_len=131072),
        _gemma4('gemma4-e4b', L=42, D=2560, F=10240, N=8, H=256, K=2, window=512, period=6,
                global_head_dim=512, rope_fraction_global=0.25, final_logit_soft_cap=30.0,
                num_kv_shared_layers=18, per_layer_input_dim=256, max_seq_len=131072),
        _gemma4('gemma4-26b-a4b', L=30, D=2816, F=2112, N=16, H=256, K=8, window=1024,
                period=6, global_head_dim=512, num_global_kv_heads=2, attention_k_eq_v=True,
                rope_fraction_global=0.25, final_logit_soft_cap=30.0, num_experts=128,
                num_experts_per_token=8, expert_hidden_dim=704, max_seq_len=262144),
        _gemma4('gemma4-31b', L=60, D=5376, F=21504, N=32, H=256, K=16, window=1024, period=6,
                global_head_dim=512, num_global_kv_heads=4, attention_k_eq_v=True,
                rope_fraction_global=0.25, final_logit_soft_cap=30.0, max_seq_len=262144),
        # Tiny models for tests and the CPU quickstart: same code paths, seconds to compile.
        _gemma1('tiny-gemma1', L=2, D=64, F=128, N=4, H=16, K=1, V=512),
        _gemma2('tiny-gemma2', L=2, D=64, F=128, N=4, H=16, K=2, query_pre_attn_scalar=16,
                V=512).replace(sliding_window=8),
        _gemma3('tiny-gemma3', L=6, D=64, F=128, N=4, H=16, K=2, window=8,
                query_pre_attn_scalar=16, rope_scale_global=8.0, max_seq_len=4096, V=512),
        # Every Gemma 4 feature but experts: per-layer inputs, KV sharing (the last 2 layers,
        # one of each type), double-wide MLPs, global layers with their own H and K, k = v,
        # partial RoPE. Layers: local, local, GLOBAL, local (shared), GLOBAL (shared).
        _gemma4('tiny-gemma4', L=5, D=64, F=128, N=4, H=16, K=2, window=8, period=3, V=512,
                global_head_dim=32, num_global_kv_heads=1, attention_k_eq_v=True,
                rope_fraction_global=0.25, num_kv_shared_layers=2, double_wide_mlp=True,
                per_layer_input_dim=8, max_seq_len=4096),
        _gemma4('tiny-gemma4-moe', L=2, D=64, F=96, N=4, H=16, K=2, window=8, period=2, V=512,
                global_head_dim=32, num_global_kv_heads=1, attention_k_eq_v=True,
                rope_fraction_global=0.25, num_experts=8, num_experts_per_token=2,
                expert_hidden_dim=32, final_logit_soft_cap=30.0, max_seq_len=4096),
    ]
}


def get_preset(name: str) -> ModelConfig:
  """Returns the named preset; raises ValueError listing the known names otherwise."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f'Unknown model preset {name!r}; known presets: {", ".join(PRESETS)}.') from None
