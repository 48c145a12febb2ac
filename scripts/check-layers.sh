#!/usr/bin/env bash
# Keeps the includes running downward through the rooms of docs/architecture.md: reads every
# `#include "…"` of the C++ and CUDA sources git tracks and fails, naming the file and line,
# where a room includes a room it may not. Run by ctest (test `layers`) and so by CI.
#   bash scripts/check-layers.sh [ROOT]      (ROOT: a checkout, default this one)
set -uo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root" || exit 2

# The room a path belongs to: the longest matching folder.
room_of() {
  case "$1" in
    core/*) echo core ;;
    cuda/*) echo cuda ;;
    train/model/*) echo model ;;
    train/data/*) echo data ;;
    train/eval/*) echo eval ;;
    train/surgery/*) echo surgery ;;
    train/dist/*) echo dist ;;
    train/step/*) echo step ;;
    train/*) echo trainer ;;
    tools/* | bench/* | tests/* | fuzz/* | scripts/*) echo top ;;
    *) echo other ;;
  esac
}

# What each room may include besides itself (docs/architecture.md says why).
declare -A may=(
  [core]=""
  [cuda]="core"
  [model]="core"
  [data]="core model"
  [eval]="core model data"
  [surgery]="core model"
  [dist]="core model"
  [step]="core model data dist"
  [trainer]="core model data eval surgery dist step"
  [top]="core cuda model data eval surgery dist step trainer top"
)

violations=0
files=0
while IFS= read -r file; do
  from=$(room_of "$file")
  [ "$from" = other ] && continue
  files=$((files + 1))
  while IFS=: read -r line inc; do
    # A quoted include names a path from the checkout's root, or one beside the file.
    target=$inc
    [ -e "$target" ] || [ ! -e "$(dirname "$file")/$inc" ] || target=$(dirname "$file")/$inc
    to=$(room_of "$target")
    [ "$to" = other ] && continue
    [ "$to" = "$from" ] && continue
    case " ${may[$from]} " in
      *" $to "*) ;;
      *)
        echo "$file:$line: the $from room includes \"$inc\" ($to); $from may include only: ${may[$from]:-nothing outside itself}"
        violations=$((violations + 1))
        ;;
    esac
  done < <(grep -n '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$file" | sed -E 's/^([0-9]+):[^"]*"([^"]+)".*/\1:\2/')
done < <(git ls-files -- '*.h' '*.cpp' '*.cu' '*.cuh')

if ((violations)); then
  echo "check-layers: $violations include(s) against the rooms' direction (docs/architecture.md)" >&2
  exit 1
fi
echo "check-layers: $files files, every include runs downward"
