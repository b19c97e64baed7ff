"""The contours stage: edge-probability maps from pretrained edge detectors (HED, PiDiNet)."""
