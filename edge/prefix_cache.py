"""An LRU of KV snapshots, one per composition, bounded in bytes.

A composition is the ordered tuple of bank entries injected after BOS
(``(mode, constraint, ...)`` in bank order; ``()`` for the bare model). Its
snapshot is the sequence state of ``[BOS][mode][constraints]`` as returned by
``llama_state_seq_get_data``; restoring it replaces a prefill of the prefix.
Plain Python over ``bytes``: nothing here touches llama.cpp.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Hashable

log = logging.getLogger(__name__)

DEFAULT_PREFIX_CACHE_BYTES = 64 << 20  # 64 MiB: ~18 KB per position on the 270M model, ~50 prefixes of 64 positions


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0  # bytes held now
    max_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class PrefixCache:
    """``key -> bytes`` with least-recently-used eviction once ``max_bytes`` is exceeded.

    A snapshot larger than ``max_bytes`` is not stored (``max_bytes=0`` disables
    caching). ``hits``/``misses`` count :meth:`get` calls.
    """

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> bytes | None:
        blob = self._items.get(key)
        if blob is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return blob

    def put(self, key: Hashable, blob: bytes) -> None:
        if key in self._items:
            self._bytes -= len(self._items.pop(key))
        if len(blob) > self.max_bytes:
            log.debug("prefix snapshot for %s (%d bytes) exceeds the cache bound %d; not cached",
                      key, len(blob), self.max_bytes)
            return
        self._items[key] = blob
        self._bytes += len(blob)
        while self._bytes > self.max_bytes:
            old, dropped = self._items.popitem(last=False)
            self._bytes -= len(dropped)
            self.evictions += 1
            log.debug("evicted prefix snapshot %s (%d bytes)", old, len(dropped))

    def peek(self, key: Hashable) -> bytes | None:
        """The snapshot for ``key`` without counting a hit or changing the LRU order."""
        return self._items.get(key)

    def clear(self) -> None:
        """Drop every snapshot (counters are kept; see :meth:`reset_stats`)."""
        self._items.clear()
        self._bytes = 0

    def reset_stats(self) -> None:
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, len(self._items), self._bytes, self.max_bytes)
