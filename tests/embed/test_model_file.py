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
