# Shared by the CLI tests (sourced; not a test itself): `expect NAME NEEDLE CMD...` runs CMD
# and requires exit status 1 and exactly one stderr line containing NEEDLE. Needs $tmp;
# counts into $passes / $fails.
expect() {
  local name=$1 needle=$2
  shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$? lines
  lines=$(wc -l <"$tmp/err")
  if [ "$rc" -eq 1 ] && [ "$lines" -eq 1 ] && grep -qF -- "$needle" "$tmp/err"; then
    passes=$((passes + 1))
    [ -n "${VERBOSE:-}" ] && echo "ok   $name: $(cat "$tmp/err")"
  else
    fails=$((fails + 1))
    echo "FAIL $name: exit $rc, $lines stderr lines, wanted '$needle':"
    sed 's/^/    /' "$tmp/err"
  fi
  return 0
}

# `tree_hash PATH`: one sha256 over every file under PATH (names and bytes), or of PATH itself.
tree_hash() {
  if [ -d "$1" ]; then
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
  else
    sha256sum <"$1" | cut -d' ' -f1
  fi
}

# `unchanged NAME PATH HASH`: PATH still hashes to HASH (an input the command must not touch).
unchanged() {
  if [ "$(tree_hash "$2")" = "$3" ]; then
    passes=$((passes + 1))
  else
    fails=$((fails + 1))
    echo "FAIL $1: $2 changed"
  fi
}

# `ok CMD...`: CMD must succeed; else its exit status and the end of its output.
ok() {
  "$@" >"$tmp/ok.out" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    passes=$((passes + 1))
  else
    fails=$((fails + 1))
    echo "FAIL: $* exited $rc:"
    tail -20 "$tmp/ok.out" | sed 's/^/    /'
  fi
}

# `check NAME EXPR`: the shell expression EXPR must hold (scripts with a check of another
# shape define their own after sourcing this).
check() { if eval "$2"; then passes=$((passes + 1)); else fails=$((fails + 1)); echo "FAIL $1: $2"; fi; }
