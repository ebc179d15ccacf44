"""Expert loads of a residency policy replayed on recorded traces (engine/trace.py), against offline bounds.

Each prompt is replayed as the engine runs it: its prefill as one batch per MoE layer (each distinct expert it
selects read once), then each generated token layer by layer; one arena of `slots` experts over all layers,
kept from prompt to prompt. A selection of a non-resident expert is one move (an expert's bytes), whether it is
loaded into a slot or computed from where it lies (bypass). Policies: LRU (what the store does without a
predictor); Belady's MIN with bypass (evict the resident used again furthest ahead, or leave the arena alone if
the missed expert comes back later than all of them: the fewest moves any policy can make, given the future);
a static set per prompt (its own most-selected experts, known in advance: the best a perfect prompt-level
prediction with no in-prompt eviction can do); and an online policy, each expert's selections decayed per decode
token with bypass, alone and knowing the current token's later layers (an exact HOBBIT lookahead); and the store's
token lookup (--token-lookup), where the traces hold token ids. bench/emoe.py prints them beside the store's
measurements.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

from hotcold.engine.experts.lookup import TokenLookup
from hotcold.engine.trace import Traces

NEVER = 1 << 62


def accesses(tr: Traces) -> list[tuple[int, bool, list[tuple[int, int]]]]:
    """(prompt, is_prefill, keys) per batch step: a prompt's prefill per layer, then each generated token per layer."""
    steps = []
    for i in range(tr.n_prompts):
        pre = tr.experts[tr.rows(i, "prefill")]
        for l in range(tr.n_layer):
            steps.append((i, True, [(l, int(e)) for e in sorted(set(pre[:, l].ravel().tolist()))]))
        dec = tr.experts[tr.rows(i, "decode")]
        for t in range(dec.shape[0]):
            for l in range(tr.n_layer):
                steps.append((i, False, [(l, int(e)) for e in sorted(set(dec[t, l].tolist()))]))
    return steps


def lru_moves(steps: list, slots: int) -> int:
    res: OrderedDict = OrderedDict()
    moves = 0
    for _, _, keys in steps:
        for k in keys:
            if k in res:
                res.move_to_end(k)
                continue
            moves += 1
            if len(res) >= slots:
                victim = next((x for x in res if x not in keys), None)
                if victim is None:
                    continue
                del res[victim]
            res[k] = None
    return moves


def _bypass_moves(steps: list, slots: int, observe: Callable, protected: Callable, score: Callable) -> int:
    """The replay of a policy with bypass: each step's selections go to `observe(s, pre, keys)` first; a miss with
    the arena full evicts the candidate (not selected now, not in `protected(s)`) of the highest score(key), unless
    the missed expert's own score is no lower, when it is computed where it lies."""
    res: set = set()
    moves = 0
    for s, (_, pre, keys) in enumerate(steps):
        observe(s, pre, keys)
        for k in keys:
            if k in res:
                continue
            moves += 1
            if len(res) < slots:
                res.add(k)
                continue
            cands = [x for x in res if x not in keys and x not in protected(s)]
            if cands:
                victim = max(cands, key=score)
                if score(victim) > score(k):
                    res.discard(victim)
                    res.add(k)
    return moves


def belady_moves(steps: list, slots: int) -> int:
    nxt: list[dict] = [{} for _ in steps]                      # step -> key -> the next step that selects it
    later: dict = {}
    for s in range(len(steps) - 1, -1, -1):
        for k in steps[s][2]:
            nxt[s][k] = later.get(k, NEVER)
            later[k] = s
    upcoming = dict(later)

    def observe(s: int, pre: bool, keys: list) -> None:
        for k in keys:
            upcoming[k] = nxt[s][k]
    return _bypass_moves(steps, slots, observe, lambda s: (), upcoming.__getitem__)


def static_moves(tr: Traces, steps: list, slots: int) -> int:
    share = tr.usage("all")                                    # (P, L, E): each prompt's own selections
    res: set = set()
    moves, cur = 0, -1
    for i, _, keys in steps:
        if i != cur:
            cur = i
            ranked = sorted(((share[i, l, e], l, e) for l in range(tr.n_layer) for e in range(tr.n_expert)), reverse=True)
            want = {(l, e) for _, l, e in ranked[:slots]}
            moves += len(want - res)                           # loaded before the prompt
            res = want
        moves += sum(k not in res for k in keys)
    return moves


