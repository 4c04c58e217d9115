"""PrefixCache: an LRU of KV snapshots bounded in bytes (pure Python, no model)."""
from __future__ import annotations

import pytest

from edge_safe.prefix_cache import PrefixCache


def test_get_put_counts_hits_and_misses():
    c = PrefixCache(100)
    assert c.get(("a",)) is None
    c.put(("a",), b"x" * 10)
    assert c.get(("a",)) == b"x" * 10
    s = c.stats()
    assert (s.hits, s.misses, s.entries, s.bytes, s.max_bytes) == (1, 1, 1, 10, 100)


def test_evicts_least_recently_used_until_within_bound():
    c = PrefixCache(30)
    c.put("a", b"1" * 10)
    c.put("b", b"2" * 10)
    c.put("c", b"3" * 10)
    c.get("a")  # a is now the most recent
    c.put("d", b"4" * 10)  # 40 > 30: evict b (least recent)
    assert c.keys() == ["c", "a", "d"]
    assert c.nbytes == 30 and c.evictions == 1
    c.put("e", b"5" * 25)  # needs 25 of 30: evicts c, a, d
    assert c.keys() == ["e"] and c.nbytes == 25 and c.evictions == 4


def test_replacing_a_key_updates_bytes():
    c = PrefixCache(100)
    c.put("a", b"1" * 40)
    c.put("a", b"2" * 10)
    assert len(c) == 1 and c.nbytes == 10 and c.get("a") == b"2" * 10


def test_oversized_snapshot_is_not_stored_and_zero_disables():
    c = PrefixCache(5)
    c.put("a", b"1" * 6)
    assert "a" not in c and c.nbytes == 0
    off = PrefixCache(0)
    off.put("a", b"1")
    assert len(off) == 0 and off.get("a") is None


def test_clear_keeps_counters_reset_stats_drops_them():
    c = PrefixCache(100)
    c.put("a", b"1")
    c.get("a")
    c.clear()
    assert len(c) == 0 and c.nbytes == 0 and c.hits == 1
    c.reset_stats()
    assert c.stats().as_dict() == {"hits": 0, "misses": 0, "evictions": 0, "entries": 0, "bytes": 0, "max_bytes": 100}


def test_negative_bound_is_refused():
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0"):
        PrefixCache(-1)
