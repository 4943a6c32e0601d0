#!/usr/bin/env bash
# Run the bidiff device runtime as a 64-bit Raspberry Pi would, under qemu-aarch64 emulation.
#
#   scripts/arm64_emulate.sh [setup]            build / refresh the emulated device (idempotent)
#   scripts/arm64_emulate.sh run -- bidiff upscale in.png -o out --artifact bidiff-rpi4
#   scripts/arm64_emulate.sh run -- python3 -c 'import numpy; print(numpy.__version__)'
#   scripts/arm64_emulate.sh footprint          MB installed on the device side, per component
#   scripts/arm64_emulate.sh paths              print SYSROOT=, SITE=, TVM_RUNTIME= (for scripts)
#   scripts/arm64_emulate.sh pi-venv            README's Pi commands literally: venv + emulated pip
#   scripts/arm64_emulate.sh pi-run -- bidiff upscale ...      (slow; optional, needs PyPI)
#   scripts/arm64_emulate.sh rpc-server -- --tracker HOST:PORT --key KEY [--threads N]
#                                               `bidiff device-server` on the emulated device
#
# Everything comes from Debian and PyPI packages and is cached under $BIDIFF_ARM64_CACHE
# (default .cache/arm64, git-ignored):
#   sysroot/   an arm64 Debian bookworm userland with Python 3.11 (apt-get download + dpkg -x);
#              it stands in for the Pi's own OS Python and is not part of bidiff's footprint
#   wheels/    the aarch64 wheels a Pi's pip would pick: bidiff (built from this repo, pure
#              Python), its pinned runtime deps (numpy, pillow, click, apache-tvm-ffi) and the
#              apache-tvm wheel that libtvm_runtime.so is taken from
#   device/site/                 `pip install --target` of "bidiff[tvm]" (what the Pi installs)
#   device/lib/libtvm_runtime.so  extracted from the apache-tvm wheel, found by the runtime
#                                 through $BIDIFF_TVM_RUNTIME (the README's Pi commands do the same)
#   device/site-rpc/  `setup --rpc`: the device side of "bidiff[rpc]" for `rpc-server` (not part
#                     of the runtime's footprint: an RPC server needs the whole TVM package)
# The wrapper `run` maps `bidiff ...` to the console script pip wrote (bidiff.runtime.cli:main)
# and `python3 ...` to the sysroot's python3.11; the environment is passed through.
# Host requirements: Debian/Ubuntu with apt-get (root or sudo), python3 with pip, network to
# Debian's and PyPI's mirrors on the first run. Installs qemu-user and the aarch64 cross
# compiler (scripts/install_cross.sh) when missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${BIDIFF_ARM64_CACHE:-$REPO/.cache/arm64}"
SYSROOT="$CACHE/sysroot"
WHEELS="$CACHE/wheels"
DIST="$CACHE/dist"
DEVICE="$CACHE/device"
SITE="$DEVICE/site"
TVM_RUNTIME="$DEVICE/lib/libtvm_runtime.so"
RPC_SITE="$DEVICE/site-rpc"
GUEST_PY="$DEVICE/bin/python3.11"
PY="${PYTHON:-python3}"
PIP_PLATFORM=(--only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11
              --implementation cp --abi cp311)
# Python 3.11 and the libraries its stdlib extension modules link against (docs/tvm-notes.md);
# libssl3 for hashlib's OpenSSL backend (the runtime sha256-checks every artifact file).
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6 libgcc-s1
      libexpat1 zlib1g libffi8 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libsqlite3-0 libncursesw6
      libtinfo6 libreadline8 libssl3
      python3.11-venv python3-pip-whl:all python3-setuptools-whl:all)   # venv + pip: `pi-venv`

die() { echo "arm64_emulate: $*" >&2; exit 1; }
say() { echo "arm64_emulate: $*" >&2; }
SUDO=""
if [ "${EUID:-0}" -ne 0 ]; then SUDO="sudo"; fi

need_apt() {
    command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 ||
        die "apt-get/dpkg not found: this script needs Debian or Ubuntu (install qemu-user, gcc-aarch64-linux-gnu and an arm64 python3.11 sysroot by hand elsewhere)"
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
        die "not root and no sudo: run as root, or install qemu-user and gcc-aarch64-linux-gnu first (apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
    fi
}

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    $SUDO apt-get update -qq >"$CACHE/apt-update.log" 2>&1 ||
        die "apt-get update failed (no network to the Debian mirror?): see $CACHE/apt-update.log"
    apt_updated=1
}

