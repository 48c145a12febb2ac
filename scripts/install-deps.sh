#!/usr/bin/env bash
# Installs every build and test dependency of torchless by Debian package name.
# Safe to run repeatedly; skips apt entirely when everything is already present.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  nlohmann-json3-dev libyaml-cpp-dev libfmt-dev libcli11-dev
  libopenblas-openmp-dev
  libdnnl-dev ocl-icd-opencl-dev  # oneDNN's CMake config needs OpenCL (a Recommends of libdnnl-dev)
  libgtest-dev libgmock-dev libbenchmark-dev
  openmpi-bin libopenmpi-dev  # data parallelism under mpirun (NCCL comes with the CUDA toolkit)
  libcairo2-dev  # the heal report's PNG plots (torchless-eval --report)
  clang libclang-rt-14-dev
  python3  # the CLI tests read JSON output with it (no PyPI packages)
)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all packages present"
fi
