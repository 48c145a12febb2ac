#!/usr/bin/env bash
# Installs dependencies, builds everything (CUDA too where nvcc exists) and runs all tests.
# Tests write their temporary files under build/test-tmp (ctest sets TMPDIR); any file left
# there afterwards fails the run, so nothing a test makes outlives it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
cd build
rm -rf test-tmp && mkdir test-tmp
ctest --output-on-failure -j"$(nproc)" --timeout 600
left=$(find test-tmp -mindepth 1 -maxdepth 1 | head -20)
if [ -n "$left" ]; then
  echo "test.sh: tests left files behind in build/test-tmp:" >&2
  echo "$left" >&2
  exit 1
fi
