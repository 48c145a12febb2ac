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

# CMake's TL_FUZZ target adds -fsanitize=fuzzer,address to the fuzzer's own file only; the
# parser lives in tl_core, which needs coverage and ASan instrumentation too, or libFuzzer
# fuzzes blind and ASan misses the parser's own reads. fuzzer-no-link instruments without
# pulling in libFuzzer's main().
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DTL_FUZZ=ON -DTL_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$san -fno-omit-frame-pointer" >/dev/null
cmake --build "$build" --target fuzz_safetensors -j"${JOBS:-2}"

work=fuzz/corpus-run
rm -rf "$work"
mkdir -p "$work" "$build/artifacts"
cp fuzz/corpus/* "$work"/
exec "$build/fuzz_safetensors" -max_len=4096 -max_total_time="$secs" -print_final_stats=1 \
  -artifact_prefix="$build/artifacts/" "$@" "$work"
