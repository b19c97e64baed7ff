"""The config base: typed loading with errors naming the key, run-only fields, identities."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from segsort_unsup.config import StageConfig, run_only
from segsort_unsup.errors import InputError


@dataclass(frozen=True)
class _Demo(StageConfig):
    stage = "demo"
    alpha: float = 0.5
    flags: tuple[int, ...] = (1,)
    name: str = "x"
    limit: int | None = None
    workers: int = run_only(1)


def test_values_are_coerced_and_checked():
    cfg = _Demo.from_mapping({"alpha": 1, "flags": [2, 3], "limit": 4}, where="f.toml [demo]")
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float) and cfg.flags == (2, 3) and cfg.limit == 4
    with pytest.raises(InputError, match=r"f.toml \[demo\]: key 'alpha' expects float, got str 'a'"):
        _Demo.from_mapping({"alpha": "a"}, where="f.toml [demo]")
    with pytest.raises(InputError, match="key 'flags' expects list of int, got bool True"):
        _Demo(flags=True)
    with pytest.raises(InputError, match="key 'limit' expects int .or omitted."):
        _Demo(limit=1.5)
    with pytest.raises(InputError, match=r"unknown key\(s\) alpah \(did you mean 'alpha'\?\); known: alpha, flags, limit, name, workers"):
        _Demo.from_mapping({"alpah": 1})


def test_run_only_fields_stay_out_of_the_identity():
    a, b = _Demo(workers=1), _Demo(workers=8)
    assert a.identity_hash() == b.identity_hash() and "workers" not in a.identity()
    assert a.identity_hash() != a.replace(alpha=0.7).identity_hash()
    assert a.identity_hash(weights_sha256="a") != a.identity_hash(weights_sha256="b")
    assert a.identity()["stage"] == "demo"


def test_optional_settings_left_off_keep_old_identities():
    """A store made before an optional setting existed keeps resuming: None is left out."""
    assert "limit" not in _Demo().identity() and _Demo(limit=3).identity()["limit"] == 3
    from segsort_unsup.config import changed_keys

    assert changed_keys({"a": 1}, {"a": 1, "b": None}) == ["b"]


@dataclass(frozen=True)
class _Seeded(StageConfig):
    stage = "seeded"
    seed: int = 0
    threshold: float = 0.5


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_outside_what_numpy_and_torch_take_is_one_line(seed):
    with pytest.raises(InputError, match=rf"f.toml \[seeded\]: key 'seed': must be between 0 and {2**32 - 1}"):
        _Seeded.from_mapping({"seed": seed}, where="f.toml [seeded]")
    assert _Seeded(seed=2**32 - 1).seed == 2**32 - 1


def test_an_unknown_key_gets_a_suggestion():
    with pytest.raises(InputError, match=r"unknown key\(s\) threshhold \(did you mean 'threshold'\?\)"):
        _Seeded.from_mapping({"threshhold": 0.3})
    with pytest.raises(InputError) as info:
        _Seeded.from_mapping({"zzz": 0.3})
    assert "did you mean" not in str(info.value)
