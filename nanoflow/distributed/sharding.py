"""How a model is split over tensor-parallel ranks, and reading one rank's slice of a checkpoint.

Rank r of N holds (Megatron's layout, as vLLM / SGLang):
- q heads r*Hq/N .. (r+1)*Hq/N; KV heads r*Hk/N .. when Hk >= N, else one KV head, r*Hk//N,
  replicated on the N/Hk ranks whose q heads use it (GQA groups never straddle ranks);
- qkv_proj and gate_up_proj column-parallel (their output rows), o_proj and down_proj row-parallel
  (their input columns: each rank's output is a partial sum, all-reduced by the layer's network ops);
- MoE (Mixtral, Qwen2-MoE, Qwen3-MoE): every expert's gate / up rows and down columns (the experts' inner
  dimension); router replicated; Qwen2-MoE's shared expert split like a dense MLP (its own width), its
  sigmoid gate replicated (each rank scales its partial sum by the same gate);
- Qwen3's per-head q / k norms replicated (head_dim wide: the same on every head);
- embedding and LM head vocab-parallel: ceil(V/N) rows per rank, the last rank's tail zero-padded;
- norms replicated.
The rank's model is built from `shard_config` (local head counts and MLP width; hidden size and
vocabulary unchanged), so the layer code, workspace and KV cache need no TP knowledge beyond the
all-reduces and the vocab-parallel embedding / LM head.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from nanoflow.models.config import ModelConfig


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `world`: which heads, MLP columns and vocabulary rows it holds."""
    config: ModelConfig
    """The whole model's shape."""
    rank: int
    world: int

    def __post_init__(self) -> None:
        check_shardable(self.config, self.world)

    @property
    def q_heads(self) -> tuple[int, int]:
        n = self.config.num_attention_heads // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        hk = self.config.num_key_value_heads
        if hk >= self.world:
            n = hk // self.world
            return self.rank * n, (self.rank + 1) * n
        head = self.rank * hk // self.world  # replicated: the KV head of this rank's q heads
        return head, head + 1

    @property
    def inter(self) -> tuple[int, int]:
        n = self.config.intermediate_size // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def expert_inter(self) -> tuple[int, int]:
        n = self.config.expert_intermediate_size // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def shared_inter(self) -> tuple[int, int]:
        n = self.config.shared_expert_intermediate_size // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def vocab_rows(self) -> int:
        return vocab_shard_rows(self.config.vocab_size, self.world)

    @property
    def vocab(self) -> tuple[int, int]:
        """This rank's vocabulary rows (the end may pass vocab_size: those rows are padding)."""
        return self.rank * self.vocab_rows, (self.rank + 1) * self.vocab_rows


