"""model.pt: saved atomically, rebuilt exactly, never unpickled, clear errors for bad files."""

import pickle

import pytest
import torch

from segsort_unsup.embed.model import build_model, load_model, save_model
from segsort_unsup.errors import WeightsError


def test_roundtrip_and_bad_files(tmp_path):
    model = build_model({"backbone": "scratch", "feature_layer": "conv4_3", "embedding_dim": 8})
    sha = save_model(tmp_path / "model.pt", model, provenance={"identity_hash": "abc"})
    again, provenance = load_model(tmp_path / "model.pt")
    assert len(sha) == 64 and provenance["identity_hash"] == "abc"
    assert save_model(tmp_path / "again.pt", model, provenance={"identity_hash": "abc"}) == sha  # same bytes
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / "cut.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:2000])
    with pytest.raises(WeightsError, match="cut.pt: not a readable"):
        load_model(tmp_path / "cut.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": Evil()}))
    with pytest.raises(WeightsError, match="evil.pt"):
        load_model(tmp_path / "evil.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(WeightsError, match="not a segsort-unsup model"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "missing.pt")


def _payload(model, **changes) -> dict:
    from segsort_unsup.embed.model import MODEL_FORMAT, MODEL_VERSION

    return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "model_config": model.model_config(),
            "state_dict": model.state_dict(), "provenance": {}, **changes}


def _peak_rss_growth_mb(code: str) -> float:
    """Peak resident memory (MB) a fresh interpreter adds while running ``code`` after importing torch."""
    import os
    import subprocess
    import sys

    # VmHWM is this process's own peak; ru_maxrss would carry the forking test runner's peak across exec
    peak = "next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))"
    script = ("import torch, segsort_unsup.embed.model as m\n"
              f"base = {peak}\n"
              f"{code}\n"
              f"print(({peak} - base) / 1024)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ),
                         check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def test_declared_sizes_are_checked_before_allocating(tmp_path):
    """A small file declaring ``hidden = 2**20`` is refused in one line without building the network."""
    model = build_model({"backbone": "scratch", "feature_layer": "conv4_3", "head": "conv1", "hidden": 8,
                         "embedding_dim": 4})
    bomb = _payload(model, model_config={**model.model_config(), "hidden": 2 ** 20})
    bomb["state_dict"] = {k: v for k, v in bomb["state_dict"].items() if k.startswith("head.")}
    torch.save(bomb, tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 40_000
    with pytest.raises(WeightsError, match="hidden = 1048576 is above the limit"):
        load_model(tmp_path / "bomb.pt")
    # below the limit, the declared size is checked against the tensors in the file, on the meta device
    bomb["model_config"].update(hidden=16000, head="conv3")
    torch.save(bomb, tmp_path / "bomb2.pt")
    with pytest.raises(WeightsError, match=r"lacks 'backbone.block1.convs.0.weight'|declares head.hidden.weight"):
        load_model(tmp_path / "bomb2.pt")
    growth = _peak_rss_growth_mb(
        f"try:\n    m.load_model({str(tmp_path / 'bomb2.pt')!r})\nexcept Exception as e:\n    print(e)")
    assert growth < 200, growth  # building the 3x3 512 -> 16000 head alone would take 295 MB


def test_shape_misfit_names_the_tensor(tmp_path):
    model = build_model({"backbone": "scratch", "feature_layer": "conv4_3", "head": "conv1", "hidden": 8,
                         "embedding_dim": 4})
    torch.save(_payload(model, model_config={**model.model_config(), "embedding_dim": 6}), tmp_path / "m.pt")
    with pytest.raises(WeightsError, match=r"declares head.out.weight of shape \(6, 8, 1, 1\), the file holds "
                                           r"\(4, 8, 1, 1\)"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("change, message", [
    ({"model_config": [1, 2]}, "model_config is list, expected a table of settings"),
    ({"state_dict": "weights"}, "state_dict is str, expected a table of tensors"),
    ({"model_config": {"backbone": 5}}, "unknown backbone 5"),
    ({"state_dict": {"head.out.weight": [1.0]}}, "'head.out.weight' is a list, not a tensor"),
    ({"provenance": [1]}, "provenance is list"),
])
def test_wrong_types_are_one_line(tmp_path, change, message):
    model = build_model({"backbone": "scratch", "feature_layer": "conv4_3", "head": "conv1", "hidden": 8,
                         "embedding_dim": 4})
    torch.save(_payload(model, **change), tmp_path / "m.pt")
    with pytest.raises(WeightsError, match=message) as err:
        load_model(tmp_path / "m.pt")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "m.pt"))


def test_empty_model_file_is_one_line(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"model.pt: empty file \(0 bytes"):
        load_model(tmp_path / "model.pt")


def test_loading_a_model_does_not_import_the_compiler(tmp_path):
    """Checking a file against its config builds the net on the meta device; drawing weights there
    would import torch._dynamo, a second of start-up in every process that loads a model."""
    import subprocess
    import sys

    model = build_model({"backbone": "scratch", "feature_layer": "conv4_3", "head": "conv3"})
    save_model(tmp_path / "model.pt", model)
    code = ("import sys; from segsort_unsup.embed.model import load_model; "
            f"load_model({str(tmp_path / 'model.pt')!r}); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
