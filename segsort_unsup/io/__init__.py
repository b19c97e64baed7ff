"""Input/output: image listing and reading, HDF5 stores."""
