#!/usr/bin/env bash
# The golden fixtures are what transformers wrote (scripts/golden/): every file under
# tests/golden is listed in MANIFEST.sha256 and still has that hash, so a fixture edited by
# hand, or regenerated without refreshing the manifest, fails here.
# usage: golden_manifest.sh BUILD_DIR SOURCE_DIR
set -u
src=$2
cd "$src/tests/golden" || exit 1
fails=0
sha256sum --check --quiet MANIFEST.sha256 || fails=$((fails + 1))
unlisted=$(comm -23 <(find . -type f ! -name MANIFEST.sha256 | sed 's|^\./||' | LC_ALL=C sort) \
                    <(awk '{print $2}' MANIFEST.sha256 | LC_ALL=C sort))
if [ -n "$unlisted" ]; then
  echo "FAIL: not in MANIFEST.sha256 (regenerate it with make_golden.write_manifest):"
  echo "$unlisted"
  fails=$((fails + 1))
fi
echo "golden manifest: $(wc -l <MANIFEST.sha256) files, $fails failures"
[ "$fails" -eq 0 ]
