#!/usr/bin/env bash
# Builds the safetensors fuzzer (clang, libFuzzer + AddressSanitizer + UBSan) and runs it.
#   fuzz/run_fuzz.sh [SECONDS=600] [extra libFuzzer flags...]
# Runs single-process on a scratch copy of fuzz/corpus (fuzz/corpus-run/, git-ignored), so
# the checked-in seeds stay small. Crash inputs land in build-fuzz/artifacts/.
# Environment: TL_FUZZ_BUILD (build dir, default build-fuzz), JOBS (build jobs, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
build=${TL_FUZZ_BUILD:-build-fuzz}
fuzzer="$build/fuzz_safetensors"

# The code under test must carry libFuzzer's coverage and ASan instrumentation too, not just
# the fuzzer's own file, or libFuzzer fuzzes blind and ASan misses the parser's reads.
# fuzzer-no-link instruments without pulling in libFuzzer's main().
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
if ! { cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DTL_FUZZ=ON -DTL_CUDA=OFF \
         -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$san -fno-omit-frame-pointer" \
         >/dev/null &&
       cmake --build "$build" --target fuzz_safetensors -j"${JOBS:-2}"; }; then
  # When fuzz_safetensors links all of tl_core, any core file clang cannot compile breaks
  # it; the fuzzer itself needs only these sources.
  echo "run_fuzz.sh: CMake build failed; compiling the fuzzer from its sources directly" >&2
  mkdir -p "$build"
  fuzzer="$build/fuzz_safetensors_direct"
  clang++ -std=c++20 -O2 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -I. fuzz/fuzz_safetensors.cpp core/safetensors.cpp \
    core/dtype.cpp core/tensor.cpp -lfmt -o "$fuzzer"
fi

work=fuzz/corpus-run
rm -rf "$work"
mkdir -p "$work" "$build/artifacts"
cp fuzz/corpus/* "$work"/
exec "$fuzzer" -max_len=4096 -max_total_time="$secs" -print_final_stats=1 \
  -dict=fuzz/safetensors.dict -artifact_prefix="$build/artifacts/" "$@" "$work"
