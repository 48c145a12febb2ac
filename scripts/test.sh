#!/usr/bin/env bash
# Installs dependencies, builds everything (CUDA too where nvcc exists) and runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 600
