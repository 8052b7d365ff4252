"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) as one implementation.

Each decoder layer is a list of Ops (nanoflow.pipeline.ops) working on rows lo:hi of a shared
workspace, so the pipeline executor can cut the dense batch into nano-batches per op. Weights are
fused (qkv, gate_up); load_weights maps Hugging Face names onto them. The layer's MLP is a pluggable
block (`LlamaForCausalLM.MLP_BLOCK`): the dense one here, Mixtral's experts in nanoflow.models.mixtral."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from nanoflow.forward_batch import ForwardBatch
from nanoflow.kernels import ModelKernels, select_kernels
from nanoflow.models.config import ModelConfig
from nanoflow.models.rope import build_cos_sin_cache
from nanoflow.pipeline.ops import COLLECTIVE_OPS, Op, Resource, RowScope


class Workspace:
    """Per-step activations, allocated once for the token budget; ops write row slices of them."""

    def __init__(self, cfg: ModelConfig, max_tokens: int, dtype: torch.dtype, device: torch.device,
                 mlp_buffers: dict[str, int] | None = None):
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        empty = lambda width: torch.empty(max_tokens, width, dtype=dtype, device=device)  # noqa: E731
        self.max_tokens = max_tokens
        self.hidden = empty(cfg.hidden_size)       # a sub-block's output, added to residual next
        self.residual = empty(cfg.hidden_size)     # the residual stream
        self.normed = empty(cfg.hidden_size)       # RMSNorm output, input of the next GEMM
        self.qkv = empty(q + 2 * kv)
        self.q_rot = empty(q)
        self.attn_out = empty(q)
        # The MLP block's own buffers (dense: gate_up, act), name -> width.
        if mlp_buffers is None:
            mlp_buffers = DenseMLP.workspace_buffers(cfg)
        for name, width in mlp_buffers.items():
            setattr(self, name, empty(width))


@dataclass(frozen=True)
class DeviceRows:
    """The batch's composition as int32 device scalars, for ops inside a CUDA graph (whose launches
    cannot depend on host values that change per step)."""
    num_decode: torch.Tensor
    """[1]: decode rows (= decode requests), the first rows of the batch."""
    num_reqs: torch.Tensor
    """[1]: requests in the batch (entries of block_tables / seq_lens past it are padding)."""


