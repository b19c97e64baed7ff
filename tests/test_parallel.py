import os

from segsort_unsup.parallel import map_items


def _square_or_die(x: int) -> int:
    if x == 3:
        os._exit(1)  # a hard crash, as a segfault or an OOM kill would be
    if x == 5:
        raise ValueError("bad item 5")
    return x * x


def test_in_process_failures_are_per_item():
    out = {o.item: o for o in map_items(_square_or_die, [1, 2, 5], workers=1)}
    assert out[1].result == 1 and out[2].result == 4
    assert isinstance(out[5].error, ValueError)


def test_dead_worker_fails_only_its_item():
    out = {o.item: o for o in map_items(_square_or_die, range(10), workers=2)}
    assert sorted(out) == list(range(10))
    assert "worker process died" in str(out[3].error)
    assert isinstance(out[5].error, ValueError)
    assert all(out[i].result == i * i for i in range(10) if i not in (3, 5))
