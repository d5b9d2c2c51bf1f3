"""LocalStore.read_ranges: many small reads (archive headers) served by a pool of threads in batches, with the
results, errors and counters of reading them one after the other."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard import storage
from jreshard.errors import CheckpointClosedError, TruncatedDataError
from jreshard.storage import LocalStore

SIZES = {"a.bin": 5000, "b.bin": 3000, "c.bin": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    for name, n in SIZES.items():
        (root / name).write_bytes(os.urandom(n))
    return root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(SIZES)).flatmap(
    lambda k: st.tuples(st.just(k), st.integers(0, SIZES[k])).flatmap(
        lambda kp: st.tuples(st.just(kp[0]), st.just(kp[1]), st.integers(kp[1], SIZES[kp[0]])))),
    min_size=0, max_size=700), st.sampled_from([1, 7, 256]))
def test_ranges_read_in_batches_are_the_bytes_in_order(files, monkeypatch, requests, batch):
    monkeypatch.setattr(storage, "RANGES_BATCH", batch)
    store = LocalStore(str(files))
    before = (store.stats.bytes_read, store.stats.num_reads)
    got = store.read_ranges(requests)
    data = {k: (files / k).read_bytes() for k in SIZES}
    assert got == [data[k][a:b] for k, a, b in requests]
    assert (store.stats.bytes_read - before[0], store.stats.num_reads - before[1]) == \
        (sum(b - a for _, a, b in requests), len(requests))


@pytest.mark.parametrize("at", [0, 5, 399])
def test_a_range_past_the_end_raises_the_first_failure_in_order(files, monkeypatch, at):
    monkeypatch.setattr(storage, "RANGES_BATCH", 4)
    store = LocalStore(str(files))
    requests = [("a.bin", k, k + 10) for k in range(400)]
    requests[at] = ("b.bin", 2990, 3010)  # 10 bytes past the end of b.bin
    if at < 399:
        requests[399] = ("c.bin", 0, 50)  # a later failure, in another batch
    with pytest.raises(TruncatedDataError, match=r"b\.bin.*\[2990, 3010\)"):
        store.read_ranges(requests)
    assert store.read_ranges(requests[:at]) == [(files / "a.bin").read_bytes()[k : k + 10] for k in range(at)]


def test_a_closed_store_refuses_batched_reads(files, monkeypatch):
    monkeypatch.setattr(storage, "RANGES_BATCH", 2)
    store = LocalStore(str(files))
    store.close()
    with pytest.raises(CheckpointClosedError):
        store.read_ranges([("a.bin", 0, 1)] * 10)
