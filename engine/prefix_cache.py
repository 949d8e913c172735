"""The automatic prefix cache: KV of recent contexts, matched on token ids, LRU within a byte budget."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

import numpy as np

from gpt2_onnx.kv_cache import KVCache
from gpt2_onnx.model import Model
from gpt2_onnx.types import Prefix

BLOCK = 16  # tokens per block of the prefix cache's index
Key = tuple[int, tuple[int, ...]]  # (LoRA adapter key, 0 for none; context ids)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    k = min(len(a), len(b))
    eq = a[:k] == b[:k]
    return k if eq.all() else int(eq.argmin())


def block_hashes(ids: Seq[int], tag: int = 0) -> list[int]:
    """Chained hashes of the full BLOCK-token blocks of ids: h[k] stands for ids[: (k + 1) * BLOCK] (under the
    LoRA adapter `tag`, 0 for none)."""
    out, h = [], tag
    for k in range(len(ids) // BLOCK):
        h = hash((h, tuple(ids[k * BLOCK : (k + 1) * BLOCK])))
        out.append(h)
    return out


class PrefixCache:
    """KV of recent contexts, matched on token ids (longest common prefix), LRU within a byte budget.

    Entries are indexed by the chained hashes of their BLOCK-token blocks, so matching walks the
    query's blocks instead of every entry; of the entries sharing the deepest block, the 8 newest are
    compared (any other there shares fewer than BLOCK more tokens). Contexts shorter than a block are
    not kept.
    A sequence's own prefix (an explicit `prefix=` of a call) matches it at any length; it is the
    caller's, never kept here. Entries are keyed by (LoRA adapter key, ids): KV computed under one adapter
    (or none, key 0) is never reused for another's context.
    """

    def __init__(self, model: Model, max_bytes: int = 0):
        self.model, self.max_bytes = model, max_bytes
        cfg = model.cfg
        self.token_bytes = 2 * cfg.n_layer * cfg.n_head * cfg.kv_head_size * np.dtype(cfg.np_dtype).itemsize
        self.entries: OrderedDict[Key, Prefix] = OrderedDict()  # least recently used first
        self.index: dict[int, dict[Key, None]] = {}  # block hash -> entries starting with those blocks
        self.ends: dict[int, set[Key]] = {}  # last full block's hash -> entries ending in that block
        self.nbytes = 0  # kept up to date here, so another thread may read it at any time
        self.hits = self.misses = 0
        self.hit_tokens = 0

    def match(self, ids: np.ndarray, prefix: Prefix | None = None, tag: int = 0) -> tuple[int, Prefix | None]:
        """(tokens reusable, entry) for a context under the LoRA adapter `tag`, whose own prefix may be given.
        At most len(ids) - 1, so one token is left to run, unless that prefix is the whole context and
        knows its last logits."""
        n, best, entry = len(ids), 0, None
        for p in [prefix] if prefix is not None else []:
            m = common_prefix(p.ids, ids)
            if m == len(p.ids) == n and p.last_logits is not None:
                return n, p
            if min(m, n - 1) > best:
                best, entry = min(m, n - 1), p
        for h in reversed(block_hashes(ids, tag)):
            bucket = self.index.get(h)
            if bucket:
                for key in list(bucket)[-8:]:  # the newest entries sharing the deepest block
                    m = min(common_prefix(self.entries[key].ids, ids), n - 1) if key[0] == tag else 0
                    if m > best:
                        best, entry = m, self.entries[key]
                if entry is not None and (tag, entry.token_ids) in self.entries:
                    self.entries.move_to_end((tag, entry.token_ids))
                break
        return best, entry

    def insert(self, ids: list[int], pool: KVCache, row: int, tag: int = 0) -> None:
        """Keep the KV of a context that was just computed in `row` of pool (a copy on the device) under the
        LoRA adapter `tag` (0: none)."""
        key = (tag, tuple(ids))
        if not self.max_bytes or len(ids) < BLOCK or len(ids) * self.token_bytes > self.max_bytes:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        arr, hashes = np.array(ids, np.int64), block_hashes(ids, tag)
        for other in list(self.index.get(hashes[-1], {}))[-8:]:  # a longer entry covers it already
            if other[0] == tag and common_prefix(self.entries[other].ids, arr) == len(ids):
                self.entries.move_to_end(other)
                return
        for h in hashes:  # entries that this context extends are replaced by it
            for other in list(self.ends.get(h, ())):
                if other[0] == tag and len(other[1]) <= len(ids) and \
                        common_prefix(self.entries[other].ids, arr) == len(other[1]):
                    self._drop(other)
        cache = self.model.new_cache(1, len(ids))
        self.model.copy_kv(pool, row, cache, 0, len(ids))
        entry = Prefix(key[1], cache, lora=tag)
        self.entries[key] = entry
        for h in hashes:
            self.index.setdefault(h, {})[key] = None
        self.ends.setdefault(hashes[-1], set()).add(key)
        self.nbytes += cache.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: Key) -> None:
        entry = self.entries.pop(key)
        hashes = block_hashes(key[1], key[0])
        for h in hashes:
            bucket = self.index[h]
            del bucket[key]
            if not bucket:
                del self.index[h]
        self.ends[hashes[-1]].discard(key)
        if not self.ends[hashes[-1]]:
            del self.ends[hashes[-1]]
        self.nbytes -= entry.cache.nbytes