def later_in_token(steps: list) -> list[set]:
    """For each step, the keys its token selects at later layers (a decode token's rest of the pass, a prefill's
    later layers): what HOBBIT's lookahead predicts, known exactly here."""
    out: list[set] = [set() for _ in steps]
    ahead: set = set()
    below = NEVER
    for s in range(len(steps) - 1, -1, -1):
        layer = steps[s][2][0][0] if steps[s][2] else 0
        if layer >= below:                                      # the next step starts another pass
            ahead = set()
        out[s] = set(ahead)
        ahead |= set(steps[s][2])
        below = layer
    return out


def frequency_moves(steps: list, slots: int, n_layer: int, n_expert: int, decay: float = 0.95,
                    foresight: bool = False) -> int:
    """An online policy: each expert's selections, decayed by `decay` a decode token; a miss evicts the unselected
    resident selected least, or is computed where it lies (bypass) if it is selected less than that one; with
    `foresight`, residents the token selects at later layers are never evicted."""
    ahead = later_in_token(steps) if foresight else [set()] * len(steps)
    count = np.zeros((n_layer, n_expert))
    last = [-1]

    def observe(s: int, pre: bool, keys: list) -> None:
        layer = keys[0][0] if keys else 0
        if layer <= last[0] and not pre:
            count[:] *= decay
        last[0] = layer
        for k in keys:
            count[k] += 1
    return _bypass_moves(steps, slots, observe, ahead.__getitem__, lambda k: -count[k])


def lookup_moves(tr: Traces, steps: list, slots: int, horizon: int = 4) -> int:
    """The store's token lookup (engine/experts/lookup.py's TokenLookup itself) replayed: each prompt a new sequence,
    its prefill one pass and each generated token one; a miss evicts the unselected resident TokenLookup.score ranks
    first (predicted furthest ahead, then selected least), or is computed where it lies if it ranks no lower."""
    look = TokenLookup(tr.n_layer, tr.n_expert, horizon)
    passes: list[np.ndarray] = []                              # each step's pass: its rows (token ids, routing)
    for i in range(tr.n_prompts):
        pre, dec = tr.rows(i, "prefill"), tr.rows(i, "decode")
        passes += [np.arange(pre.start, pre.stop)] * tr.n_layer
        passes += [np.array([r]) for r in range(dec.start, dec.stop) for _ in range(tr.n_layer)]
    order = np.zeros((tr.n_layer, tr.n_expert))

    def observe(s: int, pre: bool, keys: list) -> None:
        rows, layer = passes[s], s % tr.n_layer                 # every pass is one step a layer
        if layer == 0:
            if pre:
                look.new_sequence()
            look.begin(tr.tokens[rows], None)
        look.record(layer, tr.experts[rows, layer].astype(np.int64))
        order[:] = look.score(layer)
    return _bypass_moves(steps, slots, observe, lambda s: (), lambda k: order[k])


def bounds(tr: Traces, slots: int) -> dict[str, float]:
    """Moves per traced token of LRU, Belady's MIN with bypass, the per-prompt static oracle, the decayed
    frequency policy without and with the token's later layers known, and (traces with token ids) the token lookup."""
    steps = accesses(tr)
    n = int(tr.offsets[-1])
    out = {"LRU": lru_moves(steps, slots) / n, "Belady (offline)": belady_moves(steps, slots) / n,
           "static per prompt (oracle)": static_moves(tr, steps, slots) / n,
           "decayed frequency, bypass": frequency_moves(steps, slots, tr.n_layer, tr.n_expert) / n,
           "decayed frequency, bypass, token foresight": frequency_moves(steps, slots, tr.n_layer, tr.n_expert,
                                                                         foresight=True) / n}
    if tr.tokens is not None:
        out["token lookup"] = lookup_moves(tr, steps, slots) / n
    return out
