"""Paged KV-cache accounting: a pool of fixed-size blocks with reference counts, per-request block
lists, the prefix cache (full blocks reused across requests) and the host tier behind it. The tensors
themselves live in the runner (and in the host tier); this module hands out block ids.

Prefix caching, in vLLM's manner: a full block of computed tokens is *committed* to the prefix tree
(prefix_cache.py) and stays there after its request ends, on the free list, until the pool runs out
of never-cached blocks; then the least recently released cached block is evicted. The free list is
one LRU queue: uncached blocks at its front (handed out first), cached ones appended as released, a
request's blocks last-first (so its prefix outlives its tail). A new request reuses the longest
cached prefix of its tokens, but always computes at least its last token (the logits are needed).
With a host tier, a cached block whose last user lets go is also copied to host memory; a hit there
is copied back instead of recomputed. With a disk tier behind it (kv_disk_tier.py), a block the host
tier evicts is written to disk first; a hit there is read into a host slot and copied back from it.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from nanoflow.engine.kv_disk_tier import DiskKVTier
from nanoflow.engine.kv_host_tier import MAX_BLOCKS_PER_COPY, CopyHandle, HostKVTier
from nanoflow.engine.slot_lru import SlotLRU
from nanoflow.engine.prefix_cache import Node, PrefixHit, PrefixTree


class KVCacheError(RuntimeError):
    """The block accounting broke an invariant (a bug, never user input)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Free blocks in eviction order (front first). A free block may still cache a prefix.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._cached = bytearray(num_blocks)
        self.num_cached = 0
        self.on_evict = None
        """Called with a cached block when allocate() reuses it for something else."""

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (cached or not): what allocate() can hand out."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        return bool(self._cached[block])

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if self._cached[b]:
                self._cached[b] = 0
                self.num_cached -= 1
                self.on_evict(b)
            self._ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Another owner now also holds these blocks (n > 1 or prefix reuse); a cached free block
        leaves the free list."""
        for b in blocks:
            rc = self._ref_counts[b]
            if rc <= 0:
                if not self._cached[b]:
                    raise KVCacheError(f"sharing free block {b}")
                del self._free[b]
            self._ref_counts[b] = rc + 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            rc = self._ref_counts[b]
            if rc <= 0:
                raise KVCacheError(f"double free of block {b}")
            self._ref_counts[b] = rc - 1
            if rc == 1:
                self._free[b] = None
                if not self._cached[b]:  # nothing to keep: hand it out before any cached block
                    self._free.move_to_end(b, last=False)

    def mark_cached(self, block: int) -> None:
        if self._ref_counts[block] <= 0 or self._cached[block]:
            raise KVCacheError(f"block {block} cannot become cached (ref count {self._ref_counts[block]})")
        self._cached[block] = 1
        self.num_cached += 1

    def uncache(self, block: int) -> None:
        """Drops the block's cached content without evicting through on_evict (reset)."""
        if self._cached[block]:
            self._cached[block] = 0
            self.num_cached -= 1
            if self._ref_counts[block] == 0:
                self._free.move_to_end(block, last=False)

    def check_invariant(self) -> None:
        """free + used == total, and a block is free exactly when nobody references it."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise KVCacheError("a block is on the free list twice")
        for b, rc in enumerate(self._ref_counts):
            if rc < 0 or (rc == 0) != (b in free):
                raise KVCacheError(f"block {b}: ref count {rc}, on free list: {b in free}")
        if self.num_cached != sum(self._cached):
            raise KVCacheError(f"num_cached {self.num_cached} != {sum(self._cached)} flags")


@dataclass
class PrefixCacheStats:
    """Counters since the engine started (tokens, as vLLM's Prometheus counters)."""
    queries: int = 0
    """Tokens of the requests looked up when admitted (prompt, plus known outputs after a preemption)."""
    hits: int = 0
    """Of those, tokens found cached (on the device or in the host tier)."""
    host_hits: int = 0
    """Of the hits, tokens copied back from the host tier."""
    blocks_saved: int = 0
    """Blocks copied to the host tier."""
    blocks_loaded: int = 0
    """Blocks copied back from the host tier (disk-tier hits included: they pass through a host slot)."""
    disk_hits: int = 0
    """Of the hits, tokens read back from the disk tier (not counted in host_hits)."""


@dataclass
class _Seq:
    """A request's blocks and, with prefix caching, the tree node of each of its known full blocks."""
    blocks: list[int] = field(default_factory=list)
    chain: list[Node] = field(default_factory=list)
    num_committed: int = 0
    """Leading blocks whose KV is computed and committed to the tree."""
    final_computed: int | None = None
    """Tokens computed when the request ended (set while its release waits for its last token)."""


class KVCacheManager:
    """Which blocks each request owns; grows them as the request's tokens grow; reuses cached prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.pool = BlockPool(num_blocks)
        self.pool.on_evict = self._on_evict
        self.block_size = block_size
        self.tree = PrefixTree(block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._seqs: dict[str, _Seq] = {}
        self.host: HostKVTier | None = None
        self._host_slots: SlotLRU | None = None
        self._host_enabled = False
        self.disk: DiskKVTier | None = None
        self._fences: dict[int, CopyHandle | None] = {}
        """With a disk tier: the last copy into or out of each host slot (None: its save is queued, not
        issued, so the slot does not hold its node's bytes), which the host's accesses wait for."""
        self._issued: dict[int, CopyHandle] = {}
        """With a disk tier: the last copy issued into or out of each host slot. Unlike _fences, a queued
        save does not hide it: a disk read into the slot waits for it (an earlier save still in flight
        would otherwise land on top of the bytes just read)."""
        self._to_save: list[tuple[int, Node, int]] = []  # (held block, node, slot) waiting for flush()
        self._saving: list[tuple[CopyHandle, list[int]]] = []  # copies in flight and the blocks they hold
        self._late: list[tuple[object, _Seq]] = []  # finished requests waiting for their last token

    # ---- plain allocation ---------------------------------------------------------------------------
    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        seq = self._seqs.get(request_id)
        return seq.blocks if seq is not None else []

    def allocate(self, request_id: str, num_total_tokens: int) -> list[int] | None:
        """Ensure the request holds blocks for num_total_tokens; returns the newly added blocks,
        or None (and changes nothing) when the pool is short."""
        seq = self._seqs.get(request_id)
        held = len(seq.blocks) if seq is not None else 0
        need = -(-num_total_tokens // self.block_size) - held  # blocks_for_tokens, inlined: once per request and step
        if need <= 0:
            return []
        if need > self.pool.num_free:
            return None
        if seq is None:
            seq = self._seqs[request_id] = _Seq()
        new = self.pool.allocate(need)
        seq.blocks.extend(new)
        return new

    def free(self, request_id: str) -> None:
        """Drops the request's blocks without committing anything (see release())."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._drop(request_id, seq)

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    # ---- prefix caching -------------------------------------------------------------------------------
    def lookup(self, request) -> PrefixHit:
        """The request's longest cached prefix (whole blocks, at least one token left to compute)."""
        if not self.enable_prefix_caching or getattr(request.params, "prompt_logprobs", None) is not None:
            return PrefixHit()  # prompt logprobs need every prompt row computed (as vLLM: no hit for them)
        known = request.num_tokens - request.num_pending_tokens
        hit = self.tree.lookup(request, (known - 1) // self.block_size, self._host_enabled)
        return self.disk.within_budget(hit) if hit.num_disk else hit

    def admit(self, request, hit: PrefixHit, num_total_tokens: int) -> bool:
        """Gives a request its cached prefix plus blocks for num_total_tokens; False (and nothing
        changed) when the pool is short. Host-tier hits get device blocks and are copied back."""
        rid = request.request_id
        if rid in self._seqs:
            raise KVCacheError(f"request {rid} is admitted twice")
        on_device = [n.block for n in hit.nodes if n.block is not None]
        need = max(0, self.blocks_for_tokens(num_total_tokens) - len(on_device))
        revived = sum(1 for b in on_device if self.pool.ref_count(b) == 0)  # leave the free list
        if need + revived > self.pool.num_free:
            return False
        seq = self._seqs[rid] = _Seq(chain=list(hit.nodes), num_committed=len(hit.nodes))
        for node in hit.nodes:
            node.users += 1  # before allocate(): an eviction must not prune these nodes
        self.pool.share(on_device)
        new = iter(self.pool.allocate(need))
        loads: list[tuple[int, int]] = []
        reads: list[tuple[Node, int]] = []
        for node in hit.nodes:
            if node.block is None:  # host- or disk-tier hit: a fresh device block, filled by a copy
                block = next(new)
                node.block = block
                self.tree.node_of_block[block] = node
                self.pool.mark_cached(block)
                if node.host_slot is None:
                    reads.append((node, block))
                else:
                    self._host_slots.get(node)  # most recently used
                    loads.append((node.host_slot, block))
            seq.blocks.append(node.block)
        seq.blocks.extend(new)
        if loads:
            self._load([s for s, _ in loads], [b for _, b in loads])
        if reads:
            self._read_from_disk(reads)
        known = request.num_tokens - request.num_pending_tokens
        if self.enable_prefix_caching:  # claim the full blocks it will compute: others wait for them
            self.tree.extend(request, seq.chain, known // self.block_size, owner=rid)
        self.stats.queries += known
        self.stats.hits += hit.num_tokens(self.block_size)
        self.stats.host_hits += hit.num_host * self.block_size
        self.stats.disk_hits += hit.num_disk * self.block_size
        return True

    def commit(self, request, seq: _Seq | None = None) -> bool:
        """Commits the request's full blocks whose KV is computed and whose tokens are all known (a
        token still on the device in async scheduling is not). True when every computed full block
        is committed now; False when one waits for a token to reach the host."""
        seq = seq or self._seqs.get(request.request_id)
        if seq is None or not self.enable_prefix_caching:
            return True
        bs = self.block_size
        num_computed = request.num_computed_tokens if seq.final_computed is None else seq.final_computed
        computed = min(num_computed // bs, len(seq.blocks))
        known = request.num_tokens - request.num_pending_tokens
        ready = min(computed, known // bs)
        if ready <= seq.num_committed:
            return computed <= seq.num_committed
        if ready > len(seq.chain):
            ready = self.tree.extend(request, seq.chain, ready, owner=None)
        for j in range(seq.num_committed, ready):
            if self.tree.attach(seq.chain[j], seq.blocks[j], request.request_id):
                self.pool.mark_cached(seq.blocks[j])
        seq.num_committed = max(seq.num_committed, ready)
        return computed <= seq.num_committed

    def release(self, request, wait_for_tokens: bool = True) -> None:
        """The request finished, was aborted or preempted: commit what it computed, then drop its
        blocks (cached ones stay reusable until evicted). With async scheduling a request that ends
        by length still has its last fed token on the device: unless wait_for_tokens is False (a
        preemption), its blocks wait for a later poll(), by when the engine knows that token, so the
        block holding it is committed too."""
        self.commit(request)
        seq = self._seqs.get(request.request_id)
        if seq is None:
            return
        pending_from = request.num_tokens - request.num_pending_tokens
        if (wait_for_tokens and self.enable_prefix_caching and request.num_pending_tokens
                and pending_from < request.num_computed_tokens):
            del self._seqs[request.request_id]
            seq.final_computed = request.num_computed_tokens
            self._late.append((request, seq))
        else:
            self.free(request.request_id)

    def _release_late(self, force: bool) -> None:
        late, self._late = self._late, []
        still = []
        for request, seq in late:
            pending_from = request.num_tokens - request.num_pending_tokens
            if force or not request.num_pending_tokens or pending_from >= seq.final_computed:
                self.commit(request, seq)
                self._drop(request.request_id, seq)
            else:
                still.append((request, seq))
        self._late.extend(still)

    def _drop(self, request_id: str, seq: _Seq) -> None:
        for j in range(seq.num_committed):
            # A block we computed as a duplicate outlives the one the tree had (evicted since).
            if seq.chain[j].block is None and self.tree.attach(seq.chain[j], seq.blocks[j], request_id):
                self.pool.mark_cached(seq.blocks[j])
        self.tree.detach(seq.chain, request_id)
        release = []
        for b in reversed(seq.blocks):  # the tail first: it is evicted before the prefix
            node = self.tree.node_of_block.get(b) if self._host_enabled else None
            if node is not None and node.host_slot is None and self.pool.ref_count(b) == 1:
                self._queue_save(b, node)  # our reference now belongs to the copy
            else:
                release.append(b)
        self.pool.release(release)
        if self._to_save and self.host.synchronous:
            self.flush()

    def _on_evict(self, block: int) -> None:
        self.tree.forget_block(block)

    # ---- host tier ------------------------------------------------------------------------------------
    def attach_host_tier(self, tier: HostKVTier) -> None:
        if self._seqs:
            raise KVCacheError("attach the host tier before any request")
        self.host = tier
        self._host_slots = SlotLRU(tier.num_slots)
        self._host_enabled = self.enable_prefix_caching

    def attach_disk_tier(self, tier: DiskKVTier) -> None:
        if self.host is None or tier.host is not self.host:
            raise KVCacheError("the disk tier goes behind this manager's host tier: attach that first")
        if self._seqs:
            raise KVCacheError("attach the disk tier before any request")
        self.disk = tier

    @property
    def host_tier_enabled(self) -> bool:
        return self._host_enabled

    def set_host_tier_enabled(self, enabled: bool) -> None:
        """Switches the host tier on or off between runs (benchmarks); empties it either way."""
        if enabled and self.host is None:
            raise ValueError("no host tier: start the engine with kv_host_gb > 0")
        self._require_idle("switch the host tier")
        self.reset_prefix_cache()
        self._host_enabled = enabled and self.enable_prefix_caching

    def set_prefix_caching(self, enabled: bool) -> None:
        """Switches prefix caching on or off between runs (benchmarks); empties the cache either way."""
        self._require_idle("switch prefix caching")
        self.reset_prefix_cache()
        self.enable_prefix_caching = enabled
        self._host_enabled = enabled and self.host is not None

    def _require_idle(self, what: str) -> None:
        if self._seqs:
            raise ValueError(f"cannot {what} while {len(self._seqs)} requests hold KV blocks")

    def _queue_save(self, block: int, node: Node) -> None:
        slot = self._take_host_slot(node)
        if self.disk is not None:
            self._fences[slot] = None  # written when flush() issues the save
        self._to_save.append((block, node, slot))

    def _take_host_slot(self, node: Node, keep: set[Node] | frozenset = frozenset()) -> int:
        """A host slot for `node`. The node the slot is taken from (LRU) is written to the disk tier
        when there is one and the slot holds its bytes (its save is issued and done), else forgotten."""
        slot, evicted = self._host_slots.put(node)
        if evicted is not None:
            evicted.host_slot = None
            fence = self._fences.get(slot)
            if self.disk is not None and fence is not None and fence.done():
                gone = self.disk.spill(evicted, slot, keep)
                if gone is not None:
                    self.tree.prune(gone)
            self.tree.prune(evicted)
        node.host_slot = slot
        return slot

    def _load(self, slots: list[int], blocks: list[int]) -> None:
        handle = self.host.load(slots, blocks)
        self.stats.blocks_loaded += len(blocks)
        if self.disk is not None:
            for s in slots:
                self._fences[s] = self._issued[s] = handle

    def _read_from_disk(self, reads: list[tuple[Node, int]]) -> None:
        """Reads disk-tier hits into host slots, then loads those to the hits' device blocks. A chunk
        holds at most num_slots reads, so its slots are distinct; the blocks not read yet stay on disk."""
        unread = {node for node, _ in reads}
        step = min(MAX_BLOCKS_PER_COPY, self.host.num_slots)
        for lo in range(0, len(reads), step):
            chunk = reads[lo:lo + step]
            slots = []
            for node, _ in chunk:
                slot = self._take_host_slot(node, keep=unread)
                issued = self._issued.get(slot)
                if issued is not None:  # an earlier copy into or out of this slot must be finished
                    issued.wait()
                self.disk.read(node, slot)
                unread.discard(node)
                slots.append(slot)
            self._load(slots, [b for _, b in chunk])

    def flush(self) -> None:
        """Issues the queued saves (one copy, on the copy stream)."""
        if not self._to_save:
            return
        # A slot handed on to a later save before this flush is not written for the earlier one.
        live = [(b, s) for b, n, s in self._to_save if n.host_slot == s]
        stale = [b for b, n, s in self._to_save if n.host_slot != s]
        self._to_save = []
        self.pool.release(stale)
        if live:
            blocks, slots = [b for b, _ in live], [s for _, s in live]
            handle = self.host.save(blocks, slots)
            self._saving.append((handle, blocks))
            self.stats.blocks_saved += len(blocks)
            if self.disk is not None:
                for s in slots:
                    self._fences[s] = self._issued[s] = handle
        self._poll_saves()

    def poll(self) -> None:
        """Releases the blocks of finished requests whose last tokens are now known, and those of
        finished saves (never waits)."""
        if self._late:
            self._release_late(force=False)
        self._poll_saves()
        if self.disk is not None:
            self.disk.new_step()

    def _poll_saves(self) -> None:
        if not self._saving:
            return
        still = []
        for handle, blocks in self._saving:
            if handle.done():
                self.pool.release(blocks)
            else:
                still.append((handle, blocks))
        self._saving = still

    def drain(self) -> None:
        """Releases every finished request, issues every queued save and waits for all of them."""
        self._release_late(force=True)
        self.flush()
        for handle, _ in self._saving:
            handle.wait()
        self.poll()

    @property
    def num_host_slots_used(self) -> int:
        return self._host_slots.num_used if self._host_slots is not None else 0

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block no request holds, and the whole host tier."""
        self.drain()
        for block, node in list(self.tree.node_of_block.items()):
            if self.pool.ref_count(block) == 0:
                del self.tree.node_of_block[block]
                node.block = None
                self.pool.uncache(block)
        if self._host_slots is not None:
            for node, _ in self._host_slots.items():
                node.host_slot = None
                self._host_slots.forget(node)
        if self.disk is not None:
            self.disk.clear()
        for node in list(self.tree.walk()):
            self.tree.prune(node)

    # ---- checks -----------------------------------------------------------------------------------------
    def check_invariant(self) -> None:
        """Ref counts equal the holders (requests and copies in flight), the tree agrees with the
        pool and the host slots, and no node is kept for nothing."""
        self.pool.check_invariant()
        seqs = {**self._seqs, **{f"late:{r.request_id}": s for r, s in self._late}}
        holders = Counter(b for seq in seqs.values() for b in seq.blocks)
        holders.update(b for b, _, _ in self._to_save)
        holders.update(b for _, blocks in self._saving for b in blocks)
        for b in range(self.pool.num_blocks):
            if self.pool.ref_count(b) != holders[b]:
                raise KVCacheError(f"block {b}: ref count {self.pool.ref_count(b)}, {holders[b]} holders")
        nodes = list(self.tree.walk())
        cached = {n.block for n in nodes if n.block is not None}
        if cached != set(self.tree.node_of_block) or len(cached) != sum(n.block is not None for n in nodes):
            raise KVCacheError("the tree's device blocks and node_of_block disagree")
        if len(cached) != self.pool.num_cached or not all(self.pool.is_cached(b) for b in cached):
            raise KVCacheError(f"{len(cached)} cached nodes, {self.pool.num_cached} cached blocks in the pool")
        for b, node in self.tree.node_of_block.items():
            if node.block != b:
                raise KVCacheError(f"node_of_block[{b}] points at a node of block {node.block}")
        users = Counter(id(n) for seq in seqs.values() for n in seq.chain)
        owned: dict[str, set[int]] = {}
        for rid, seq in [*self._seqs.items(), *((r.request_id, q) for r, q in self._late)]:
            owned.setdefault(rid, set()).update(id(n) for n in seq.chain)
        for node in nodes:
            if node.unused:
                raise KVCacheError("an unused node stayed in the tree")
            if min(node.tokens) < 0:
                raise KVCacheError(f"a node holds a placeholder token: {node.tokens}")
            if node.users != users[id(node)]:
                raise KVCacheError(f"node users {node.users} != {users[id(node)]} chains")
            if node.owner is not None and id(node) not in owned.get(node.owner, ()):
                raise KVCacheError(f"node owned by {node.owner}, which does not hold it")
        slots = {n.host_slot: n for n in nodes if n.host_slot is not None}
        if self._host_slots is not None:
            listed = {s: n for n, s in self._host_slots.items()}
            if set(listed) != set(slots) or any(listed[s] is not n for s, n in slots.items()):
                raise KVCacheError("host slots and the tree disagree")
        elif slots:
            raise KVCacheError("nodes hold host slots without a host tier")
        problem = self.disk.check(nodes) if self.disk is not None else (
            "nodes hold disk slots without a disk tier" if any(n.disk_slot is not None for n in nodes) else None)
        if problem:
            raise KVCacheError(problem)
        for rid, seq in seqs.items():
            if seq.num_committed > min(len(seq.chain), len(seq.blocks)):
                raise KVCacheError(f"{rid}: {seq.num_committed} committed of {len(seq.blocks)} blocks")
            for parent, child in zip([self.tree.root] + seq.chain, seq.chain):
                if child.parent is not parent:
                    raise KVCacheError(f"{rid}: its chain is not a path of the tree")
