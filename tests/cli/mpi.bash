# Shared by the mpirun CLI tests (sourced; not a test itself). Skips the test (exit 77, which
# ctest reports as skipped) where mpirun is missing. `mpi N ARGS...` runs N ranks the way CI
# can: as root (OpenMPI refuses root without the two variables), oversubscribed (more ranks
# than cores), unbound, one OpenMP thread per rank.
# `fail WHAT`: counts a failure into $fails (the test exits with it) and says what failed.
fails=0
fail() { echo "FAIL $*"; fails=$((fails + 1)); }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# OpenMPI's session files go into the test's own temporary folder (removed with it), also
# when a test kills ranks and mpirun cannot clean up.
export OMPI_MCA_orte_tmpdir_base="$tmp"
if ! command -v mpirun >/dev/null; then
  echo "SKIP: mpirun not found (install openmpi-bin)"
  exit 77
fi
mpi() {
  local n=$1
  shift
  mpirun --oversubscribe --bind-to none -x OMP_NUM_THREADS=1 -np "$n" "$@"
}
# The tiny heal the mpirun tests share: exact fp32, LoRA dropout on (its masks depend on the
# seed, step and shape only, so ranks draw what one process would), every step's weights
# fingerprinted.
write_heal_yaml() {
  cat >"$1" <<YAML
base_model: $src/models/tiny
adapter: qlora
lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_linear: true
datasets:
  - path: $src/data/demo/heal.jsonl
    type: chat
sequence_len: 128
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 1
max_steps: 20
learning_rate: 3.0e-3
warmup_steps: 2
bf16: false
logging_steps: 1
seed: 7
ddp_check_sync_steps: 1
YAML
}
# The pid of rank R of the run writing to OUT (mpirun's environment tells the ranks apart).
rank_pid() {
  local p
  for p in $(pgrep -f "torchless-train .*output_dir=$1 "); do
    tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2" && echo "$p" && return
  done
}
# The weights fingerprints of metrics.jsonl, one per line in step order.
fingerprints() { grep -o '"weights_fingerprint":"[0-9a-f]*"' "$1" | cut -d'"' -f4; }
