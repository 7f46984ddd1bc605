#!/usr/bin/env bash
# Run pytest over TEST_PATHS in SHARDS concurrent processes, for the GPU check:
#
#   bash benchmarks/pytest_shards.sh SHARDS TEST_PATH... [-- PYTEST_ARGS...]
#
# Most of a first GPU test run is Triton compiling kernel variants, one at a time per process,
# on a 16-core machine; shards compile in parallel (and share Triton's on-disk cache). The test
# ids are collected once and dealt round-robin, so every collected test runs in exactly one
# shard. Exits non-zero if collection or any shard fails; prints each shard's summary line.
# PYTHON picks the interpreter (default python3); SHARD_LOGS, if set, names a folder that
# keeps each shard's whole log (shardN.log), which otherwise goes with a temporary folder.
set -uo pipefail

shards=$1
shift
paths=()
while (( $# )) && [[ $1 != -- ]]; do paths+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
python=${PYTHON:-python3}
work=$(mktemp -d)
pids=()
# A timeout (the device check's) must not leave shards running on the GPU.
trap 'kill "${pids[@]}" 2>/dev/null; exit 124' TERM INT
keep_logs() {
    [[ -n ${SHARD_LOGS:-} ]] || return 0
    mkdir -p "$SHARD_LOGS"
    for log in "$work"/log*; do [[ -e $log ]] && cp "$log" "$SHARD_LOGS/shard${log##*/log}.log"; done
}
trap 'keep_logs; rm -rf "$work"' EXIT

if ! "$python" -m pytest --collect-only -q -p no:cacheprovider "${paths[@]}" >"$work/collected" 2>&1
then
    cat "$work/collected"
    echo "pytest_shards: collection failed"
    exit 1
fi
grep '::' "$work/collected" >"$work/ids" || true
total=$(wc -l <"$work/ids")
if (( total == 0 )); then
    tail -5 "$work/collected"
    echo "pytest_shards: no tests collected from ${paths[*]}"
    exit 1
fi
(( shards = shards < total ? shards : total ))
echo "pytest_shards: $total tests in $shards shards"
for (( i = 0; i < shards; i++ )); do
    awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$work/ids" >"$work/shard$i"
    mapfile -t ids <"$work/shard$i"
    "$python" -m pytest -p no:cacheprovider "$@" "${ids[@]}" >"$work/log$i" 2>&1 &
    pids[i]=$!
done
failed=0
for (( i = 0; i < shards; i++ )); do
    if ! wait "${pids[i]}"; then
        failed=1
        echo "--- shard $i failed:"
        tail -40 "$work/log$i"
    fi
done
for (( i = 0; i < shards; i++ )); do
    echo "shard $i: $(tail -1 "$work/log$i")"
done
exit $failed
