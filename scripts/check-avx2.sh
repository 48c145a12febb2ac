#!/usr/bin/env bash
# Proves the CPU paths of an AVX2 machine (x86-64-v3, no AVX-512) on whatever machine runs it,
# so that a change that only works with AVX-512 fails CI even on an AVX-512 machine:
#   1. builds the CPU backend for -march=x86-64-v3 into build-avx2/ (an AVX-512 intrinsic
#      outside a function dispatched at run time does not compile there);
#   2. runs the tests (ctest, all but the two long strict-device heals) with oneDNN, OpenBLAS
#      and our own dispatch (core/cpu/cpu_features.h) capped at AVX2: ONEDNN_MAX_CPU_ISA=AVX2,
#      OPENBLAS_CORETYPE=Haswell. The oneDNN bf16-kernel tests skip, saying why;
#   3. runs the tests of the ISA-dependent paths (products, NF4, attention, the golden
#      models, identity expansion, training steps) under `qemu-x86_64 -cpu Haswell`, a CPU
#      without AVX-512: any AVX-512 instruction executed there, ours or a library's, is an
#      illegal instruction and fails the run.
# Installs what it needs (scripts/install-deps.sh, qemu-user). Ends with one line.
#   bash scripts/check-avx2.sh [--no-qemu]
set -euo pipefail
cd "$(dirname "$0")/.."
qemu=1
case "${1:-}" in
  --no-qemu) qemu=0 ;;
  -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "check-avx2: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
[ "$(uname -m)" = x86_64 ] || { echo "check-avx2: an x86-64 check; this is $(uname -m)"; exit 0; }

bash scripts/install-deps.sh
if ((qemu)) && ! command -v qemu-x86_64 >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "check-avx2: installing qemu-user"
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends qemu-user >/dev/null
fi

t0=$SECONDS
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build-avx2 -G Ninja -DCMAKE_BUILD_TYPE=Release -DTL_CPU_ARCH=x86-64-v3 -DTL_CUDA=OFF "${launcher[@]}" >/dev/null
cmake --build build-avx2 -j"$(nproc)"
t_build=$((SECONDS - t0))

cd build-avx2
rm -rf test-tmp && mkdir test-tmp
export ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell
t1=$SECONDS
ctest --output-on-failure -j"$(nproc)" --timeout 600 -E '^StrictDevice\.(WholeDemoHealMatchesTheCpu|DemoHealFirstStepsMatchTheCpu)$'
t_ctest=$((SECONDS - t1))

t_qemu=0
if ((qemu)); then
  t2=$SECONDS
  # The slow suites (the same kernels over many more steps) run natively above. OMP_WAIT_POLICY
  # is set so that the binary does not re-execute itself (thread_policy.h): a re-executed
  # /proc/self/exe would leave the emulator. The emulator's notes on host-only CPU features
  # it does not model are dropped.
  filter='-StrictDevice.*:Variants/Lora.*:Variants/ModelGrad.*:Trainer.*:Variants/CacheVsFull.*:Ddp.*'
  set +e
  TMPDIR=$PWD/test-tmp OMP_WAIT_POLICY=PASSIVE qemu-x86_64 -cpu Haswell ./tl_tests --gtest_filter="$filter" \
    --gtest_brief=1 2> >(grep -v "TCG doesn't support requested feature" >&2)
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    echo "check-avx2: FAILED under qemu-x86_64 -cpu Haswell (exit $rc; 132 is an illegal instruction: a path that needs AVX-512 ran without it)" >&2
    exit 1
  fi
  t_qemu=$((SECONDS - t2))
fi
left=$(find test-tmp -mindepth 1 -maxdepth 1 | head -5)
[ -z "$left" ] || { echo "check-avx2: tests left files behind in build-avx2/test-tmp: $left" >&2; exit 1; }
echo "check-avx2: passed: x86-64-v3 build ${t_build} s, tests capped at AVX2 ${t_ctest} s, $( ((qemu)) && echo "ISA-dependent tests on an emulated Haswell ${t_qemu} s" || echo "emulator skipped")"
