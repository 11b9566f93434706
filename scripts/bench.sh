#!/usr/bin/env bash
# The benchmark: chaperone against bare Chromium measured in the same run on this machine.
# Builds the release binaries once (one cargo invocation), then runs
#   1. benches/session.rs: session start, revoke, CDP round trip, idle memory; rewrites
#      BENCHMARKS.md at the repository root;
#   2. benches/credentials.rs: a page with 100 subresources on a credential site and the
#      per-request decision; replaces only its own section of BENCHMARKS.md.
# A program that fails leaves the file as it was before that program ran.
#
# Usage: scripts/bench.sh [session|credentials]   (default: both, in that order)
#
# Needs root (bare Chromium runs as `nobody` with its own sandbox on, as it refuses root) and
# Chromium (scripts/setup.sh installs it). Takes about 4 + 2 minutes after the build on 2
# cores; run it on an otherwise idle machine. Knobs: BENCH_RUNS (default 10, both programs),
# BENCH_CALLS (round trips per run, default 500), BENCH_IDLE_SECS (idle time before the memory
# sample, default 5), BENCH_DECIDE_BATCHES (default 200) and BENCH_DECIDE_CALLS (calls per
# batch, default 1000) for the decision micro-benchmark.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

case "${1:-all}" in
all) programs=(session credentials) ;;
session | credentials) programs=("$1") ;;
*) die "unknown benchmark '$1' (expected session or credentials, or nothing for both)" ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root: bare Chromium is started as nobody, which needs root"
[ -x /usr/lib/chromium/chromium ] || die "/usr/lib/chromium/chromium is missing: run scripts/setup.sh"
command -v setpriv >/dev/null || die "setpriv (util-linux) is missing"

echo "bench: cargo build --release --locked (chaperone and benches/{session,credentials}.rs)"
# One build for all; cargo names each benchmark's executable in its JSON output.
build=$(cargo build --release --locked --bin chaperone --bench session --bench credentials \
    --message-format=json-render-diagnostics)
exe_of() {
    grep -o "\"executable\":\"[^\"]*/$1-[0-9a-f]*\"" <<<"$build" | tail -n 1 | cut -d '"' -f 4
}

# Everything the runs create lives under one directory that goes away whatever happens.
work=$(mktemp -d /tmp/chaperone-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

commit=unknown
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit=$(git rev-parse --short HEAD)
    [ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit (with uncommitted changes)"
fi

for program in "${programs[@]}"; do
    exe=$(exe_of "$program")
    [ -x "$exe" ] || die "cargo did not report the executable of benches/$program.rs"
    # Let the load of the build (or of the previous program) die down first, bounded: two
    # cores leave no room for noise.
    for _ in $(seq 1 18); do
        awk -v l="$(cut -d ' ' -f 1 /proc/loadavg)" 'BEGIN { exit !(l >= 0.8) }' || break
        sleep 5
    done
    load=$(cut -d ' ' -f 1 /proc/loadavg)
    echo "bench: running $program (load average now: $(cut -d ' ' -f 1-3 /proc/loadavg))"
    if awk -v l="$load" 'BEGIN { exit !(l >= 1.0) }'; then
        echo "bench: warning: the machine is busy (1-minute load $load): expect noisy figures" >&2
    fi
    # Each program bounds every step itself; the timeout is the last resort, and it signals
    # the whole process group, so the supervisor purges its sessions and bare browsers die
    # with it.
    TMPDIR="$work" BENCH_OUT="$PWD/BENCHMARKS.md" BENCH_COMMIT="$commit" \
        timeout --kill-after=20 900 "$exe" --bench
done
echo "bench: done, see BENCHMARKS.md"
