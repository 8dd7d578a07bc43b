#!/usr/bin/env bash
# Installs what `make` needs from the system: python3-venv, mosquitto, redis-server,
# fuse3 (the power-cut tests' FUSE filesystem), faketime (clock-skew tests),
# prometheus (promtool checks deploy/prometheus/; the monitoring test runs the server),
# chromium (the /ops page tests drive Debian's browser with playwright; no browser download),
# nodejs (tests/hostile/test_patterns.py checks our regexes in ECMA-262) and openssl (the
# agent's TLS test makes its certificates with it), redis-sentinel (the in-region failover tests),
# docker.io, docker-compose and mmdebstrap (tests/deploy runs the compose file on a real engine
# with Debian's Compose 1.29, on a Debian base image built locally because no image registry
# is reachable). A test without its tool skips, or fails under
# CI=true (tests/tools.py), so each tool a test needs must be installed here.
# Uses apt-get on Debian/Ubuntu (as root, or through sudo); elsewhere it says what to install.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=("python3-venv")
have mosquitto || missing+=("mosquitto")
have mosquitto_passwd || missing+=("mosquitto")
have mosquitto_sub || missing+=("mosquitto-clients")
have redis-server || missing+=("redis-server")
have redis-cli || missing+=("redis-tools")
have redis-sentinel || missing+=("redis-sentinel")
{ have dockerd && have docker; } || missing+=("docker.io")
have docker-compose || missing+=("docker-compose")
have mmdebstrap || missing+=("mmdebstrap")
# libfuse 3 for mfusepy (tests/powercut) and its mount helper; fuse3 pulls in libfuse3-3.
have fusermount3 || missing+=("fuse3")
[ -n "$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p) | grep libfuse3.so.3)" ] || missing+=("libfuse3-3")
have faketime || missing+=("faketime")
{ have prometheus && have promtool; } || missing+=("prometheus")
[ -x /usr/bin/chromium ] || missing+=("chromium")
have node || missing+=("nodejs")
have openssl || missing+=("openssl")
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "Missing: ${missing[*]}. Install them with your package manager" >&2
  echo "(macOS: brew install mosquitto redis; Fedora: dnf install mosquitto redis), then rerun make." >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing with apt-get: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's packages start system-wide servers on 1883/6379; we start our own on free ports.
