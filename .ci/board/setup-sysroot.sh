#!/usr/bin/env bash
# Builds an emulated aarch64 "board" for tvmq's RPC tests: Debian's qemu-user, an arm64
# Python 3.11 sysroot unpacked from Debian packages, and the aarch64 wheels of the TVM
# runtime, all under ${TVMQ_BOARD_DIR:-$HOME/.cache/tvmq-board}. Idempotent: a second run
# with the same package lists only checks the stamp and the interpreter (a few seconds).
#
# Result:  $TVMQ_BOARD_DIR/bin/board-python  runs the arm64 python3.11 under qemu with the
#          wheels on its path (and as its own sys.executable, which TVM's RPC server re-runs).
# Needs:   root (apt-get), network access to the Debian mirror and PyPI.
set -euo pipefail

BOARD_DIR=${TVMQ_BOARD_DIR:-$HOME/.cache/tvmq-board}
HOST_PYTHON=${PYTHON:-python3}
# The arm64 Debian packages that python3.11 and libtvm_runtime need (closure of
# python3.11-minimal, libpython3.11-stdlib and libstdc++6, minus dpkg/tar/perl tooling).
DEBS="libc6 libgcc-s1 gcc-12-base libstdc++6 zlib1g libbz2-1.0 libcrypt1 libdb5.3 libexpat1
  libffi8 liblzma5 libncursesw6 libtinfo6 libnsl2 libtirpc3 libgssapi-krb5-2 libk5crypto3
  libkrb5-3 libkrb5support0 libkeyutils1 libcom-err2 libreadline8 libsqlite3-0 libssl3
  libuuid1 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal"
# Same TVM pins as pyproject.toml (apache-tvm-ffi 0.1.15 segfaults with TVM 0.27).
WHEELS="apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml_dtypes==0.6.0
  typing_extensions==4.15.0 cloudpickle==3.1.3 tornado==6.6.1 psutil==7.2.2"

stamp_text=$(printf '%s\n' "format 2" $DEBS $WHEELS)
stamp="$BOARD_DIR/setup.stamp"
board_python="$BOARD_DIR/bin/board-python"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ] && [ -x "$board_python" ] \
   && [ -f "$BOARD_DIR/site/tvm/__init__.py" ] && "$board_python" -c "import sys" 2>/dev/null; then
  echo "tvmq board: $BOARD_DIR is up to date"
  exit 0
fi

log() { echo "tvmq board: $*"; }
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive

# 1. qemu-user and the arm64 package index (host side, needs root).
need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  log "adding dpkg architecture arm64"
  dpkg --add-architecture arm64
  need_update=1
fi
if ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  need_update=0
  apt-get install -y -qq --no-install-recommends qemu-user >/dev/null
fi
[ "$need_update" = 1 ] && apt-get update -qq

# 2. Sysroot: download the arm64 .debs and unpack them (no dpkg database, no scripts).
mkdir -p "$BOARD_DIR"
work=$(mktemp -d "$BOARD_DIR/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/sysroot" "$work/site" "$work/boot" "$work/bin"
log "downloading $(echo $DEBS | wc -w) arm64 packages"
pkgs=$(for p in $DEBS; do printf '%s:arm64 ' "$p"; done)
(cd "$work/debs" && apt-get download -qq $pkgs 2>&1 | grep -v "unsandboxed as root" || true)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/sysroot"; done
[ -x "$work/sysroot/usr/bin/python3.11" ] || { echo "tvmq board: python3.11 missing from the sysroot" >&2; exit 1; }

# 3. The aarch64 wheels, unpacked into a plain directory the board puts on its sys.path.
log "downloading aarch64 wheels"
"$HOST_PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  --no-compile --target "$work/site" \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
  --only-binary=:all: --no-deps $WHEELS

# A board runs the TVM runtime only (as a real Pi would): the 240 MB compiler library is
# never loaded there (TVM_USE_RUNTIME_LIB=1 below), so it is not kept.
rm -f "$work/site/tvm/lib/libtvm_compiler.so"

# 4. The launcher. TVM's RPC server and tracker re-run sys.executable (tvm.exec.popen_worker),
# so sitecustomize points sys.executable at this wrapper instead of the bare arm64 binary.
cat > "$work/boot/sitecustomize.py" <<'PY'
import os
import sys

_launcher = os.environ.get("TVMQ_BOARD_PYTHON")
if _launcher:
    sys.executable = _launcher
PY

# Bytecode compiled ahead: under emulation, compiling TVM's and the stdlib's sources on
# every start made `import tvm` take about 20 s instead of about 3 s. Debian's packages ship
# no .pyc (postinst makes them); CPython 3.11.x releases share one bytecode format.
if "$HOST_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "compiling bytecode"
  "$HOST_PYTHON" -m compileall -q -j 0 "$work/sysroot/usr/lib/python3.11" "$work/site" \
    "$work/boot" >/dev/null || true  # a few test files in the stdlib do not compile; harmless
fi

rm -rf "$BOARD_DIR/sysroot" "$BOARD_DIR/site" "$BOARD_DIR/boot" "$BOARD_DIR/bin"
mv "$work/sysroot" "$work/site" "$work/boot" "$work/bin" "$BOARD_DIR/"
cat > "$board_python" <<SH
#!/bin/sh
# arm64 python3.11 under qemu-user, with the TVM runtime wheels (made by setup-sysroot.sh).
export TVMQ_BOARD_PYTHON="$board_python"
export PYTHONPATH="$BOARD_DIR/boot:$BOARD_DIR/site"
export PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1
unset PYTHONHOME
exec qemu-aarch64 -L "$BOARD_DIR/sysroot" "$BOARD_DIR/sysroot/usr/bin/python3.11" "\$@"
SH
chmod +x "$board_python"

# 5. Smoke test: the emulated interpreter imports the TVM runtime.
log "checking: import tvm under qemu-aarch64"
t0=$(date +%s)
"$board_python" -c "import platform, tvm, tvm.rpc, numpy; print('tvmq board: aarch64 check:', platform.machine(), 'tvm', tvm.__version__, 'numpy', numpy.__version__)"
log "import tvm under emulation took $(( $(date +%s) - t0 )) s"
printf '%s\n' "$stamp_text" > "$stamp"
log "done in $(( $(date +%s) - start )) s: $board_python"
