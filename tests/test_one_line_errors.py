"""Mistakes that used to end in "unexpected ... please report it": each is now one line naming the fix."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from segsort_unsup.cli import main
from segsort_unsup.errors import InputError, StoreError
from tests.embed.test_transfer import _item, _store


def test_transfer_settings_blame_the_right_key():
    from segsort_unsup.transfer.stage import TransferConfig

    with pytest.raises(InputError, match="key 'batch': must be >= 1"):
        TransferConfig(batch=0)
    with pytest.raises(InputError, match="key 'nprobe': must be >= 1"):
        TransferConfig(nprobe=0)


def test_labelled_store_whose_label_and_prototype_keys_differ_is_one_line(tmp_path, monkeypatch):
    from segsort_unsup.transfer import stage as transfer
    from segsort_unsup.io.store import StoreReader

    seg = np.zeros((4, 4), np.int32)
    seg[:, 2:] = 1
    protos = np.eye(2, 4, dtype=np.float32)
    _store(tmp_path / "lab", [_item("a", protos, seg, [0, 1]), _item("b", protos, seg, [1, 0])])
    real_stack = StoreReader.stack

    def stack_losing_b_labels(self, name, keys=None):  # as if b's labels were written by another run
        stacked, failed = real_stack(self, name, keys)
        if name == "label":
            stacked.keys = stacked.keys[:1]
        return stacked, failed

    monkeypatch.setattr(StoreReader, "stack", stack_losing_b_labels)
    with StoreReader(tmp_path / "lab") as reader, \
            pytest.raises(StoreError, match=r"1 item\(s\) have prototypes but no labels \(e.g. 'b'\)"):
        transfer.labelled_table(reader)


def test_an_empty_model_file_is_one_line_for_embed(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    (tmp_path / "photos").mkdir()
    cv2.imwrite(str(tmp_path / "photos" / "a.png"), np.zeros((16, 16, 3), np.uint8))
    result = CliRunner().invoke(main, ["embed", str(model), str(tmp_path / "photos"), "-o", str(tmp_path / "p")])
    assert result.exit_code == 1 and "empty file (0 bytes" in result.output, result.output
    assert "unexpected" not in result.output
