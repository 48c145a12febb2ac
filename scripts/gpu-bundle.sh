#!/usr/bin/env bash
# Prepares, on this machine, everything the GPU machine needs to run scripts/gpu-check.sh:
# binaries built here for sm_90 (H100 and H200) into gpu-bundle/ (git-ignored; the device
# command carries it), because that machine has no -dev packages and no package registry.
#   gpu-bundle/bin/   tl_gpu_tests, torchless-train, bench_qlora_step: -march=x86-64-v3, the
#                     C++ runtime, yaml-cpp and cudart linked in, fmt header-only, no oneDNN,
#                     OpenBLAS, cairo or MPI (TL_BUNDLE, CMakeLists.txt): the CPU reference's
#                     products run plain loops (64 GFLOP/s on 2 cores here against OpenBLAS'
#                     250; a static OpenBLAS would make each binary 30 MB)
#   gpu-bundle/lib/   the shared libraries they need beyond glibc and CUDA's own (libgomp)
#   gpu-bundle/MANIFEST  commit, date, sizes, the newest glibc symbol version they need
# Ends by printing the bundle's size and the checkout's plus the bundle's (the device
# machine takes at most 64 MiB). Needs nvcc (CUDA 12 or 13).
#   bash scripts/gpu-bundle.sh [--omit LIB]   (--omit: leave a library out, to prove the check)
set -euo pipefail
cd "$(dirname "$0")/.."
omit=""
case "${1:-}" in
  --omit) omit=${2:?--omit needs a library name} ;;
  -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "gpu-bundle: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
command -v nvcc >/dev/null || { echo "gpu-bundle: nvcc not found (the bundle is the CUDA build)" >&2; exit 1; }
bash scripts/install-deps.sh

t0=$SECONDS
launcher=()
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$(cd .. && pwd)}"
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B build-bundle -G Ninja -DCMAKE_BUILD_TYPE=Release -DTL_BUNDLE=ON -DTL_CPU_ARCH=x86-64-v3 \
  -DTL_WITH_ONEDNN=OFF -DTL_WITH_OPENBLAS=OFF -DTL_WITH_CAIRO=OFF -DTL_WITH_MPI=OFF -DCMAKE_CUDA_ARCHITECTURES=90 "${launcher[@]}" |
  grep 'torchless:'
cmake --build build-bundle -j"$(nproc)" --target tl_gpu_tests torchless-train bench_qlora_step
t_build=$((SECONDS - t0))

rm -rf gpu-bundle.partial
mkdir -p gpu-bundle.partial/bin gpu-bundle.partial/lib
cp build-bundle/tl_gpu_tests build-bundle/torchless-train build-bundle/bench/bench_qlora_step gpu-bundle.partial/bin/
strip gpu-bundle.partial/bin/*

# What the image has: glibc and the dynamic loader; GCC's runtime (it has g++: libstdc++,
# libgcc_s, libgomp; carrying Debian's libstdc++ would shadow the newer one that the image's
# cuBLAS may need); CUDA's libraries (the toolkit or Python's nvidia-* packages;
# scripts/gpu-check.sh finds them). Everything else travels.
image_has='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libgomp|libcuda|libcublas|libcublasLt|libnccl|libcudart)\.so'
for b in gpu-bundle.partial/bin/*; do
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ "$name" =~ $image_has ]]; then continue; fi
  if [ -n "$omit" ] && [[ "$name" == "$omit"* ]]; then
    echo "gpu-bundle: leaving $name out (--omit)"
    continue
  fi
  cp -L "$path" "gpu-bundle.partial/lib/$name"
done

symbol_versions() {  # the newest $1_x.y that the bundle's files need
  find gpu-bundle.partial -type f \( -path '*/bin/*' -o -path '*/lib/*' \) -exec objdump -T {} + 2>/dev/null |
    { grep -o "$1_[0-9.]*" || true; } | sort -Vu | tail -1
}
glibc=$(symbol_versions GLIBC)
glibcxx=$(symbol_versions GLIBCXX)
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), $(nvcc --version | tail -1)"
  echo "architecture sm_90, CPU code -march=x86-64-v3"
  echo "needs glibc ${glibc#GLIBC_} or newer (Ubuntu 24.04 has 2.39); libstdc++: ${glibcxx:-nothing (linked in)}"
  echo "carried libraries: $(cd gpu-bundle.partial/lib && ls | tr '\n' ' ')"
  (cd gpu-bundle.partial && find bin lib -type f -printf '%s %p\n' | sort -k2)
} >gpu-bundle.partial/MANIFEST
rm -rf gpu-bundle
mv gpu-bundle.partial gpu-bundle

bundle_mib=$(du -sb gpu-bundle | awk '{printf "%.1f", $1 / 1048576}')
tree_mib=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 |
  awk '{printf "%.1f", $1 / 1048576}')
total=$(awk -v a="$bundle_mib" -v b="$tree_mib" 'BEGIN {printf "%.1f", a + b}')
echo "gpu-bundle: built in ${t_build} s; gpu-bundle/ ${bundle_mib} MiB, the checkout ${tree_mib} MiB, together ${total} MiB of the 64 MiB the device machine takes"
awk -v t="$total" 'BEGIN {exit !(t < 64)}' || { echo "gpu-bundle: too large for the device machine" >&2; exit 1; }
