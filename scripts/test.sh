#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing (Chromium, the pinned
# Node test clients), then runs every unit and integration test against real Chromium and real
# clients. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
echo "test: cargo test --workspace (unit tests, then real Chromium end to end)"
# Two cores: one Chromium per test thread is what the machine carries.
cargo test --workspace --all-targets --locked -- --test-threads="${CHAPERONE_TEST_THREADS:-2}"