ensure_qemu() {
    command -v qemu-aarch64 >/dev/null 2>&1 && return 0
    need_apt
    say "installing qemu-user (qemu-aarch64)"
    apt_update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >"$CACHE/apt-qemu.log" 2>&1 ||
        die "could not install qemu-user (see $CACHE/apt-qemu.log): install it with 'apt-get install qemu-user'"
    command -v qemu-aarch64 >/dev/null 2>&1 ||
        die "qemu-aarch64 still missing after installing qemu-user: install it with 'apt-get install qemu-user'"
}

ensure_cross() {
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && return 0
    need_apt
    say "installing the aarch64 cross compiler (scripts/install_cross.sh)"
    "$REPO/scripts/install_cross.sh" >"$CACHE/apt-cross.log" 2>&1 ||
        die "could not install the aarch64 cross compiler (see $CACHE/apt-cross.log): run scripts/install_cross.sh"
}

ensure_sysroot() {
    local want="${DEBS[*]}"
    if [ -x "$SYSROOT/usr/bin/python3.11" ] && [ "$(cat "$CACHE/sysroot.ok" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    need_apt
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        say "dpkg --add-architecture arm64"
        $SUDO dpkg --add-architecture arm64
        apt_updated=0
    fi
    local debs="$CACHE/debs" pkgs=() p
    mkdir -p "$debs"
    rm -f "$debs"/*.deb                  # one version of each package: the current one
    for p in "${DEBS[@]}"; do case "$p" in *:*) pkgs+=("$p") ;; *) pkgs+=("$p:arm64") ;; esac; done
    say "downloading ${#pkgs[@]} arm64 Debian packages for the sysroot"
    # apt-get download needs the arm64 package lists: update once if they are missing/stale.
    if ! (cd "$debs" && apt-get download -qq "${pkgs[@]}" >"$CACHE/apt-download.log" 2>&1); then
        apt_update
        (cd "$debs" && apt-get download -qq "${pkgs[@]}" >"$CACHE/apt-download.log" 2>&1) ||
            die "apt-get download of the arm64 packages failed (no network?): see $CACHE/apt-download.log"
    fi
    rm -rf "$SYSROOT.tmp"
    mkdir -p "$SYSROOT.tmp"
    for p in "${DEBS[@]}"; do
        local f
        f=$(ls "$debs/${p%%:*}_"*_arm64.deb "$debs/${p%%:*}_"*_all.deb 2>/dev/null | head -1 || true)
        [ -n "$f" ] || die "package $p:arm64 was not downloaded: see $CACHE/apt-download.log"
        dpkg -x "$f" "$SYSROOT.tmp"
    done
    [ -x "$SYSROOT.tmp/usr/bin/python3.11" ] || die "the arm64 sysroot has no usr/bin/python3.11"
    # Debian ships no .pyc (postinst compiles them): do it here with the host's Python 3.11 (the
    # same bytecode), so the emulated interpreter does not recompile the stdlib on each run.
    if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        "$PY" -m compileall -q -j 1 "$SYSROOT.tmp/usr/lib/python3.11" >/dev/null 2>&1 || true
    fi
    rm -rf "$SYSROOT"
    mv "$SYSROOT.tmp" "$SYSROOT"
    echo "$want" >"$CACHE/sysroot.ok"
}

# The versions pinned in pyproject.toml (dependencies + the tvm extra) and the apache-tvm pin of
# the export extra (libtvm_runtime.so must match the compiler that built model.so).
pins() {
    "$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
tvm = [d for d in p["optional-dependencies"]["export"] if d.split("==")[0] == "apache-tvm"]
print(p["version"])
print(" ".join(p["dependencies"] + p["optional-dependencies"]["tvm"]))
print(tvm[0] if tvm else "")
# the rpc extra less tornado, which only the tracker (on the host) needs
print(" ".join(d for d in p["optional-dependencies"]["rpc"] if not d.startswith("tornado")))
EOF
}

ensure_device() {
    local version deps tvm_pin lines
    mapfile -t lines < <(pins)
    version="${lines[0]}" deps="${lines[1]}" tvm_pin="${lines[2]:-}"
    [ -n "$tvm_pin" ] || die "pyproject.toml pins no apache-tvm in the export extra"
    "$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip: install it (apt-get install python3-pip)"
    mkdir -p "$WHEELS" "$DIST"

    # 1. bidiff itself: the pure-Python wheel of this checkout (every time: a few seconds), built
    #    from a copy so that setuptools' build files never land in the checkout.
    rm -rf "$DIST" "$CACHE/src"
    mkdir -p "$DIST" "$CACHE/src"
    (cd "$REPO" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md \
        runtime exporter models) | tar -xf - -C "$CACHE/src" || die "cannot copy the sources to $CACHE/src"
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DIST" "$CACHE/src" \
        >"$CACHE/pip-wheel.log" 2>&1 ||
        "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIST" "$CACHE/src" >"$CACHE/pip-wheel.log" 2>&1 ||
        die "building the bidiff wheel failed: see $CACHE/pip-wheel.log"
    local whl
    whl=$(ls "$DIST"/bidiff-"$version"-*.whl | head -1)
    # the wheel's RECORD (sha256 of every file) identifies its content; zip timestamps do not
    local record
    record=$("$PY" -c 'import sys, zipfile, hashlib; z = zipfile.ZipFile(sys.argv[1]); print(hashlib.sha256(b"".join(z.read(n) for n in sorted(z.namelist()) if n.endswith("/RECORD"))).hexdigest())' "$whl")

    # 2. The runtime's dependencies, once per set of pins: the aarch64 wheels a Pi's pip picks for
    #    "bidiff[tvm]" (the pins are the wheel's own metadata = pyproject.toml), and
    #    libtvm_runtime.so (only that file) out of the aarch64 apache-tvm wheel.
    if ! [ -d "$SITE" ] || ! [ -f "$TVM_RUNTIME" ] || [ "$(cat "$CACHE/device.ok" 2>/dev/null)" != "$deps $tvm_pin" ]; then
        if ! ls "$WHEELS"/apache_tvm-*aarch64*.whl >/dev/null 2>&1 || [ "$(cat "$CACHE/wheels.ok" 2>/dev/null)" != "$deps $tvm_pin" ]; then
            say "downloading aarch64 wheels: $deps $tvm_pin"
            "$PY" -m pip download -q --disable-pip-version-check "${PIP_PLATFORM[@]}" -d "$WHEELS" \
                $deps >"$CACHE/pip-download.log" 2>&1 &&
            "$PY" -m pip download -q --disable-pip-version-check "${PIP_PLATFORM[@]}" --no-deps -d "$WHEELS" \
                "$tvm_pin" >>"$CACHE/pip-download.log" 2>&1 ||
                die "pip download of the aarch64 wheels failed (no network to PyPI?): see $CACHE/pip-download.log"
            echo "$deps $tvm_pin" >"$CACHE/wheels.ok"
        fi
        say "installing bidiff[tvm] for aarch64 into $SITE"
        rm -rf "$DEVICE.tmp"
        mkdir -p "$DEVICE.tmp/lib"
        # offline from those wheels: exactly `pip install "bidiff[tvm]"` on the Pi
        "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
            "${PIP_PLATFORM[@]}" --target "$DEVICE.tmp/site" "bidiff[tvm] @ file://$whl" \
            >"$CACHE/pip-install.log" 2>&1 || die "pip install --target failed: see $CACHE/pip-install.log"
        local tvmwhl
        tvmwhl=$(ls "$WHEELS"/apache_tvm-*aarch64*.whl | head -1)
        "$PY" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("tvm/lib/libtvm_runtime.so"))' \
            "$tvmwhl" "$DEVICE.tmp/lib/libtvm_runtime.so" || die "no tvm/lib/libtvm_runtime.so in $tvmwhl"
        "$PY" - "$DEVICE.tmp/lib/libtvm_runtime.so" "$DEVICE.tmp/site"/numpy/_core/_multiarray_umath*.so <<'EOF' ||
import sys
for f in sys.argv[1:]:                         # ELF e_machine 183 = EM_AARCH64
    if open(f, "rb").read(20)[18:20] != (183).to_bytes(2, "little"):
        sys.exit(f"{f} is not an aarch64 binary")
EOF
            die "the device install holds non-aarch64 binaries"
        rm -rf "$DEVICE"
        mv "$DEVICE.tmp" "$DEVICE"
        echo "$deps $tvm_pin" >"$CACHE/device.ok"
        echo "$record" >"$CACHE/bidiff.ok"
    fi

    # 3. A changed checkout: replace only bidiff (same command a Pi user runs to update).
    if [ "$(cat "$CACHE/bidiff.ok" 2>/dev/null)" != "$record" ]; then
        say "updating bidiff in $SITE"
        "$PY" -m pip install -q --disable-pip-version-check --no-deps --upgrade "${PIP_PLATFORM[@]}" \
            --target "$SITE" "$whl" >"$CACHE/pip-install.log" 2>&1 ||
            die "pip install --target of the bidiff wheel failed: see $CACHE/pip-install.log"
        echo "$record" >"$CACHE/bidiff.ok"
    fi
}

# Optional: onnxruntime for aarch64 in its own folder (the other backend; not in the footprint of
# the TVM install). `setup --onnxruntime`.
ensure_onnxruntime() {
    local ort
    ort=$("$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["onnxruntime"][0])
EOF
)
    [ "$(cat "$CACHE/ort.ok" 2>/dev/null)" = "$ort" ] && [ -d "$DEVICE/site-ort/onnxruntime" ] && return 0
    say "installing $ort for aarch64 into $DEVICE/site-ort"
    rm -rf "$DEVICE/site-ort"
    "$PY" -m pip install -q --disable-pip-version-check "${PIP_PLATFORM[@]}" --target "$DEVICE/site-ort" \
        "$ort" >"$CACHE/pip-ort.log" 2>&1 || die "pip install of aarch64 $ort failed (no network?): see $CACHE/pip-ort.log"
    echo "$ort" >"$CACHE/ort.ok"
}

# Optional: what `bidiff device-server` needs beyond the runtime install, in its own folder:
# apache-tvm (TVM's RPC server is Python code in it), psutil and cloudpickle. `setup --rpc`.
# pip --target resolves into an empty folder, so numpy and apache-tvm-ffi come again, at the same
# pins; $SITE comes first on the path. The apache-tvm wheel is the one already in $WHEELS.
ensure_rpc() {
    local lines rpc
    mapfile -t lines < <(pins)
    rpc="${lines[3]}"
    [ "$(cat "$CACHE/rpc.ok" 2>/dev/null)" = "$rpc" ] && [ -d "$RPC_SITE/tvm" ] && return 0
    say "installing $rpc for aarch64 into $RPC_SITE"
    rm -rf "$RPC_SITE"
    "$PY" -m pip install -q --disable-pip-version-check "${PIP_PLATFORM[@]}" --find-links "$WHEELS" \
        --target "$RPC_SITE" $rpc >"$CACHE/pip-rpc.log" 2>&1 ||
        die "pip install of the aarch64 RPC packages failed (no network?): see $CACHE/pip-rpc.log"
    echo "$rpc" >"$CACHE/rpc.ok"
}

# TVM's RPC server starts its worker as `sys.executable -m tvm.exec.popen_worker`, but an
# emulated program cannot exec an aarch64 binary without binfmt_misc (a host-wide setting this
# script leaves alone). So `rpc-server` tells the emulated Python (qemu -0) that it is this host
# script, which starts it again under qemu; the environment passes through.
write_guest_python() {
    local text
    text=$(printf '#!/bin/sh\nexec qemu-aarch64 -0 "$0" -L "%s" "%s" "$@"\n' "$SYSROOT" "$SYSROOT/usr/bin/python3.11")
    [ "$(cat "$GUEST_PY" 2>/dev/null)" = "$text" ] && return 0
    mkdir -p "$(dirname "$GUEST_PY")"
    printf '%s\n' "$text" >"$GUEST_PY.tmp" && chmod +x "$GUEST_PY.tmp" && mv "$GUEST_PY.tmp" "$GUEST_PY"
}

# qemu-user 7.2 (Debian bookworm) shows the guest the HOST's /proc/cpuinfo (x86 flags), so the
# runtime's target check would refuse every arm64 artifact ("needs CPU features ... (asimd)").
# qemu resolves a guest's absolute paths inside -L first, so $SYSROOT/proc/cpuinfo is what the
# guest reads: the text a Raspberry Pi 4 (64-bit OS) or 5 shows. ARM64_CPU=rpi4 (default) | rpi5.
write_cpuinfo() {
    local feats part
    case "${ARM64_CPU:-rpi4}" in
        rpi4) feats="fp asimd evtstrm crc32 cpuid"; part=0xd08 ;;
        rpi5) feats="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"; part=0xd0b ;;
        *) die "ARM64_CPU must be rpi4 or rpi5" ;;
    esac
    local text="" i
    for i in 0 1 2 3; do
        text+=$(printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 1\n\n' "$i" "$feats" "$part")
        text+=$'\n\n'
    done
    mkdir -p "$SYSROOT/proc"
    if [ "$(cat "$SYSROOT/proc/cpuinfo" 2>/dev/null)" != "$(printf '%s' "$text")" ]; then
        printf '%s' "$text" >"$SYSROOT/proc/cpuinfo.tmp" && mv "$SYSROOT/proc/cpuinfo.tmp" "$SYSROOT/proc/cpuinfo"
    fi
}

# The README's commands on the Pi, literally, in a venv under qemu: pip runs emulated and
# fetches the aarch64 wheels from PyPI itself (slow: a few minutes). One difference: the venv's
# ensurepip step re-executes the venv's python, which qemu-user cannot do without binfmt_misc,
# so the venv is made --without-pip and pip runs from the wheel ensurepip would install (the
# same pip); --no-compile skips the bytecode that is slow to write under emulation.
pi_venv() {
    check_ready
    write_cpuinfo
    local home="$CACHE/pi-home" whl pipwhl lines tvm_pin
    mapfile -t lines < <(pins)
    tvm_pin="${lines[2]}"
    whl=$(ls "$DIST"/bidiff-*.whl | head -1)
    pipwhl=$(ls "$SYSROOT"/usr/share/python-wheels/pip-*.whl | head -1)
    [ -n "$pipwhl" ] || die "no pip wheel in the sysroot: run scripts/arm64_emulate.sh setup"
    rm -rf "$home"
    mkdir -p "$home"
    cp "$whl" "$home/"
    local Q=(env -u PYTHONHOME -u PYTHONPATH HOME="$home" qemu-aarch64 -L "$SYSROOT") V="$home/bidiff-env"
    local PIP=("${Q[@]}" "$V/bin/python" "$pipwhl/pip")
    local t0=$SECONDS
    say "python3 -m venv ~/bidiff-env"
    "${Q[@]}" "$SYSROOT/usr/bin/python3.11" -m venv --without-pip "$V"
    say "pip install \"bidiff[tvm] @ file://\$HOME/$(basename "$whl")\" (emulated pip, from PyPI)"
    "${PIP[@]}" install -q --disable-pip-version-check --no-compile "bidiff[tvm] @ file://$home/$(basename "$whl")" ||
        die "emulated pip install failed (no network to PyPI?)"
    say "pip download --no-deps --only-binary=:all: -d /tmp/tvm-wheel $tvm_pin (emulated pip)"
    "${PIP[@]}" download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$home/tvm-wheel" "$tvm_pin" ||
        die "emulated pip download of $tvm_pin failed (no network to PyPI?)"
    "${Q[@]}" "$V/bin/python" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("tvm/lib/libtvm_runtime.so"))' \
        "$home"/tvm-wheel/apache_tvm-*.whl "$V/lib/libtvm_runtime.so"
    rm -r "$home/tvm-wheel"
    say "venv ready in $((SECONDS - t0)) s: $V ($(du -sm "$V" | cut -f1) MB; run: scripts/arm64_emulate.sh pi-run -- bidiff ...)"
}

pi_run() {
    local V="$CACHE/pi-home/bidiff-env"
    [ -x "$V/bin/python" ] && [ -f "$V/bin/bidiff" ] || die "no emulated Pi venv: run scripts/arm64_emulate.sh pi-venv first"
    write_cpuinfo
    [ "${1:-}" = "--" ] && shift
    local pre=()
    case "${1:-}" in
        bidiff) shift; pre=("$V/bin/bidiff") ;;
        python|python3|python3.11) shift ;;
        *) die "usage: scripts/arm64_emulate.sh pi-run -- bidiff ARGS... | python3 ARGS..." ;;
    esac
    # `. ~/bidiff-env/bin/activate` with the README's BIDIFF_TVM_RUNTIME line
    exec env -u PYTHONHOME -u PYTHONPATH BIDIFF_TVM_RUNTIME="$V/lib/libtvm_runtime.so" VIRTUAL_ENV="$V" \
        qemu-aarch64 -L "$SYSROOT" "$V/bin/python" "${pre[@]}" "$@"
}

setup() {
    mkdir -p "$CACHE"
    local t0=$SECONDS
    ensure_qemu
    ensure_cross
    ensure_sysroot
    write_cpuinfo
    ensure_device
    local opt
    for opt in "$@"; do
        case "$opt" in
            --onnxruntime) ensure_onnxruntime ;;
            --rpc) ensure_rpc ;;
            *) die "setup: unknown option $opt (--onnxruntime, --rpc)" ;;
        esac
    done
    say "ready in $((SECONDS - t0)) s: $CACHE (run: scripts/arm64_emulate.sh run -- bidiff ...)"
}

check_ready() {
    command -v qemu-aarch64 >/dev/null 2>&1 || die "qemu-aarch64 not found: run scripts/arm64_emulate.sh setup (or apt-get install qemu-user)"
    [ -x "$SYSROOT/usr/bin/python3.11" ] && [ -d "$SITE/bidiff" ] ||
        die "no emulated device in $CACHE: run scripts/arm64_emulate.sh setup first"
}

run() {
    check_ready
    write_cpuinfo
    [ "${1:-}" = "--" ] && shift
    [ $# -ge 1 ] || die "usage: scripts/arm64_emulate.sh run -- bidiff ARGS... | python3 ARGS..."
    local cmd="$1"; shift
    local path="$SITE"
    [ -n "${ARM64_ONNXRUNTIME:-}" ] && path="$path:$DEVICE/site-ort"
    local argv0=()
    [ -n "${ARM64_RPC:-}" ] && { path="$path:$RPC_SITE"; argv0=(-0 "$GUEST_PY"); }
    local pre=()
    case "$cmd" in
        bidiff) pre=("$SITE/bin/bidiff") ;;        # the console script: bidiff.runtime.cli:main
        python|python3|python3.11) ;;
        *) die "run: unknown command $cmd (bidiff or python3)" ;;
    esac
    exec qemu-aarch64 "${argv0[@]}" -L "$SYSROOT" \
        -E PYTHONHOME="$SYSROOT/usr" -E PYTHONPATH="$path" \
        -E BIDIFF_TVM_RUNTIME="${BIDIFF_TVM_RUNTIME:-$TVM_RUNTIME}" \
        -E LC_ALL=C.UTF-8 -E PYTHONNOUSERSITE=1 \
        "$SYSROOT/usr/bin/python3.11" "${pre[@]}" "$@"
}

# `bidiff device-server ARGS` on the emulated device, in the foreground (stop it with SIGTERM, or
# kill its process group: the server's worker and sessions are emulated processes of that group).
rpc_server() {
    check_ready
    ensure_rpc
    write_guest_python
    [ "${1:-}" = "--" ] && shift
    ARM64_RPC=1 run -- bidiff device-server "$@"
}

case "${1:-setup}" in
    setup) shift || true; setup "$@" ;;
    run) shift; run "$@" ;;
    pi-venv) pi_venv ;;
    pi-run) shift; pi_run "$@" ;;
    rpc-server) shift; rpc_server "$@" ;;
    footprint) check_ready; "$PY" "$REPO/scripts/footprint.py" --device "$DEVICE" --sysroot "$SYSROOT" "${@:2}" ;;
    paths) echo "CACHE=$CACHE"; echo "SYSROOT=$SYSROOT"; echo "SITE=$SITE"; echo "TVM_RUNTIME=$TVM_RUNTIME" ;;
    -h|--help|help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command $1 (setup, run, rpc-server, footprint, paths, pi-venv, pi-run)" ;;
esac