@dataclass
class StepState:
    """What one step's ops read and write."""
    batch: ForwardBatch
    ws: Workspace
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    sm_budget: int | None = None
    """SM budget of the nano-op being issued (set by the executor; None = whole device)."""
    stream_sms: int | None = None
    """SMs of the green-context partition the nano-op's stream runs on (None: an ordinary stream)."""
    device_rows: DeviceRows | None = None
    """Set for CUDA-graph steps: the batch's tensors are fixed-size buffers (padded rows and
    requests) and attention reads which rows are decode / prefill from these device scalars."""


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, model: "LlamaForCausalLM", dtype, device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.index = index
        self.num_q, self.num_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.eps = cfg.rms_norm_eps
        self.scale = d ** -0.5
        # The parent (kernel set, rope cache) kept outside the module tree: no cycle for .eval()/.to().
        object.__setattr__(self, "model", model)
        p = lambda *shape: nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)  # noqa: E731
        qkv_width = (self.num_q + 2 * self.num_kv) * d
        self.input_norm = p(h)
        self.qkv_weight = p(qkv_width, h)
        self.qkv_bias = p(qkv_width) if cfg.attention_bias else None
        self.o_weight = p(h, self.num_q * d)
        # Qwen3: RMSNorm of every q and k head (over head_dim) before RoPE, in the rope_kv_write op.
        self.q_norm = p(d) if cfg.qk_norm else None
        self.k_norm = p(d) if cfg.qk_norm else None
        self.post_norm = p(h)
        self.mlp = model.MLP_BLOCK(cfg, model, dtype, device)
        self.ops = self._build_ops()

    # The ops, in order. Each reads and writes rows lo:hi of the workspace.
    def _input_norm(self, s: StepState, lo: int, hi: int) -> None:
        ws = s.ws
        self.model.kernels.fused_add_rms_norm(ws.hidden[lo:hi], ws.residual[lo:hi], self.input_norm, self.eps,
                                              out=ws.normed[lo:hi], residual_out=ws.residual[lo:hi])

    def _qkv_gemm(self, s: StepState, lo: int, hi: int) -> None:
        self.model.kernels.linear(s.ws.normed[lo:hi], self.qkv_weight, self.qkv_bias,
                                  out=s.ws.qkv[lo:hi], sm_budget=s.sm_budget)

    def _rope_kv_write(self, s: StepState, lo: int, hi: int) -> None:
        q_w, kv_w = self.num_q * self.head_dim, self.num_kv * self.head_dim
        qkv = s.ws.qkv[lo:hi]
        q = qkv[:, :q_w].view(-1, self.num_q, self.head_dim)
        k = qkv[:, q_w:q_w + kv_w].view(-1, self.num_kv, self.head_dim)
        v = qkv[:, q_w + kv_w:].view(-1, self.num_kv, self.head_dim)
        k_cache, v_cache = s.kv_caches[self.index]
        b = s.batch
        if self.q_norm is not None:  # in place in qkv (the op declares it writes qkv): no extra buffer
            self.model.kernels.rms_norm(q, self.q_norm, self.eps, out=q)
            self.model.kernels.rms_norm(k, self.k_norm, self.eps, out=k)
        self.model.kernels.rope_and_cache_write(
            q, k, v, b.positions[lo:hi], self.model.cos_sin, k_cache, v_cache, b.slot_mapping[lo:hi],
            q_out=s.ws.q_rot[lo:hi].view(-1, self.num_q, self.head_dim))

    def _decode_attn(self, s: StepState, lo: int, hi: int) -> None:
        b = s.batch
        if s.device_rows is not None:  # graph form: rows lo:hi, those below the device's decode count
            k_cache, v_cache = s.kv_caches[self.index]
            self.model.kernels.paged_decode_attention_rows(
                s.ws.q_rot[lo:hi].view(-1, self.num_q, self.head_dim), k_cache, v_cache, b.block_tables[lo:hi],
                b.seq_lens[lo:hi], self.scale, num_rows=s.device_rows.num_decode, row0=lo,
                out=s.ws.attn_out[lo:hi].view(-1, self.num_q, self.head_dim),
                max_programs=s.sm_budget or s.stream_sms)
            return
        lo, hi = lo, min(hi, b.num_decode)
        if hi <= lo:
            return
        k_cache, v_cache = s.kv_caches[self.index]
        q = s.ws.q_rot[lo:hi].view(-1, self.num_q, self.head_dim)
        self.model.kernels.paged_decode_attention(
            q, k_cache, v_cache, b.block_tables[lo:hi], b.seq_lens[lo:hi], self.scale,
            out=s.ws.attn_out[lo:hi].view(-1, self.num_q, self.head_dim), max_programs=s.sm_budget)

    def _prefill_attn(self, s: StepState, lo: int, hi: int) -> None:
        b = s.batch
        if s.device_rows is not None:  # graph form: every prefill request (graphs never cut this op)
            k_cache, v_cache = s.kv_caches[self.index]
            t = b.num_tokens
            self.model.kernels.paged_prefill_attention_rows(
                s.ws.q_rot[:t].view(-1, self.num_q, self.head_dim), k_cache, v_cache, b.block_tables,
                b.query_start_loc, b.seq_lens, self.scale, first_request=s.device_rows.num_decode,
                num_requests=s.device_rows.num_reqs, out=s.ws.attn_out[:t].view(-1, self.num_q, self.head_dim),
                max_programs=s.sm_budget or s.stream_sms)
            return
        r0, r1 = b.prefill_request_range(lo, hi)
        if r1 <= r0:
            return
        row0, row1 = b.query_start_loc_cpu[r0], b.query_start_loc_cpu[r1]
        k_cache, v_cache = s.kv_caches[self.index]
        q = s.ws.q_rot[row0:row1].view(-1, self.num_q, self.head_dim)
        self.model.kernels.paged_prefill_attention(
            q, k_cache, v_cache, b.block_tables[r0:r1], b.query_start_loc[r0:r1 + 1] - row0,
            b.seq_lens[r0:r1], self.scale, out=s.ws.attn_out[row0:row1].view(-1, self.num_q, self.head_dim),
            max_programs=s.sm_budget)

    def _o_gemm(self, s: StepState, lo: int, hi: int) -> None:
        self.model.kernels.linear(s.ws.attn_out[lo:hi], self.o_weight, None,
                                  out=s.ws.hidden[lo:hi], sm_budget=s.sm_budget)

    def _all_reduce_hidden(self, s: StepState, lo: int, hi: int) -> None:
        self.model.tp.all_reduce(s.ws.hidden[lo:hi])

    def _post_norm(self, s: StepState, lo: int, hi: int) -> None:
        ws = s.ws
        self.model.kernels.fused_add_rms_norm(ws.hidden[lo:hi], ws.residual[lo:hi], self.post_norm, self.eps,
                                              out=ws.normed[lo:hi], residual_out=ws.residual[lo:hi])

    def _build_ops(self) -> list[Op]:
        """Attention half, then the MLP block's ops (they read `normed`, write `hidden`); under tensor
        parallelism an all-reduce after o_gemm and after the MLP."""
        C, M = Resource.COMPUTE, Resource.MEMORY
        rope_writes = ("qkv", "q_rot", "kv") if self.q_norm is not None else ("q_rot", "kv")  # q/k norm in place
        ops = [
            Op("input_norm", M, self._input_norm, reads=("hidden", "residual"), writes=("normed", "residual")),
            Op("qkv_gemm", C, self._qkv_gemm, reads=("normed",), writes=("qkv",)),
            Op("rope_kv_write", M, self._rope_kv_write, reads=("qkv",), writes=rope_writes),
            Op("decode_attn", M, self._decode_attn, RowScope.DECODE, reads=("q_rot", "kv"), writes=("attn_out",)),
            Op("prefill_attn", C, self._prefill_attn, RowScope.PREFILL, reads=("q_rot", "kv"),
               writes=("attn_out",)),
            Op("o_gemm", C, self._o_gemm, reads=("attn_out",), writes=("hidden",)),
            Op("post_norm", M, self._post_norm, reads=("hidden", "residual"), writes=("normed", "residual")),
        ] + self.mlp.ops()
        if self.model.tp is None:
            return ops
        # Tensor parallel: o_proj and the MLP's last projection are row-parallel; sum the ranks' partial
        # outputs in place (network ops, so plans cut them and overlap them with other nano-batches).
        o_allreduce, mlp_allreduce = (Op(name, Resource.NETWORK, self._all_reduce_hidden, reads=("hidden",),
                                         writes=("hidden",)) for name in COLLECTIVE_OPS)
        at = [op.name for op in ops].index("o_gemm") + 1
        return ops[:at] + [o_allreduce] + ops[at:] + [mlp_allreduce]


