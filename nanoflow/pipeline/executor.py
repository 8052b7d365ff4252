"""Runs a layer's ops under a plan. The sequential plan calls every op once on all rows."""
from __future__ import annotations

from nanoflow.pipeline.ops import Op


class SequentialExecutor:
    """One nano-batch, one stream: the 'overlap off' baseline that every plan must match."""

    name = "sequential"

    def run_layer(self, ops: list[Op], state, num_tokens: int) -> None:
        for op in ops:
            op.fn(state, 0, num_tokens)
