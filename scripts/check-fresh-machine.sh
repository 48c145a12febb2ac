#!/usr/bin/env bash
# Proves the README's two set-up commands on a machine that has nothing but what our scripts
# install: builds a minimal Debian 12 root with mmdebstrap (--variant=apt), clones this
# repository's HEAD into it with ../shared beside it, bind-mounts /usr/local read-only (where a
# CUDA toolkit may live, as on a user's machine), and runs inside it
#   1. the test command:  bash scripts/test.sh
#   2. the main job:      bash scripts/demo.sh [DEMO_ARGS…]
#   3. the AVX2 check:    bash scripts/check-avx2.sh  (the CPU paths of an AVX2-only machine,
#      whatever this machine has)
#   4. the GPU bundle check (where /usr/local has a CUDA toolkit): builds gpu-bundle/ there
#      (scripts/gpu-bundle.sh), then in a second root that has only what the GPU machine's
#      image has (g++, CMake, ninja, python3; the toolkit bound in; no -dev packages) runs the
#      device command (bench/gpu/device-command) exactly as it is sent, from a copy of what
#      travels (the checkout's files and gpu-bundle/): every library must resolve, the
#      binaries must start, and the check must end with its "no GPU" line
# then unmounts and removes the roots, also when a step fails or the script is interrupted.
# Ends with one line: the result and how long each command took.
#
#   bash scripts/check-fresh-machine.sh [--keep] [--no-demo] [-- DEMO_ARGS…]
#     --keep      leave the root in place (its path is printed) for a look inside
#     --no-demo   run only the test command
#     DEMO_ARGS   key=value overrides for the demo heal, e.g. max_steps=20 (CI uses this)
# Needs root (or sudo), apt-get and the network to Debian's mirror. Takes 20–30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

keep=0
run_demo=1
demo_args=()
while (($#)); do
  case "$1" in
    --keep) keep=1 ;;
    --no-demo) run_demo=0 ;;
    --) shift; demo_args=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-fresh-machine: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=CI bash "$0" "$@"
fi
if ! command -v mmdebstrap >/dev/null; then
  echo "check-fresh-machine: installing mmdebstrap"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi
