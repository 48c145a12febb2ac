#!/usr/bin/env bash
# How the CPU trainer's step time holds up on a machine it shares: the 10-step demo heal
# (configs/demo-heal.yaml) alone, beside one busy process (`yes`), and two heals at once,
# under each OpenMP wait policy. torchless' default is OMP_WAIT_POLICY=PASSIVE
# (core/cpu/thread_policy.h); libgomp's own default spins ~300,000 iterations before sleeping.
#   bash bench/under_load.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
tmp=$(mktemp -d)
hog=""
trap '[ -n "$hog" ] && kill "$hog" 2>/dev/null; rm -rf "$tmp"' EXIT

heal() {  # heal NAME: one 10-step demo heal into $tmp/NAME
  "$build/torchless-train" --config configs/demo-heal.yaml output_dir="$tmp/$1" \
    max_steps=10 eval_steps=1000 save_steps=1000 >"$tmp/$1.log" 2>&1
}
seconds() {  # seconds CMD...: wall time of CMD with 0.1 s resolution
  local t0 t1
  t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }'
}
two_heals() { heal a & local p=$!; heal b; wait "$p"; }

printf '| wait policy | alone | beside one busy process | two heals at once |\n|---|---|---|---|\n'
for policy in "libgomp default (GOMP_SPINCOUNT=300000):GOMP_SPINCOUNT=300000" \
              "OMP_WAIT_POLICY=PASSIVE:OMP_WAIT_POLICY=PASSIVE" \
              "GOMP_SPINCOUNT=10000:GOMP_SPINCOUNT=10000"; do
  name=${policy%%:*}
  # shellcheck disable=SC2046 # the variables are words by design
  export $(echo "${policy#*:}")
  alone=$(seconds heal alone)
  yes >/dev/null & hog=$!
  loaded=$(seconds heal loaded)
  kill "$hog"; wait "$hog" 2>/dev/null || true; hog=""
  both=$(seconds two_heals)
  printf '| %s | %s s | %s s | %s s |\n' "$name" "$alone" "$loaded" "$both"
  unset OMP_WAIT_POLICY GOMP_SPINCOUNT
done
