"""First-neighbour search (segsort_unsup.discover.neighbours) against brute-force numpy and faiss.

The brute force is dense float64 (self excluded, lowest index on ties); faiss works in float32,
so the data here keep the best and second-best candidates far apart except where ties are
exact (duplicated rows).
"""

from __future__ import annotations

import numpy as np
import pytest

from segsort_unsup.discover import neighbours
from segsort_unsup.discover.neighbours import ANN_DEFAULTS, Workers, first_neighbours, search_space

from .test_finch import brute_first_neighbours, mixture


def brute_euclidean(x: np.ndarray) -> np.ndarray:
    """Euclidean first neighbour of every row, float64, self excluded, lowest index on ties."""
    x = x.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(d, np.inf)
    return d.argmin(axis=1)


def search(x: np.ndarray, cosine: bool, threads: int = 2, **kw) -> tuple[np.ndarray, np.ndarray]:
    options = {"exact": True, "ann": "ivf", "params": dict(ANN_DEFAULTS["ivf"]), "seed": 0, "block": 97} | kw
    with Workers(threads) as workers:
        return first_neighbours(search_space(x, cosine), cosine, workers=workers, **options)


def with_duplicates(n: int, d: int, seed: int) -> np.ndarray:
    """Random rows, a third of them repeated later: ties that must go to the lowest index."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return np.concatenate([x, x[rng.choice(n, n // 3, replace=False)]])


def test_search_space_normalises_and_keeps_zero_rows():
    x = np.random.default_rng(0).normal(size=(20, 5))
    x[3] = 0
    unit = search_space(x, True)
    assert unit.dtype == np.float32 and unit.flags.c_contiguous
    norms = np.linalg.norm(unit.astype(np.float64), axis=1)
    assert np.allclose(np.delete(norms, 3), 1, atol=1e-6) and norms[3] == 0
    assert np.array_equal(search_space(x, False), x.astype(np.float32))


@pytest.mark.parametrize("cosine", [True, False])
def test_exact_search_is_brute_force(cosine):
    """Every first neighbour and distance, with duplicated rows resolved to the lowest index."""
    x = with_duplicates(600, 7, seed=1)
    nn, dist = search(x, cosine)
    expected = brute_first_neighbours(x) if cosine else brute_euclidean(x)
    assert np.array_equal(nn, expected)
    x64 = x.astype(np.float64)
    if cosine:
        unit = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        truth = 1 - (unit * unit[expected]).sum(axis=1)
    else:
        truth = np.linalg.norm(x64 - x64[expected], axis=1)
    assert np.allclose(dist, truth, atol=1e-5)


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_search_on_clustered_data(ann):
    """On clustered data nearly every approximate first neighbour is the exact one, and the
    distances reported are exact for the neighbour found."""
    x = search_space(mixture(3000, 16, 20, 0.5, seed=2)[0], True)
    nn, dist = search(x, True, exact=False, ann=ann, params=dict(ANN_DEFAULTS[ann]))
    brute = brute_first_neighbours(x)
    assert np.mean(nn == brute) > 0.97 and np.all(nn != np.arange(x.shape[0]))
    x64 = x.astype(np.float64)
    assert np.allclose(dist, 1 - (x64 * x64[nn]).sum(axis=1), atol=1e-5)


@pytest.mark.parametrize("ann", ["exact", "ivf", "hnsw"])
def test_thread_count_and_block_do_not_change_the_answer(ann):
    x = search_space(mixture(2000, 12, 15, 0.8, seed=3)[0], True)
    kw = {"exact": ann == "exact", "ann": "hnsw" if ann == "hnsw" else "ivf",
          "params": dict(ANN_DEFAULTS["hnsw" if ann == "hnsw" else "ivf"])}
    one = search(x, True, threads=1, **kw)
    three = search(x, True, threads=3, **kw | {"block": 33})
    assert np.array_equal(one[0], three[0]) and np.array_equal(one[1], three[1])


def test_single_row_is_its_own_neighbour_at_infinity():
    nn, dist = search(np.ones((1, 3), np.float32), True)
    assert nn.tolist() == [0] and dist.tolist() == [np.inf]


def test_workers_keep_submission_order():
    with Workers(3) as workers:
        assert list(workers.map(lambda i: i * i, range(50))) == [i * i for i in range(50)]


@pytest.mark.parametrize(("n", "block"), [(1, 10), (255, 4096), (10_000, 4096), (10_000, 100), (3, 1)])
def test_blocks_cover_every_row_once(n, block):
    spans = neighbours._blocks(n, block)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 < e - s <= block for s, e in spans)


@pytest.mark.parametrize(("cosine", "sigma"), [(True, 0.8), (True, 3.0), (False, 0.8)])
def test_ivf_candidates_are_faiss_ivfflat(monkeypatch, cosine, sigma):
    """The cell-by-cell scan (with its pruning bounds) finds what faiss IndexIVFFlat finds with the
    same cells and nprobe, on clustered (sigma 0.8) and barely clustered (sigma 3) data; a point
    whose probed cells hold nothing but itself gets the exact answer."""
    import faiss

    trained = []
    real_kmeans = faiss.Kmeans

    class SpyKmeans(real_kmeans):
        def train(self, *args, **kwargs):
            out = super().train(*args, **kwargs)
            trained.append(self.centroids.copy())
            return out

    monkeypatch.setattr(faiss, "Kmeans", SpyKmeans)
    x = mixture(4000, 16, 30, sigma, seed=5)[0]
    x = search_space(x if cosine else x * np.linspace(0.5, 2, x.shape[0])[:, None], cosine)
    params = {"nlist": 50, "nprobe": 4, "train_size": None, "niter": 10}
    with Workers(2) as workers:
        nn, _ = first_neighbours(x, cosine, exact=False, ann="ivf", params=params, seed=0, block=512, workers=workers)
    centroids = trained[0] / np.linalg.norm(trained[0], axis=1, keepdims=True) if cosine else trained[0]
    quantizer = faiss.IndexFlatIP(x.shape[1]) if cosine else faiss.IndexFlatL2(x.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    metric = faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2
    ivf = faiss.IndexIVFFlat(quantizer, x.shape[1], 50, metric)
    ivf.add(x)
    ivf.nprobe = 4
    _, ids = ivf.search(x, 2)
    rows = np.arange(x.shape[0])
    valid = (ids >= 0) & (ids != rows[:, None])
    expected = np.where(valid[:, 0], ids[:, 0], ids[:, 1])
    missing = ~valid.any(axis=1)  # ours falls back to an exact search for those
    assert np.array_equal(nn[~missing], expected[~missing])
    if cosine:
        brute = brute_first_neighbours(x)
        assert np.mean(expected == brute) < 1.0  # nprobe=4 of 50 cells does miss some neighbours
        assert np.array_equal(nn[missing], brute[missing])

