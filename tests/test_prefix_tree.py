"""The radix tree of cached token sequences (llama_lib/engine/prefix_tree.py) against a plain
scan: after any series of inserts and removals, match() gives every key's common prefix."""

import numpy as np
from hypothesis import given, settings, strategies as st

from llama_lib.engine.prefix_tree import PrefixTree, common_prefix

# a small alphabet so that sequences share prefixes and edges split and merge often
seqs = st.lists(st.integers(0, 3), min_size=0, max_size=12).map(lambda v: np.array(v, np.int32))
ops = st.lists(st.tuples(st.booleans(), st.integers(0, 7), seqs), min_size=1, max_size=40)


def brute(held: dict, prompt: np.ndarray) -> dict:
    return {k: n for k, t in held.items() if (n := common_prefix(t, prompt)) > 0}


@settings(max_examples=300, deadline=None)
@given(ops, st.lists(seqs, min_size=1, max_size=5))
def test_match_equals_a_scan(steps, prompts):
    tree, held = PrefixTree(), {}
    for add, key, tokens in steps:
        if add:
            tree.insert(key, tokens)
            held[key] = tokens
        else:
            tree.remove(key)
            held.pop(key, None)
        for p in prompts:
            assert tree.match(p) == brute(held, p)
    assert len(tree) == len(held) and set(tree.keys()) == set(held)
    for key in list(held):
        tree.remove(key)
    assert tree.match(np.array([0, 1, 2, 3], np.int32)) == {}
    assert not tree._root.children  # nothing left behind


def test_longest_and_exact_lengths():
    tree = PrefixTree()
    tree.insert("doc", np.arange(100, dtype=np.int32))
    tree.insert("branch", np.concatenate([np.arange(60), [999, 998]]).astype(np.int32))
    tree.insert("short", np.arange(10, dtype=np.int32))
    prompt = np.concatenate([np.arange(80), [5]]).astype(np.int32)
    assert tree.match(prompt) == {"doc": 80, "branch": 60, "short": 10}
    assert tree.longest(prompt) == ("doc", 80)
    assert tree.longest(np.array([7, 7], np.int32)) == (None, 0)
    tree.remove("doc")
    assert tree.longest(prompt) == ("branch", 60)
