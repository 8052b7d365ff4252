"""The prefix cache's index: a tree of full KV blocks (a radix tree whose edges are whole blocks).

A node stands for one full block of tokens *after* the tokens of its ancestors, so the path from the
root spells a prefix exactly. A node's children are keyed by the block's token tuple: the dict hashes
the tuple and then compares it for equality, and the parent is an object, not a hash of it, so two
different token prefixes can never share a node (no hash collision can alias KV). This is the same key
as vLLM's block hash of (parent hash, block tokens), made exact. Nothing else changes a block's KV:
the model, the KV dtype and the block size are fixed per engine, the position is the depth.

A node's KV may live on the device (`block`), in the host tier (`host_slot`), in the disk tier
(`disk_slot`), in several of them, or nowhere (an interior node kept because of its children or its
users). `owner` marks a node whose block a running request is computing right now: a request that
needs it waits for it instead of computing it a second time. `users` counts the requests whose block table follows the node (they keep it alive).

This module is bookkeeping only; KVCacheManager (kv_cache.py) owns the blocks and the ref counts.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


class TokenSource(Protocol):
    """What the cache reads from a request: a slice of its prompt + output tokens."""

    def token_slice(self, start: int, end: int) -> list[int]: ...


class Node:
    __slots__ = ("tokens", "parent", "children", "block", "host_slot", "disk_slot", "owner", "users")

    def __init__(self, tokens: tuple[int, ...], parent: "Node | None"):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.block: int | None = None
        """Device block holding this node's KV, or None."""
        self.host_slot: int | None = None
        """Host-tier slot holding a copy of this node's KV, or None."""
        self.disk_slot: int | None = None
        """Disk-tier slot holding a copy of this node's KV, or None."""
        self.owner: str | None = None
        """Request id computing this block now (its KV is not ready yet), or None."""
        self.users = 0
        """Requests whose block table includes this node."""

    @property
    def unused(self) -> bool:
        """Holds nothing and nobody needs it: it can leave the tree."""
        return (self.block is None and self.host_slot is None and self.disk_slot is None
                and self.owner is None and self.users == 0 and not self.children)


@dataclass
class PrefixHit:
    """The longest cached prefix of a request, in whole blocks."""

    nodes: list[Node] = field(default_factory=list)
    """The matched nodes in order; each has a device block or a host slot."""
    num_host: int = 0
    """How many of them are only in the host tier (they are copied back to the device)."""
    num_disk: int = 0
    """How many of them are only in the disk tier (read into the host tier, then copied back)."""
    wait: bool = False
    """The block after the hit is being computed by a running request: admitting this request one
    step later reuses it instead of computing it twice."""

    def num_tokens(self, block_size: int) -> int:
        return len(self.nodes) * block_size


class PrefixTree:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.root = Node((), None)
        self.node_of_block: dict[int, Node] = {}
        """Device block -> the node it caches."""

    def block_tokens(self, source: TokenSource, j: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(source.token_slice(j * bs, (j + 1) * bs))

    def lookup(self, source: TokenSource, max_blocks: int, use_host: bool) -> PrefixHit:
        """Walks the tree along the request's first max_blocks full blocks (use_host: the host and
        disk tiers' copies count too)."""
        hit = PrefixHit()
        node = self.root
        for j in range(max_blocks):
            child = node.children.get(self.block_tokens(source, j))
            if child is None:
                break
            if child.block is None:
                if not use_host or (child.host_slot is None and child.disk_slot is None):
                    hit.wait = child.owner is not None
                    break
                if child.host_slot is not None:
                    hit.num_host += 1
                else:
                    hit.num_disk += 1
            hit.nodes.append(child)
            node = child
        return hit

    def extend(self, source: TokenSource, chain: list[Node], upto: int, owner: str | None) -> int:
        """Appends the nodes of blocks len(chain):upto to a request's chain (creating them); with an
        owner, claims each one that holds no KV and has no owner yet. Each appended node gains a user.
        Stops before a block holding a placeholder id (< 0: an aborted request's dropped token);
        returns the chain's length."""
        node = chain[-1] if chain else self.root
        for j in range(len(chain), upto):
            key = self.block_tokens(source, j)
            if min(key) < 0:
                break
            child = node.children.get(key)
            if child is None:
                child = Node(key, node)
                node.children[key] = child
            if (owner is not None and child.owner is None and child.block is None and child.host_slot is None
                    and child.disk_slot is None):
                child.owner = owner
            child.users += 1
            chain.append(child)
            node = child
        return len(chain)

    def attach(self, node: Node, block: int, owner: str) -> bool:
        """The request `owner` finished computing `node`'s block into `block`. True when `block` now
        caches the node; False when the node already has a device block (ours stays private)."""
        if node.owner == owner:
            node.owner = None
        if node.block is not None:
            return False
        node.block = block
        self.node_of_block[block] = node
        return True

    def detach(self, chain: list[Node], owner: str) -> None:
        """A request lets go of its chain: drop its users and claims, prune what became unused."""
        for node in chain:
            node.users -= 1
            if node.owner == owner:
                node.owner = None
        for node in reversed(chain):
            self.prune(node)

    def forget_block(self, block: int) -> Node:
        """The device block is evicted (reused for something else)."""
        node = self.node_of_block.pop(block)
        node.block = None
        self.prune(node)
        return node

    def prune(self, node: Node) -> None:
        while node is not self.root and node.unused and node.parent.children.get(node.tokens) is node:
            parent = node.parent
            del parent.children[node.tokens]
            node = parent

    def walk(self) -> Iterator[Node]:
        """Every node but the root (tests and invariant checks)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
