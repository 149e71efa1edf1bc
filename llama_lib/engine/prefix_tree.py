"""A radix tree over token sequences: which cached sequences share how much of a prompt.

The prompt cache's unbounded parts (idle prefixes held by spare KV sequences, holders.py, and
the host-RAM tier's entries, ram_cache.py) register their token arrays here under a key of
their own. `match(prompt)` walks the prompt once down the tree and gives every key that shares
at least one token with it, with the length of that common prefix, so choosing among a few
hundred cached sequences costs one walk instead of a comparison with each. The caller still
applies its own rules (system prompt version, sliding window, llama-server's choice rule) to
what it gets back. Plain Python and numpy; no C state.
"""

from __future__ import annotations

from typing import Hashable, Iterator

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class _Node:
    __slots__ = ("edge", "children", "through")

    def __init__(self, edge: np.ndarray):
        self.edge = edge                          # tokens from the parent to this node
        self.children: dict[int, _Node] = {}      # by the first token of the child's edge
        self.through: set = set()                 # keys whose sequence contains this node's path


class PrefixTree:
    """Token sequences under keys; every key's sequence ends at a node (edges split on insert)."""

    def __init__(self) -> None:
        self._root = _Node(np.zeros(0, np.int32))
        self._tokens: dict[Hashable, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tokens

    def keys(self) -> Iterator[Hashable]:
        return iter(self._tokens)

    def insert(self, key: Hashable, tokens: np.ndarray) -> None:
        """Register (or re-register) `key` as holding `tokens`."""
        if key in self._tokens:
            self.remove(key)
        tokens = np.asarray(tokens, np.int32)
        self._tokens[key] = tokens
        node, depth = self._root, 0
        node.through.add(key)
        while depth < len(tokens):
            child = node.children.get(int(tokens[depth]))
            if child is None:
                leaf = _Node(tokens[depth:].copy())
                leaf.through.add(key)
                node.children[int(tokens[depth])] = leaf
                return
            m = common_prefix(child.edge, tokens[depth:])
            if m < len(child.edge):  # split the edge where the sequences part
                mid = _Node(child.edge[:m])
                mid.through = set(child.through)
                child.edge = child.edge[m:]
                mid.children[int(child.edge[0])] = child
                node.children[int(mid.edge[0])] = mid
                child = mid
            child.through.add(key)
            node, depth = child, depth + m

    def remove(self, key: Hashable) -> None:
        """Forget `key` (nothing happens if it is not there)."""
        tokens = self._tokens.pop(key, None)
        if tokens is None:
            return
        path = [self._root]
        node, depth = self._root, 0
        node.through.discard(key)
        while depth < len(tokens):
            node = node.children[int(tokens[depth])]
            node.through.discard(key)
            path.append(node)
            depth += len(node.edge)
        for parent, child in zip(reversed(path[:-1]), reversed(path[1:])):
            if not child.through:
                del parent.children[int(child.edge[0])]
            elif len(child.children) == 1 and len(child.through) == len(next(iter(child.children.values())).through):
                only = next(iter(child.children.values()))  # no key ends here: merge the edges
                child.edge = np.concatenate([child.edge, only.edge])
                child.children = only.children

    def tokens(self, key: Hashable) -> np.ndarray:
        return self._tokens[key]

    def match(self, prompt: np.ndarray) -> dict[Hashable, int]:
        """Every key sharing a non-empty prefix with `prompt`, with that prefix's length."""
        out: dict[Hashable, int] = {}
        node, depth = self._root, 0
        while True:
            child = node.children.get(int(prompt[depth])) if depth < len(prompt) else None
            if child is None:
                if depth:
                    out.update(dict.fromkeys(node.through, depth))
                return out
            if depth:  # keys ending here or turning elsewhere share exactly `depth` tokens
                out.update(dict.fromkeys(node.through - child.through, depth))
            m = common_prefix(child.edge, prompt[depth:depth + len(child.edge)])
            if m < len(child.edge):
                out.update(dict.fromkeys(child.through, depth + m))
                return out
            node, depth = child, depth + m

    def longest(self, prompt: np.ndarray) -> tuple[Hashable | None, int]:
        """A key sharing the longest prefix with `prompt` and its length ((None, 0) if none)."""
        best, n = None, 0
        for key, k in self.match(prompt).items():
            if k > n:
                best, n = key, k
        return best, n
