"""The caffemodel reader, on a NetParameter written by the test-side encoder."""

from __future__ import annotations

from segsort_unsup.contours.protobuf import read_caffemodel

from .hed_files import caffemodel_bytes


def test_read_caffemodel_shapes(tmp_path, keras_state):
    path = tmp_path / "m.caffemodel"
    path.write_bytes(caffemodel_bytes(keras_state, v1=True))
    layers = read_caffemodel(path)
    assert layers["conv3_2"][0].shape == (256, 256, 3, 3)
    assert layers["score-dsn5"][1].shape == (1, 1, 1, 1)  # legacy bias shape (1, 1, 1, C)
    assert "relu1_1" not in layers and layers["upsample_2"][0].shape == (1, 1, 4, 4)
