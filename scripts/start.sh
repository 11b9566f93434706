#!/usr/bin/env bash
# Quick start: installs what is missing, builds chaperone, and runs the supervisor on the
# embedded default config (agents on 127.0.0.1:9222, control API on a Unix socket, the
# embedded default mandate for `chaperone session start`). Extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release --locked
exec target/release/chaperone serve "$@"
