"""Cores shared between the models' children, not oversubscribed (ours; not in llama-server).

Two children decoding at once would each run a thread team of `-t` threads on the same cores;
their teams' barriers then wait on threads the other team has descheduled. The router knows
which models are busy (the requests it holds for them, server.router.models), so it splits the
cores among them: each busy model gets a disjoint share (cpuset.split_cpus of the router's own
CPUs), a lone busy model gets them all, and an idle model keeps them all (it computes nothing;
its share is cut the moment a request for it is held, before the request is passed on). A
share goes to the child as a `cpus 0,1` line on its control pipe, and the child applies it
between two steps (server.cpu_share: threads pinned, min(-t, CPUs) threads per decode).
A model given its own CPU set (-C / -Cr in its flags) is left out of the split.
`--no-models-share-cpus` turns it off.
"""

from __future__ import annotations

import os

from llama_lib.cpuset import format_cpus, split_cpus

PINNED_FLAGS = {"-C", "--cpu-mask", "-Cr", "--cpu-range"}  # a model given its own CPU set


class CoreArbiter:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.cpus = tuple(sorted(os.sched_getaffinity(0)))
        self.n_changes = 0

    def shares(self, loaded: list, busy: list) -> dict:
        """{instance name: CPUs} for the loaded instances, `busy` among them."""
        all_cpus = {i.spec.name: self.cpus for i in loaded}
        if len(busy) > 1:
            order = sorted(busy, key=lambda i: i.spec.name)  # a stable placement
            all_cpus.update({i.spec.name: s for i, s in zip(order, split_cpus(self.cpus, len(order)))})
        return all_cpus

    def rebalance(self, instances) -> None:
        """Under the table's lock: send each loaded child its share when it changed."""
        if not self.enabled:
            return
        loaded = [i for i in instances if i.status == "loaded" and i.child is not None and not i.stopping
                  and not PINNED_FLAGS.intersection(i.spec.args)]  # its own CPU set: left alone
        busy = [i for i in loaded if i.users > 0]
        shares = self.shares(loaded, busy)
        for inst in loaded:
            share = shares[inst.spec.name]
            if inst.cpus != share:
                inst.cpus = share
                self.n_changes += 1
                inst.child.control("cpus " + ",".join(map(str, share)))

    @staticmethod
    def view(inst) -> str | None:
        return format_cpus(inst.cpus) if inst.cpus else None
