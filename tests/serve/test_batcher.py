"""Micro-batching: concurrent submissions share forward passes and each caller gets its own answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ham_hf.serve.batcher import Batcher


def test_concurrent_submissions_share_batches_and_keep_their_order():
    sizes = []

    def double(items):
        sizes.append(len(items))
        time.sleep(0.02)  # a forward pass: while it runs, the next callers queue up
        return [2 * x for x in items]

    batcher = Batcher(double, max_batch=8, max_wait_s=0.01)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(batcher, range(64)))
    assert results == [2 * x for x in range(64)]
    assert max(sizes) <= 8 and sum(sizes) == 64
    assert batcher.batches == len(sizes) < 64 / 2  # most calls shared a pass


def test_a_failed_batch_tells_each_of_its_callers_and_the_batcher_goes_on():
    def picky(items):
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        return items

    batcher = Batcher(picky, max_batch=4, max_wait_s=0.05)
    barrier = threading.Barrier(2)

    def submit(x):
        barrier.wait()
        return batcher.submit(x)

    with ThreadPoolExecutor(2) as pool:
        futures = list(pool.map(submit, (-1, 1)))
    for future in futures:
        with pytest.raises(ValueError, match="negative input"):
            future.result(timeout=5)
    assert batcher(3) == 3


def test_a_lone_call_waits_at_most_the_gathering_window():
    batcher = Batcher(lambda items: items, max_batch=16, max_wait_s=0.05)
    start = time.perf_counter()
    assert batcher("x") == "x"
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda items: items, max_batch=0)
