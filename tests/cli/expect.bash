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
