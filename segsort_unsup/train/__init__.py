"""Training the SegSort embedding: the ``features`` stage (frozen-trunk maps), the training data
(crops, segments on the feature grid) and the ``train`` stage (the loop, checkpoints, model.pt)."""