def vocab_shard_rows(vocab_size: int, world: int) -> int:
    return -(-vocab_size // world)


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """ValueError unless `cfg` splits evenly over `world` ranks."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {world}")
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if hq % world:
        problems.append(f"{hq} attention heads")
    if hk % world and world % hk:
        problems.append(f"{hk} KV heads (need a multiple or a divisor of the rank count)")
    if cfg.intermediate_size % world:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    if cfg.moe_intermediate_size % world:
        problems.append(f"expert width (moe_intermediate_size) {cfg.moe_intermediate_size}")
    if cfg.shared_expert_intermediate_size % world:
        problems.append(f"shared expert width {cfg.shared_expert_intermediate_size}")
    if problems:
        raise ValueError(f"{cfg.architecture} cannot be split over {world} tensor-parallel ranks: "
                         f"{', '.join(problems)} not divisible by {world}")


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The shape of one rank's part of the model (the same on every rank)."""
    check_shardable(cfg, world)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                               num_key_value_heads=max(1, cfg.num_key_value_heads // world),
                               intermediate_size=cfg.intermediate_size // world,
                               moe_intermediate_size=cfg.moe_intermediate_size // world,
                               shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // world)


# ---- checkpoint slices ---------------------------------------------------------------------------
# Checkpoint name (after the layer prefix) -> how it is split. "rows"/"cols": along dim 0 / 1 by
# the named range; the stacked expert tensors of transformers >= 5 have their own cases.
_RULES: list[tuple[re.Pattern, str, str]] = [(re.compile(p), kind, part) for p, kind, part in (
    (r"(^|\.)embed_tokens\.weight$", "vocab", "vocab"),
    (r"^lm_head\.weight$", "vocab", "vocab"),
    (r"self_attn\.q_proj\.(weight|bias)$", "rows", "q"),
    (r"self_attn\.[kv]_proj\.(weight|bias)$", "rows", "kv"),
    (r"self_attn\.o_proj\.weight$", "cols", "q"),
    (r"mlp\.(gate|up)_proj\.weight$", "rows", "inter"),
    (r"mlp\.down_proj\.weight$", "cols", "inter"),
    (r"block_sparse_moe\.experts\.\d+\.w[13]\.weight$", "rows", "expert_inter"),
    (r"block_sparse_moe\.experts\.\d+\.w2\.weight$", "cols", "expert_inter"),
    (r"mlp\.experts\.\d+\.(gate|up)_proj\.weight$", "rows", "expert_inter"),
    (r"mlp\.experts\.\d+\.down_proj\.weight$", "cols", "expert_inter"),
    (r"mlp\.experts\.gate_up_proj$", "stacked_gate_up", "expert_inter"),
    (r"mlp\.experts\.down_proj$", "stacked_down", "expert_inter"),
    (r"mlp\.shared_expert\.(gate|up)_proj\.weight$", "rows", "shared_inter"),
    (r"mlp\.shared_expert\.down_proj\.weight$", "cols", "shared_inter"),
)]


def split_rule(name: str) -> tuple[str, str] | None:
    """(kind, part) of a checkpoint tensor, or None when every rank holds all of it."""
    for pattern, kind, part in _RULES:
        if pattern.search(name):
            return kind, part
    return None


class WeightSharder:
    """Reads this rank's slice of each checkpoint tensor from a lazy slice (safetensors get_slice),
    so only those rows / columns are read from the file."""

    def __init__(self, layout: ShardLayout):
        self.layout = layout
        d = layout.config.head_dim
        (q0, q1), (k0, k1) = layout.q_heads, layout.kv_heads
        self.ranges = {"q": (q0 * d, q1 * d), "kv": (k0 * d, k1 * d), "inter": layout.inter,
                       "expert_inter": layout.expert_inter, "shared_inter": layout.shared_inter}

    def read(self, name: str, lazy) -> torch.Tensor:
        """`lazy` supports get_shape() and indexing (a safetensors slice, or a tensor)."""
        rule = split_rule(name)
        if rule is None:
            return lazy[:]
        kind, part = rule
        if kind == "vocab":
            return self._vocab_rows(lazy)
        a, b = self.ranges[part]
        if kind == "rows":
            return lazy[a:b]
        if kind == "cols":
            return lazy[:, a:b]
        inter = self.layout.config.expert_intermediate_size
        if kind == "stacked_gate_up":  # [E, 2I, H]: gate rows 0:I, up rows I:2I
            return torch.cat([lazy[:, a:b], lazy[:, inter + a:inter + b]], dim=1)
        return lazy[:, :, a:b]  # stacked_down [E, H, I]

    def _vocab_rows(self, lazy) -> torch.Tensor:
        start, end = self.layout.vocab
        vocab = _shape(lazy)[0]
        part = lazy[min(start, vocab):min(end, vocab)]
        if part.shape[0] == end - start:
            return part
        pad = torch.zeros((end - start - part.shape[0], *part.shape[1:]), dtype=part.dtype)
        return torch.cat([part, pad])


def _shape(lazy) -> tuple[int, ...]:
    return tuple(lazy.get_shape()) if hasattr(lazy, "get_shape") else tuple(lazy.shape)


def iter_sharded_safetensors(weights_dir: Path, sharder: WeightSharder,
                             open_file=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's slice) of every tensor of a single-file or sharded checkpoint, read through
    safetensors' lazy slices. `open_file(path)` replaces safetensors.safe_open (tests spy on reads)."""
    from nanoflow.models.loader import checkpoint_files

    if open_file is None:
        from safetensors import safe_open

        def open_file(path):
            return safe_open(str(path), framework="pt", device="cpu")
    for path in checkpoint_files(weights_dir):
        with open_file(path) as f:
            for name in f.keys():
                yield name, sharder.read(name, f.get_slice(name))
