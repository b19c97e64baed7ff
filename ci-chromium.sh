#!/bin/sh
# Headless Chromium for tests/discover/test_stage.py::test_gallery_in_headless_chromium (Debian package).
set -e
apt-get update && apt-get install -y chromium
