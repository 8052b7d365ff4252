"""The tensors of one dense batch, as the model's ops see them.

Rows are ordered decode-first: requests with a single new token (decode, or the last token of a
prompt) occupy rows 0:num_decode, one row each; multi-token prefill chunks follow. Decode rows are
their request index, so a nano-batch of decode rows needs no lookup."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    """[T] token ids."""
    positions: torch.Tensor
    """[T] position of each token in its sequence."""
    slot_mapping: torch.Tensor
    """[T] KV-cache slot (block * block_size + offset) each token's K/V is written to."""
    block_tables: torch.Tensor
    """[R, max_blocks] int32 block ids per request (decode requests first)."""
    seq_lens: torch.Tensor
    """[R] int32 context length per request after this step's tokens."""
    query_start_loc: torch.Tensor
    """[R+1] int32 first row of each request; query_start_loc[R] == T."""
    query_start_loc_cpu: list[int]
    """The same on the host, for cutting prefill rows at request boundaries."""
    num_decode: int
    """Requests (= rows) with a single new token, first in the batch."""
    logits_indices: torch.Tensor
    """[S] rows whose next-token logits are needed (requests that sample this step)."""
    decode_context_tokens: int = 0
    """Host-side sum of the decode requests' context lengths: the KV rows decode attention reads."""

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]

    @property
    def num_reqs(self) -> int:
        return len(self.query_start_loc_cpu) - 1

    def prefill_request_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Prefill requests whose rows start inside lo:hi (a request belongs to the range holding its
        first row; plans cut prefill rows at request boundaries)."""
        starts = self.query_start_loc_cpu
        r0 = max(self.num_decode, bisect.bisect_left(starts, lo, 0, self.num_reqs))
        r1 = max(r0, bisect.bisect_left(starts, hi, 0, self.num_reqs))
        return r0, r1
