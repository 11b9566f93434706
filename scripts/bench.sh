#!/usr/bin/env bash
# The benchmark: chaperone against bare Chromium measured in the same run on this machine
# (session start, revoke, CDP round trip, idle memory). Builds the release binaries once, runs
# benches/session.rs and writes BENCHMARKS.md at the repository root; the previous file is
# kept when the run fails.
#
# Needs root (bare Chromium runs as `nobody` with its own sandbox on, as it refuses root) and
# Chromium (scripts/setup.sh installs it). Takes 3 to 5 minutes after the build on 2 cores;
# run it on an otherwise idle machine. Knobs: BENCH_RUNS (default 10), BENCH_CALLS (round
# trips per run, default 500), BENCH_IDLE_SECS (idle time before the memory sample, default 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root: bare Chromium is started as nobody, which needs root"
[ -x /usr/lib/chromium/chromium ] || die "/usr/lib/chromium/chromium is missing: run scripts/setup.sh"
command -v setpriv >/dev/null || die "setpriv (util-linux) is missing"

echo "bench: cargo build --release --locked (chaperone and benches/session.rs)"
# One build for both; cargo names the benchmark's executable in its JSON output.
exe=$(cargo build --release --locked --bin chaperone --bench session \
    --message-format=json-render-diagnostics |
    grep -o '"executable":"[^"]*/session-[0-9a-f]*"' | tail -n 1 | cut -d '"' -f 4)
[ -x "$exe" ] || die "cargo did not report the benchmark's executable"

# Everything the run creates lives under one directory that goes away whatever happens.
work=$(mktemp -d /tmp/chaperone-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

commit=unknown
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit=$(git rev-parse --short HEAD)
    [ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit (with uncommitted changes)"
fi

# Let the load of the build die down first (bounded): two cores leave no room for noise.
for _ in $(seq 1 18); do
    awk -v l="$(cut -d ' ' -f 1 /proc/loadavg)" 'BEGIN { exit !(l >= 0.8) }' || break
    sleep 5
done
load=$(cut -d ' ' -f 1 /proc/loadavg)
echo "bench: running (load average now: $(cut -d ' ' -f 1-3 /proc/loadavg))"
if awk -v l="$load" 'BEGIN { exit !(l >= 1.0) }'; then
    echo "bench: warning: the machine is busy (1-minute load $load): expect noisy figures" >&2
fi
# The program bounds every step itself; the timeout is the last resort, and it signals the
# whole process group, so the supervisor purges its sessions and bare browsers die with it.
TMPDIR="$work" BENCH_OUT="$PWD/BENCHMARKS.md" BENCH_COMMIT="$commit" \
    timeout --kill-after=20 900 "$exe" --bench
echo "bench: done, see BENCHMARKS.md"