class DenseMLP(nn.Module):
    """The dense SwiGLU MLP: gate_up_gemm -> act -> down_gemm, reading `normed`, writing `hidden`.

    An MLP block (this one, or nanoflow.models.mixtral.MoEBlock) provides: workspace_buffers(cfg),
    ops(), and its share of the layer's Hugging Face names: hf_weight_names(prefix) (the checkpoint's),
    weight_table() (every name it accepts -> parameter, index), weight_aliases() (a name of another
    layout -> the checkpoint names it stands for) and module_weight_names() (transformers' in-memory
    names, for export)."""

    def __init__(self, cfg: ModelConfig, model: "LlamaForCausalLM", dtype, device):
        super().__init__()
        object.__setattr__(self, "model", model)  # kernels; outside the module tree (no cycle)
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.inter = i
        self.gate_up_weight = nn.Parameter(torch.empty(2 * i, h, dtype=dtype, device=device), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(h, i, dtype=dtype, device=device), requires_grad=False)

    @staticmethod
    def workspace_buffers(cfg: ModelConfig) -> dict[str, int]:
        return {"gate_up": 2 * cfg.intermediate_size, "act": cfg.intermediate_size}

    def _gate_up_gemm(self, s: StepState, lo: int, hi: int) -> None:
        self.model.kernels.linear(s.ws.normed[lo:hi], self.gate_up_weight, None,
                                  out=s.ws.gate_up[lo:hi], sm_budget=s.sm_budget)

    def _act(self, s: StepState, lo: int, hi: int) -> None:
        self.model.kernels.silu_and_mul(s.ws.gate_up[lo:hi], out=s.ws.act[lo:hi])

    def _down_gemm(self, s: StepState, lo: int, hi: int) -> None:
        self.model.kernels.linear(s.ws.act[lo:hi], self.down_weight, None,
                                  out=s.ws.hidden[lo:hi], sm_budget=s.sm_budget)

    def ops(self) -> list[Op]:
        C, M = Resource.COMPUTE, Resource.MEMORY
        return [
            Op("gate_up_gemm", C, self._gate_up_gemm, reads=("normed",), writes=("gate_up",)),
            Op("act", M, self._act, reads=("gate_up",), writes=("act",)),
            Op("down_gemm", C, self._down_gemm, reads=("act",), writes=("hidden",)),
        ]

    def hf_weight_names(self, prefix: str) -> list[str]:
        return [prefix + n for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]

    def weight_table(self) -> dict[str, tuple[torch.Tensor, tuple | None]]:
        """Hugging Face name (relative to the layer) -> (parameter, index into it or None)."""
        i = self.inter
        return {"mlp.gate_proj.weight": (self.gate_up_weight, (slice(0, i),)),
                "mlp.up_proj.weight": (self.gate_up_weight, (slice(i, 2 * i),)),
                "mlp.down_proj.weight": (self.down_weight, None)}

    def weight_aliases(self) -> dict[str, list[str]]:
        """Names of another layout -> the checkpoint names each stands for (dense: none)."""
        return {}

    def module_weight_names(self) -> list[str]:
        """The names transformers' in-memory module uses (dense: the checkpoint's)."""
        return self.hf_weight_names("")


