#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine to build chaperone and run its end-to-end tests.
#
# Idempotent: each step checks first and does nothing when its work is already done, so CI can
# run it before every test run. Runs with no stdin and with CI=true; installs only through
# apt-get (Debian's Chromium) and npm (the pinned test clients). Needs root for apt-get: run it
# as root, or as a user with password-less sudo.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
clients_dir="$repo_root/tests/clients"
chromium_bin=/usr/lib/chromium/chromium
min_node_major=20

step() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, else through sudo, which must not prompt
# because there may be no terminal to answer it.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
        return
    fi
    command -v sudo >/dev/null 2>&1 ||
        die "need root for '$*' and sudo is missing: run this script as root"
    sudo -n true 2>/dev/null ||
        die "need root for '$*': run this script as root or give this user password-less sudo"
    sudo -n "$@"
}

chromium_version() { "$chromium_bin" --version 2>/dev/null || echo 'version unknown'; }

# Reads the versions npm actually installed, not the ones package.json asks for.
installed_clients() {
    (cd "$clients_dir" && node -e '
        const fs = require("fs");
        const v = (n) => JSON.parse(fs.readFileSync(`node_modules/${n}/package.json`)).version;
        console.log(`playwright-core ${v("playwright-core")}, puppeteer-core ${v("puppeteer-core")}`);
    ')
}

# --- Chromium ---------------------------------------------------------------------------------
if [ -x "$chromium_bin" ]; then
    step "chromium: present ($(chromium_version))"
else
    step "chromium: $chromium_bin missing, installing Debian's chromium with apt-get"
    # apt's progress goes to stdout and is dropped; its errors go to stderr and stay visible.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null
    # fonts-liberation gives pages a real font in screenshots; the other recommends (udev,
    # printing, a notification daemon) are desktop pieces a headless browser never uses.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-liberation </dev/null >/dev/null
    [ -x "$chromium_bin" ] || die "apt-get installed chromium but $chromium_bin is still missing"
    step "chromium: installed ($(chromium_version))"
fi

# --- Time zones -------------------------------------------------------------------------------
# A mandate's `window` names an IANA time zone; chaperone reads it from the system's database.
if [ -f /usr/share/zoneinfo/Europe/London ]; then
    step "tzdata: present"
else
    step "tzdata: /usr/share/zoneinfo missing, installing Debian's tzdata with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        tzdata </dev/null >/dev/null
    [ -f /usr/share/zoneinfo/Europe/London ] || die "apt-get installed tzdata but /usr/share/zoneinfo is still missing"
    step "tzdata: installed"
fi

# --- Node.js and the test clients -------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    die "node and npm not found: install Node.js >= $min_node_major with npm, then rerun"
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge "$min_node_major" ] ||
    die "node $(node --version) is too old: playwright-core needs Node.js >= $min_node_major"
step "node: $(node --version), npm $(npm --version 2>/dev/null)"

# npm rewrites node_modules/.package-lock.json on every install, so its age tells whether the
# installed tree predates the lockfile; the directory's own mtime would not.
installed_marker="$clients_dir/node_modules/.package-lock.json"
if [ -f "$installed_marker" ] && ! [ "$clients_dir/package-lock.json" -nt "$installed_marker" ]
then
    step "test clients: node_modules up to date ($(installed_clients))"
else
    step "test clients: running npm ci in tests/clients"
    (cd "$clients_dir" && npm ci --no-audit --no-fund --loglevel=error </dev/null >/dev/null)
    step "test clients: installed $(installed_clients)"
fi

# --- Rust -------------------------------------------------------------------------------------
# Not installed here: the toolchain comes from rustup, not from apt or npm (Debian 12's cargo is
# too old), so say what to do instead. rustup puts cargo in ~/.cargo/bin, which a non-login
# shell may not have on PATH.
if command -v cargo >/dev/null 2>&1; then
    step "cargo: $(cargo --version)"
elif [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
    die "cargo is in ${HOME:-/root}/.cargo/bin but not on PATH: run '. ~/.cargo/env' and rerun"
else
    die "cargo not found: install a stable Rust toolchain with rustup, then rerun"
fi

step "done"
