"""Piecewise CUDA graphs for the sequential plan.

Attention depends on the batch's composition (which rows decode, where prefill chunks start), so it
runs eagerly; everything between two attentions (o-proj, norm, MLP, next layer's norm, qkv, rope) is
row-independent and is captured once per padded token count. Per-step values the captured kernels
read (positions, KV slots) live in fixed device buffers; padded rows get KV slot -1, which the rope
kernel skips. Large batches gain little (the GPU, not the CPU, is the bottleneck there) and would pay
for padding, so only token counts up to `max_tokens` are captured; larger steps run eagerly."""
from __future__ import annotations

import bisect

import torch

from nanoflow.engine.forward_batch import ForwardBatch
from nanoflow.models.llama import LlamaForCausalLM, StepState, Workspace

ATTENTION_OPS = ("decode_attn", "prefill_attn")
DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class PiecewiseGraphs:
    def __init__(self, model: LlamaForCausalLM, workspace: Workspace, kv_caches, max_tokens: int,
                 sizes: tuple[int, ...] = DEFAULT_SIZES):
        self.model = model
        self.sizes = [s for s in sizes if s <= min(max_tokens, workspace.max_tokens)]
        self.max_tokens = self.sizes[-1] if self.sizes else 0
        dev = model.device
        n = workspace.max_tokens
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        empty = torch.empty(0, device=dev)
        # The captured ops only read positions and slot_mapping from the batch.
        self._static = StepState(ForwardBatch(empty, self.positions, self.slot_mapping, empty, empty, empty,
                                              [0, n], 0, empty), workspace, kv_caches)
        self.segments = self._segments()
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._pool = None

    def _segments(self) -> list[list]:
        """Ops between attentions: [layer0 pre-attn], [layer0 post-attn + layer1 pre-attn], ..."""
        segments, current = [], []
        for layer in self.model.layers:
            for op in layer.ops:
                if op.name in ATTENTION_OPS:
                    if current:
                        segments.append(current)
                        current = []
                else:
                    current.append(op)
        segments.append(current)
        return segments

    def capture(self) -> None:
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up every kernel (Triton compiles) outside capture
            for size in self.sizes:
                for seg in self.segments:
                    self._run_segment(seg, size)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for size in reversed(self.sizes):  # largest first, so smaller ones reuse its pool memory
            graphs = []
            for seg in self.segments:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._pool):
                    self._run_segment(seg, size)
                if self._pool is None:
                    self._pool = g.pool()
                graphs.append(g)
            self.graphs[size] = graphs
        torch.cuda.synchronize()

    def _run_segment(self, seg, size: int) -> None:
        for op in seg:
            op.fn(self._static, 0, size)

    def can_run(self, batch: ForwardBatch) -> bool:
        return 0 < batch.num_tokens <= self.max_tokens and bool(self.graphs)

    def run_layers(self, state: StepState) -> None:
        """Replays the captured segments around eager attention, for the padded token count."""
        t = state.batch.num_tokens
        size = self.sizes[bisect.bisect_left(self.sizes, t)]
        self.positions[:t].copy_(state.batch.positions, non_blocking=True)
        self.slot_mapping[:t].copy_(state.batch.slot_mapping, non_blocking=True)
        if size > t:
            self.slot_mapping[t:size].fill_(-1)
        graphs = self.graphs[size]
        for i, layer in enumerate(self.model.layers):
            graphs[i].replay()
            for op in layer.ops:
                if op.name in ATTENTION_OPS:
                    op.fn(state, 0, t)
        graphs[-1].replay()