class LlamaForCausalLM(nn.Module):
    MLP_BLOCK: type = DenseMLP
    """The MLP part of every decoder layer (a subclass swaps it: Mixtral's experts)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 kernels: ModelKernels | None = None, tp=None):
        super().__init__()
        self.config = cfg
        self.dtype, self.device = dtype, device
        self.kernels: ModelKernels = select_kernels("auto", device) if kernels is None else kernels
        """The kernel functions every op calls (nanoflow.kernels.model_kernels; load_model passes
        EngineConfig.use_triton's choice). None: Triton on CUDA, the torch references elsewhere."""
        self.tp = tp
        """Tensor-parallel rank (nanoflow.distributed.TPContext) or None. Under TP `cfg` is the rank's
        shard (its heads and MLP width; nanoflow.distributed.sharding), the vocabulary is split."""
        vocab_rows = cfg.vocab_size if tp is None else tp.vocab_rows(cfg.vocab_size)
        self.embed_tokens = nn.Parameter(
            torch.empty(vocab_rows, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, self, dtype, device)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(vocab_rows, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        # Rope cache: a buffer, not a parameter; computed in fp32 then cast like transformers does.
        self.register_buffer("cos_sin", build_cos_sin_cache(cfg, device).to(dtype), persistent=False)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def new_workspace(self, max_tokens: int) -> Workspace:
        return Workspace(self.config, max_tokens, self.dtype, self.device,
                         self.MLP_BLOCK.workspace_buffers(self.config))

    # Forward in three parts so the executor can run the layers' ops under any plan.
    def embed(self, s: StepState) -> None:
        t = s.batch.num_tokens
        if self.tp is None:
            torch.index_select(self.embed_tokens, 0, s.batch.input_ids[:t], out=s.ws.hidden[:t])
        else:  # vocab-parallel: each rank's rows, summed
            self.tp.embed(self.embed_tokens, s.batch.input_ids[:t], out=s.ws.hidden[:t])
        s.ws.residual[:t].zero_()  # layer 0's fused add then yields residual = embeddings exactly

    def compute_logits(self, s: StepState) -> torch.Tensor:
        idx = s.batch.logits_indices
        x = s.ws.hidden.index_select(0, idx) + s.ws.residual.index_select(0, idx)
        x = self.kernels.rms_norm(x, self.norm, self.config.rms_norm_eps)
        logits = torch.mm(x, self.lm_head_weight().t())
        if self.tp is not None:  # each rank's vocabulary slice, gathered on rank 0 (None elsewhere)
            return self.tp.gather_logits(logits, self.config.vocab_size)
        return logits.float()

    # Weight loading: Hugging Face names -> fused parameters.
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            target, index, provides = self._locate(name)
            if target is None:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            dst = target if index is None else target[index]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                                 f"model expects {tuple(dst.shape)}")
            dst.copy_(tensor.to(dtype=dst.dtype))
            loaded.update(provides)
        missing = [n for n in self.hf_weight_names() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")

    def hf_weight_names(self) -> list[str]:
        """The checkpoint's names (as save_pretrained writes them)."""
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if self.lm_head is not None:
            names.append("lm_head.weight")
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            names += self._attention_weight_names(pre) + layer.mlp.hf_weight_names(pre)
        return names

    def _attention_weight_names(self, pre: str) -> list[str]:
        names = [pre + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                   "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                   "self_attn.v_proj.weight", "self_attn.o_proj.weight")]
        if self.config.attention_bias:
            names += [pre + f"self_attn.{p}_proj.bias" for p in "qkv"]
        if self.config.qk_norm:
            names += [pre + "self_attn.q_norm.weight", pre + "self_attn.k_norm.weight"]
        return names

    def _locate(self, name: str) -> tuple[torch.Tensor | None, tuple | None, list[str]]:
        """The parameter a Hugging Face weight name maps to, the index of its part of a fused one
        (None: all of it), and the checkpoint names it provides (itself, or those an alternative
        layout's name stands for, e.g. transformers' stacked experts)."""
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, None, [name]
        if name == "model.norm.weight":
            return self.norm, None, [name]
        if name == "lm_head.weight":  # tied checkpoints sometimes store a copy: load it into the embedding
            return (self.lm_head if self.lm_head is not None else self.embed_tokens), None, [name]
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
            return None, None, []
        i = int(parts[2])
        if i >= len(self.layers):
            return None, None, []
        layer, rest = self.layers[i], ".".join(parts[3:])
        q, kv = layer.num_q * layer.head_dim, layer.num_kv * layer.head_dim
        rows = lambda a, b: (slice(a, b),)  # noqa: E731
        table = {
            "input_layernorm.weight": (layer.input_norm, None),
            "post_attention_layernorm.weight": (layer.post_norm, None),
            "self_attn.q_proj.weight": (layer.qkv_weight, rows(0, q)),
            "self_attn.k_proj.weight": (layer.qkv_weight, rows(q, q + kv)),
            "self_attn.v_proj.weight": (layer.qkv_weight, rows(q + kv, q + 2 * kv)),
            "self_attn.o_proj.weight": (layer.o_weight, None),
        }
        if layer.qkv_bias is not None:
            table.update({"self_attn.q_proj.bias": (layer.qkv_bias, rows(0, q)),
                          "self_attn.k_proj.bias": (layer.qkv_bias, rows(q, q + kv)),
                          "self_attn.v_proj.bias": (layer.qkv_bias, rows(q + kv, q + 2 * kv))})
        if layer.q_norm is not None:
            table.update({"self_attn.q_norm.weight": (layer.q_norm, None),
                          "self_attn.k_norm.weight": (layer.k_norm, None)})
        table.update(layer.mlp.weight_table())
        target, index = table.get(rest, (None, None))
        if target is None:
            return None, None, []
        prefix = ".".join(parts[:3]) + "."
        return target, index, [prefix + n for n in layer.mlp.weight_aliases().get(rest, [rest])]

    def export_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Views of our weights under the names of transformers' in-memory model (for the transformers
        baseline and tests; for dense models these are the checkpoint names)."""
        out = {}
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if self.lm_head is not None:
            names.append("lm_head.weight")
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            names += self._attention_weight_names(pre) + [pre + n for n in layer.mlp.module_weight_names()]
        for name in names:
            target, index, _ = self._locate(name)
            out[name] = target if index is None else target[index]
        if self.lm_head is None:
            out["lm_head.weight"] = self.embed_tokens
        return out
