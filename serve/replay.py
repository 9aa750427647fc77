"""Replaying an expert-access sequence against other cache sizes: the misses each eviction
policy would have (the device cache's own rule: a layer's experts are held at once, a miss
takes an empty slot or evicts the policy's victim among the others), and the fewest any
policy could have (`fewest_misses`). Used by `moe-serve plan --trace` and bench/policies.py.
"""

from __future__ import annotations

import heapq
import math
import sys

from serve.cache import POLICIES, Key


def held_groups(layers: list[tuple[list[Key], bool]], slots: int
                ) -> list[tuple[list[Key], bool]]:
    """Each layer's experts split as the runtime splits them: groups of at most `slots`
    held at once (serve/runtime.py `_in_groups`)."""
    return [(keys[a:a + slots], counted) for keys, counted in layers
            for a in range(0, len(keys), slots)]


def replay(layers: list[tuple[list[Key], bool]], slots: int, policy: str,
           n_layers: int) -> tuple[int, int]:
    """layers: (a layer's experts in one pass, counted) in order -> (hits, misses) of the
    counted ones with `slots` slots under `policy` (serve/cache.py), as the device cache
    without prefetch would have them."""
    rule = POLICIES[policy](n_layers)
    resident: set[Key] = set()
    hits = misses = 0
    for keys, counted in held_groups(layers, slots):
        held = set(keys)
        for key in keys:
            if key in resident:
                hits += counted
            else:
                misses += counted
                if len(resident) >= slots:
                    resident.discard(rule.victim([k for k in resident if k not in held]))
                resident.add(key)
            rule.touch(key)
    return hits, misses


def fewest_misses(trace: list[tuple[Key, bool]], slots: int) -> int:
    """The fewest misses any eviction choice gives `slots` slots on this access sequence,
    counting only the accesses marked True (the others warm the cache, free): the floor
    under every policy's misses, so under the expert bytes a token must move with this
    cache. Belady's rule is optimal only when every miss counts; with free accesses this is
    weighted paging, solved exactly as a min-cost flow: keeping an expert resident from one
    access to its next saves that next access's miss and holds a slot in between, and at
    most slots - 1 experts besides the one in use can be held at once."""
    n = len(trace)
    graph: list[list[list[int]]] = [[] for _ in range(n + 1)]  # [to, capacity, cost, back]

    def edge(u: int, v: int, cap: int, cost: int) -> None:
        graph[u].append([v, cap, cost, len(graph[v])])
        graph[v].append([u, 0, -cost, len(graph[u]) - 1])

    for t in range(n):  # spare slots between accesses
        edge(t, t + 1, slots - 1, 0)
    last: dict[Key, int] = {}
    misses = sum(counted for _, counted in trace)
    for j, (key, counted) in enumerate(trace):
        i, last[key] = last.get(key), j
        if i is None or not counted:
            continue
        if j == i + 1:
            misses -= 1  # used again at once: nothing evicts it
        else:  # resident over accesses i + 1 .. j - 1
            edge(i + 1, j, 1, -1)
    potential = [0.0] * (n + 1)  # edges point forward: shortest paths in order
    for u in range(n + 1):
        for v, cap, cost, _ in graph[u]:
            if cap > 0 and v > u:
                potential[v] = min(potential[v], potential[u] + cost)
    flow = slots - 1
    while flow > 0:  # successive shortest paths (Dijkstra on reduced costs)
        dist, prev = [math.inf] * (n + 1), [(-1, -1)] * (n + 1)
        dist[0], heap = 0.0, [(0.0, 0)]
        while heap:
            d, u = heapq.heappop(heap)
            if d > dist[u]:
                continue
            for at, (v, cap, cost, _) in enumerate(graph[u]):
                nd = d + cost + potential[u] - potential[v]
                if cap > 0 and nd < dist[v] - 1e-9:
                    dist[v], prev[v] = nd, (u, at)
                    heapq.heappush(heap, (nd, v))
        if dist[n] == math.inf:
            break
        potential = [p + d if d < math.inf else p for p, d in zip(potential, dist, strict=True)]
        push, v = flow, n
        while v:
            u, at = prev[v]
            push, v = min(push, graph[u][at][1]), u
        v = n
        while v:
            u, at = prev[v]
            e = graph[u][at]
            e[1] -= push
            graph[v][e[3]][1] += push
            misses += push * e[2]
            v = u
        flow -= push
    return misses


def flat(layers: list[tuple[list[Key], bool]]) -> list[tuple[Key, bool]]:
    """The accesses one by one (fewest_misses' input)."""
    return [(key, counted) for keys, counted in layers for key in keys]


FLOOR_MOST = 200_000  # accesses above which the exact floor is left out (it would take long)


def sweep(layers: list[tuple[list[Key], bool]], slot_counts: list[int], n_layers: int,
          expert_bytes: int, decode_tokens: int, verbose: bool = False) -> list[dict]:
    """For each slot count: every policy's decode hit rate and expert bytes per decode token
    on this access sequence, and the floor's (None for sequences over FLOOR_MOST accesses)."""
    accesses = flat(layers)
    asked = sum(counted for _, counted in accesses)
    rows = []
    for slots in slot_counts:
        row: dict = {"slots": slots, "policies": {}}
        for policy in POLICIES:
            _, misses = replay(layers, slots, policy, n_layers)
            row["policies"][policy] = rates(misses, asked, expert_bytes, decode_tokens)
        row["fewest"] = (rates(fewest_misses(accesses, slots), asked, expert_bytes,
                                decode_tokens) if len(accesses) <= FLOOR_MOST else None)
        rows.append(row)
        if verbose:
            print(f"  replayed {slots} slots", file=sys.stderr, flush=True)
    return rows


def rates(misses: int, asked: int, expert_bytes: int, tokens: int) -> dict:
    """misses of `asked` accesses over `tokens` decode tokens -> hit rate, misses and expert
    bytes moved a token."""
    return {"hit_rate": 1 - misses / asked if asked else 1.0, "misses": misses,
            "bytes_per_token": misses * expert_bytes / tokens if tokens else 0.0}
