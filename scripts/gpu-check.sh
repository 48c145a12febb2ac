#!/usr/bin/env bash
# The GPU check: runs on the GPU machine from the prebuilt bundle (scripts/gpu-bundle.sh, in
# gpu-bundle/, carried with the checkout) and brings every diagnosis back in one go. The
# device command and the arithmetic of its minutes: bench/gpu/README.md.
#   1. prelude: the machine (OS, glibc, g++, CMake, nvcc, driver, Python's CUDA packages);
#      where cuBLAS, NCCL and cuDNN come from (the toolkit or Python's nvidia-* packages);
#      every library of the bundle resolves (ldd); the binaries start.
#   2. smoke: a 2-layer QLoRA step of the 31B shapes, synchronised after every op so that a
#      fault is blamed on the op that caused it (bench_qlora_step --blame);
#   3. ctest-gpu: every GPU test as its own process, 8 at a time, CUDA_LAUNCH_BLOCKING=1, 90 s
#      each, so every failing op is reported, not only the first (JUnit XML);
#   4. bench-31b: the 31B QLoRA step at sequence 2048 on the trainer's BF16 path: tokens/s,
#      measured peak beside the plan's, time by op family (60 layers; fewer only when the
#      device runs out of memory);
#   5. memcheck: compute-sanitizer over the GPU op tests and a 2-step heal of the demo model
#      with evaluation and generation off.
# Each section runs under `timeout`; their limits add up to 370 s (6.2 minutes).
# Without a GPU it stops after the prelude with its "no GPU" line (CI proves the bundle so).
# Writes to OUT_DIR ($OUT on the device machine, else build-gpu-check/): results.txt,
# junit.xml, bench-31b.json, logs.tar.gz.
#   bash scripts/gpu-check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
case "${1:-}" in -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
out=${1:-${OUT:-$root/build-gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
logs=$work/logs
mkdir -p "$logs"
results=$out/results.txt
: >"$results"
bundle=$root/gpu-bundle
status=0
t_start=$SECONDS

say() { echo "$*" | tee -a "$results"; }
finish() {  # the logs as one tarball, the last line, the exit status
  tar -C "$work" -czf "$out/logs.tar.gz" logs 2>/dev/null
  say "$1"
  rm -rf "$work"
  exit "$2"
}
# section NAME LIMIT_S COMMAND...: runs it under timeout; records PASS/FAIL/TIMEOUT, seconds
# and the tail of its log in the results file.
section() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS log=$logs/$name.log
  if [ "$(type -t "$1")" = function ]; then  # timeout runs programs: a function runs in bash -c
    timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$log" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
  fi
  local rc=$?
  local verdict=PASS
  if [ $rc = 124 ] || [ $rc = 137 ]; then verdict="TIMEOUT (limit $limit s)"; elif [ $rc != 0 ]; then verdict="FAIL (exit $rc)"; fi
  say "== $name: $verdict in $((SECONDS - t0)) s"
  tail -n 25 "$log" | sed 's/^/   /' >>"$results"
  [ $rc = 0 ] || status=1
  return $rc
}

# --- 1. prelude ------------------------------------------------------------------------
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH
[ -d /usr/local/cuda/compute-sanitizer ] && export PATH=$PATH:/usr/local/cuda/compute-sanitizer
first() { "$@" 2>&1 | head -1; }
say "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ); bundle: $(head -1 "$bundle/MANIFEST" 2>/dev/null || echo 'MISSING (run scripts/gpu-bundle.sh and carry gpu-bundle)')"
[ -d "$bundle/bin" ] || finish "gpu-check: no gpu-bundle/ in the checkout; nothing checked" 1
say "os: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"); kernel $(uname -r); $(nproc) cores"
say "glibc: $(first ldd --version); bundle needs: $(sed -n 4p "$bundle/MANIFEST")"
say "g++: $(first g++ --version)"
say "cmake: $(first cmake --version); ctest: $(first ctest --version)"
say "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo 'not found')"
say "gpu: $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -1 || echo 'no nvidia-smi')"
say "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | grep -i version | head -1 || echo 'not found')"
say "python: $(python3 - 2>&1 <<'PY'
import importlib.metadata as md
names = sorted(d.metadata["Name"] for d in md.distributions()
               if d.metadata["Name"] and (d.metadata["Name"].lower().startswith("nvidia-") or d.metadata["Name"].lower() == "torch"))
print(", ".join(f"{n} {md.version(n)}" for n in names) or "no torch or nvidia-* packages")
PY
)"

# CUDA's libraries: the toolkit's first, then Python's nvidia-* packages (torch's wheels).
py_lib_dirs=$(python3 - 2>/dev/null <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)):
        print(d)
PY
)
lib_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib)
while read -r d; do [ -n "$d" ] && lib_dirs+=("$d"); done <<<"$py_lib_dirs"
ld_path=$bundle/lib
locate() {  # locate LIBFILE WHAT: the first directory that has it, added to the search path
  local d
  for d in "${lib_dirs[@]}"; do
    if [ -e "$d/$1" ]; then
      case "$d" in /usr/local/cuda*) say "$2: $d/$1 (the CUDA toolkit)" ;; *) say "$2: $d/$1 (Python's nvidia-* packages)" ;; esac
      case ":$ld_path:" in *":$d:"*) ;; *) ld_path=$ld_path:$d ;; esac
      return 0
    fi
  done
  say "$2: $1 not found in ${lib_dirs[*]}"
  return 1
}
locate libcublas.so.13 cuBLAS || locate libcublas.so.12 cuBLAS
locate libcublasLt.so.13 cuBLASLt || locate libcublasLt.so.12 cuBLASLt
locate libnccl.so.2 NCCL
locate libcudnn.so.9 "cuDNN (not linked by this build)" || true
export LD_LIBRARY_PATH=$ld_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