shared="$repo/../shared"
[ -d "$shared" ] || { echo "check-fresh-machine: $shared is missing (the docs and released configs)" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/torchless-fresh-root.XXXXXX")
img=""     # the GPU image's stand-in (step 4), made when that step runs
mounts=()  # mount points inside the roots, in the order they were mounted

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" 2>/dev/null || true
  done
  # Never delete through a mount that is still there (/usr/local is bound in).
  local r
  for r in "$root" $img; do
    if findmnt -rn -o TARGET | grep -q "^$r"; then
      echo "check-fresh-machine: mounts remain under $r; not removing it" >&2
    elif ((keep)); then
      echo "check-fresh-machine: root kept at $r"
    else
      rm -rf --one-file-system "$r"
    fi
  done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bind() {  # bind SRC DEST_IN_ROOT [ro] [ROOT]
  local r=${4:-$root}
  mkdir -p "$r$2"
  mount --bind "$1" "$r$2"
  mounts+=("$r$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$r$2"; fi
}

now() { date +%s; }
fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

t0=$(now)
echo "check-fresh-machine: making a Debian 12 root in $root"
mmdebstrap --variant=apt --quiet bookworm "$root" http://deb.debian.org/debian >/dev/null
cp /etc/resolv.conf "$root/etc/resolv.conf"
t_root=$(($(now) - t0))

# The project as a new user gets it: a clone of HEAD, with shared/ beside it.
mkdir -p "$root/work"
git clone --quiet --no-hardlinks "$repo" "$root/work/torchless"
git -C "$root/work/torchless" checkout --quiet "$(git -C "$repo" rev-parse HEAD)"
cp -r "$shared" "$root/work/shared"

mkdir -p "$root/proc" "$root/sys" "$root/dev"
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
bind /sys /sys ro
bind /dev /dev
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts" 2>/dev/null && mounts+=("$root/dev/pts") || true
mount -t tmpfs -o size=2g tmpfs "$root/dev/shm"; mounts+=("$root/dev/shm")
bind /usr/local /usr/local ro

# Run a command in the root with a clean environment: nothing from this shell leaks in.
in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI="${CI:-}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash -c "cd /work/torchless && $1"
}

result=passed
t_test=0
t_demo=0
t1=$(now)
echo "check-fresh-machine: running the test command: bash scripts/test.sh"
if ! in_root "bash scripts/test.sh"; then result="FAILED (test command)"; fi
t_test=$(($(now) - t1))

t_avx2=0
avx2_line="AVX2 check skipped"
if [ "$result" = passed ]; then
  t3=$(now)
  echo "check-fresh-machine: running the AVX2 check: bash scripts/check-avx2.sh"
  if ! in_root "bash scripts/check-avx2.sh"; then result="FAILED (AVX2 check)"; fi
  t_avx2=$(($(now) - t3))
  avx2_line="AVX2 check (bash scripts/check-avx2.sh) $(fmt_time $t_avx2)"
fi

t_gpu=0
gpu_line="GPU bundle check skipped (no CUDA toolkit in /usr/local)"
if [ "$result" = passed ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  t4=$(now)
  echo "check-fresh-machine: building the GPU bundle: bash scripts/gpu-bundle.sh"
  if ! in_root "bash scripts/gpu-bundle.sh"; then
    result="FAILED (GPU bundle build)"
  else
    img=$(mktemp -d "${TMPDIR:-/var/tmp}/torchless-gpu-image-root.XXXXXX")
    echo "check-fresh-machine: making the GPU image's stand-in in $img (g++, cmake, ninja, python3; no -dev packages)"
    mmdebstrap --variant=apt --quiet --include=g++,cmake,ninja-build,python3 bookworm "$img" \
      http://deb.debian.org/debian >/dev/null
    # What travels to the device machine: the checkout's files (as git lists them) and the
    # carried gpu-bundle/, at another path than the one they were built at.
    mkdir -p "$img/work/checkout" "$img/work/out"
    (cd "$root/work/torchless" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) |
      tar -C "$img/work/checkout" -xf -
    cp -a "$root/work/torchless/gpu-bundle" "$img/work/checkout/"
    mkdir -p "$img/proc" "$img/dev"
    mount -t proc proc "$img/proc"; mounts+=("$img/proc")
    bind /dev /dev "" "$img"
    bind /usr/local /usr/local ro "$img"
    device_cmd=$(cat "$root/work/torchless/bench/gpu/device-command")
    echo "check-fresh-machine: running the device command there: $device_cmd"
    rc=0
    chroot "$img" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb OUT=/work/out \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      /bin/bash -c "cd /work/checkout && $device_cmd" || rc=$?
    last=$(tail -1 "$img/work/out/results.txt" 2>/dev/null)
    if [ $rc != 0 ] || [[ "$last" != *"no NVIDIA GPU visible"* ]]; then
      result="FAILED (GPU bundle check: exit $rc, last line '$last')"
    fi
  fi
  t_gpu=$(($(now) - t4))
  gpu_line="GPU bundle check $(fmt_time $t_gpu)"
fi

demo_line="demo skipped"
if [ "$result" = passed ] && ((run_demo)); then
  t2=$(now)
  demo_cmd="bash scripts/demo.sh"
  ((${#demo_args[@]})) && demo_cmd+=" $(printf '%q ' "${demo_args[@]}")"
  echo "check-fresh-machine: running the main job: $demo_cmd"
  if ! in_root "$demo_cmd"; then result="FAILED (demo)"; fi
  t_demo=$(($(now) - t2))
  demo_line="demo ($demo_cmd) $(fmt_time $t_demo)"
fi

echo "check-fresh-machine: $result on a fresh Debian 12 root: root $(fmt_time $t_root), tests (bash scripts/test.sh) $(fmt_time $t_test), $avx2_line, $gpu_line, $demo_line, total $(fmt_time $(($(now) - t0)))"
[ "$result" = passed ]
