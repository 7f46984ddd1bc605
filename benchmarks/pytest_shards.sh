#!/usr/bin/env bash
# Run pytest over TEST_PATHS in SHARDS concurrent processes, for the GPU check:
#
#   bash benchmarks/pytest_shards.sh SHARDS TEST_PATH... [-- PYTEST_ARGS...]
#
# Most of a first GPU test run is Triton compiling kernel variants, one at a time per process,
# on a 16-core machine; shards compile in parallel (and share Triton's on-disk cache). The test
# ids are collected once and dealt round-robin, so every collected test runs in exactly one
# shard. Exits non-zero if collection or any shard fails; prints each shard's summary line.
# PYTHON picks the interpreter (default python3); SHARD_LOGS, if set, names the folder each
# shard writes its whole log to as it runs (shardN.log; a temporary folder otherwise), so a
# killed run leaves its logs there.
#
# On SIGTERM/SIGINT (the device check's step timeout) the shards are signalled and waited for:
# with FIERCE_SIGTERM_INTERRUPT=1, set here for them, tests/gpu/conftest.py turns their SIGTERM
# into a KeyboardInterrupt, so each shard still writes its failures and summary line to its log
# before the script exits 124.
set -uo pipefail

shards=$1
shift
paths=()
while (( $# )) && [[ $1 != -- ]]; do paths+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -n ${SHARD_LOGS:-} ]]; then
    mkdir -p "$SHARD_LOGS" || exit 1
    rm -f "$SHARD_LOGS"/shard*.log  # a rerun into the same folder: no stale shards
    logdir=$SHARD_LOGS
else
    logdir=$work
fi
export FIERCE_SIGTERM_INTERRUPT=1
export PYTHONUNBUFFERED=1  # each log complete up to the moment it is cut, SIGKILL included
pids=()
rcs=()  # each shard's exit status, once waited for
shards_started=0

# report: wait for every shard; print the tail of each failed one, then every summary line.
report() {
    local i failed=0
    for (( i = 0; i < shards_started; i++ )); do
        if [[ -z ${rcs[i]:-} ]]; then
            wait "${pids[i]}"
            rcs[i]=$?
            if (( rcs[i] != 0 )); then
                echo "--- shard $i failed:"
                tail -40 "$logdir/shard$i.log"
            fi
        fi
        (( rcs[i] == 0 )) || failed=1
    done
    for (( i = 0; i < shards_started; i++ )); do
        echo "shard $i: $(tail -1 "$logdir/shard$i.log")"
    done
    return $failed
}

# A timeout (the device check's) must not leave shards running on the GPU, nor lose their
# reports: pass the signal on, then wait for them to print their summaries (the timeout's
# SIGKILL, 10 s later, is the backstop). Further signals are ignored meanwhile.
# shellcheck disable=SC2329  # (run by the trap below)
on_signal() {
    trap '' TERM INT
    echo "pytest_shards: interrupted; stopping the shards"
    (( shards_started )) && kill -TERM "${pids[@]}" 2>/dev/null
    report
    exit 124
}
trap on_signal TERM INT

"$python" -m pytest --collect-only -q -p no:cacheprovider "${paths[@]}" >"$work/collected" 2>&1
rc=$?
if (( rc != 0 && rc != 5 )); then  # 5: no tests collected (a module-level skip, say), below
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
echo "pytest_shards: $total tests in $shards shards, logs in $logdir"
for (( i = 0; i < shards; i++ )); do
    awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$work/ids" >"$work/shard$i"
    mapfile -t ids <"$work/shard$i"
    "$python" -m pytest -p no:cacheprovider "$@" "${ids[@]}" >"$logdir/shard$i.log" 2>&1 &
    pids[i]=$!
    shards_started=$(( i + 1 ))
done
report
exit $?
