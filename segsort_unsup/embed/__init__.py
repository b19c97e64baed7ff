"""SegSort embedding (Hwang et al., ICCV 2019): backbones, the pixel-embedding network, the
SegSort losses and pixel sorting (spherical k-means on embedding + location)."""