missing=$(for b in "$bundle"/bin/*; do ldd "$b" 2>&1 | grep -E 'not found|not a dynamic' | sed "s|^|$(basename "$b"): |"; done)
if [ -n "$missing" ]; then
  say "== libraries: FAIL: the bundle's binaries do not resolve here:"
  say "$missing"
  finish "gpu-check: FAILED: libraries missing; nothing could start" 1
fi
say "== libraries: PASS (ldd resolves every library of $(ls "$bundle/bin" | tr '\n' ' '))"
section start 30 bash -c '"$0"/tl_gpu_tests --gtest_list_tests >/dev/null && "$0"/torchless-train --help >/dev/null &&
  "$0"/bench_qlora_step --help >/dev/null' "$bundle/bin" ||
  finish "gpu-check: FAILED: the binaries do not start" 1

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  finish "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed): the bundle's libraries resolve and its binaries start; nothing else checked" 0
fi

# --- 2. smoke --------------------------------------------------------------------------
cfg31=$root/configs/models/gemma-4-31B-it/config.json
section smoke 45 "$bundle/bin/bench_qlora_step" --config "$cfg31" --layers 2 --seq 512 --steps 1 --backend cuda --blame

# --- 3. ctest-gpu (and the memcheck tests of section 5, registered beside them) ---------
mkdir -p "$work/ctest" "$work/tmp"
{
  suite=""
  "$bundle/bin/tl_gpu_tests" --gtest_list_tests | while IFS= read -r line; do
    case "$line" in
      "Running main"*|"") ;;
      " "*) name=$suite$(echo "$line" | sed 's/^ *//; s/ *#.*//')
        echo "add_test(gpu:$name \"$bundle/bin/tl_gpu_tests\" --gtest_filter=$name)"
        echo "set_tests_properties(gpu:$name PROPERTIES LABELS gpu TIMEOUT 90 ENVIRONMENT \"CUDA_LAUNCH_BLOCKING=1;TL_SOURCE_DIR=$root;TMPDIR=$work/tmp\")"
        case "$name" in CudaOps.*|CudaOpsBf16.*)
          echo "add_test(memcheck:$name compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \"$bundle/bin/tl_gpu_tests\" --gtest_filter=$name)"
          echo "set_tests_properties(memcheck:$name PROPERTIES LABELS memcheck TIMEOUT 40 ENVIRONMENT \"TL_SOURCE_DIR=$root;TMPDIR=$work/tmp\")" ;;
        esac ;;
      *) suite=$line ;;
    esac
  done
} >"$work/ctest/CTestTestfile.cmake"
say "ctest: $(grep -c '^add_test(gpu:' "$work/ctest/CTestTestfile.cmake") GPU tests, $(grep -c '^add_test(memcheck:' "$work/ctest/CTestTestfile.cmake") under memcheck"
run_ctest() {  # run_ctest LABEL JUNIT
  (cd "$work/ctest" && ctest -L "$1" -j 8 --timeout 90 --output-on-failure --output-junit "$2")
}
export -f run_ctest
export work
section ctest-gpu 100 run_ctest gpu "$out/junit.xml"

# --- 4. the 31B step ---------------------------------------------------------------------
bench_31b() {
  local layers rc
  for layers in 60 48 32 16; do
    echo "bench_qlora_step: 31B, $layers layers, sequence 2048"
    "$bundle/bin/bench_qlora_step" --config "$cfg31" --layers "$layers" --seq 2048 --steps 3 --backend cuda >"$work/bench.json"
    rc=$?
    [ $rc = 3 ] && { echo "out of memory at $layers layers; trying fewer"; continue; }
    [ $rc = 0 ] && cp "$work/bench.json" "$out/bench-31b.json"
    return $rc
  done
  return 3
}
export -f bench_31b
export bundle cfg31 out
section bench-31b 105 bench_31b
[ -s "$out/bench-31b.json" ] && say "   result: $(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r[\"layers\"]} layers: {r[\"tokens_per_s\"]:.0f} tokens/s ({r[\"tokens_per_s_scaled_to_full_depth\"]:.0f} scaled to 60), peak {r[\"peak_bytes\"] / 2**30:.1f} GiB against a plan of {r[\"planned_peak_bytes\"] / 2**30:.1f} GiB")
' "$out/bench-31b.json" 2>&1)"

# --- 5. memcheck -------------------------------------------------------------------------
section memcheck-ops 45 run_ctest memcheck "$work/junit-memcheck.xml"
heal() {
  mkdir -p "$work/heal"
  compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
    "$bundle/bin/torchless-train" --config "$root/configs/demo-heal.yaml" backend=cuda max_steps=2 eval_table_size=0 \
    eval_steps=1000 save_steps=1000 val_set_size=0 output_dir="$work/heal/out" base_model="$work/heal/upscaled"
}
export -f heal
export root
section memcheck-heal 45 heal

finish "gpu-check: $([ $status = 0 ] && echo 'ALL PASSED' || echo 'SOME SECTIONS FAILED') in $((SECONDS - t_start)) s (results in $results)" $status
