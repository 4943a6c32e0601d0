#!/usr/bin/env bash
# Install the aarch64 cross toolchain that `bidiff-export --target arm64|rpi4|rpi5` links with
# (Debian/Ubuntu). Needs root (or sudo). Idempotent.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
$SUDO apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu
aarch64-linux-gnu-gcc --version | head -1
