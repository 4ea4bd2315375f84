#!/usr/bin/env bash
# Builds llama.cpp's own llama-server, the peer the benchmarks compare lorad against, from the
# llama.cpp tree inside the llama-cpp-python sdist that lorad pins, for this CPU
# (-DGGML_NATIVE=ON: 4-8 minutes on 2 cores), into DEST (default ~/.cache/lorad/llama-server).
# A binary built for another CPU can die with SIGILL here (AVX-512 on an AVX2-only machine):
# it is rebuilt when the CPU it was built for (model and flags, kept beside it) differs.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-$HOME/.cache/lorad/llama-server}"
PIN="$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
CPU="$(grep -m1 '^model name' /proc/cpuinfo || true) $(grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)"
if [ -x "$DEST/llama-server" ] && [ "$(cat "$DEST/cpu" 2>/dev/null)" = "$CPU" ]; then
  echo "$DEST/llama-server is built for this CPU"; exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-binary :all: --no-deps "$PIN" -d "$WORK"
tar xzf "$WORK"/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$SRC" -B "$WORK/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$WORK/build" --target llama-server -j"$(nproc)"
mkdir -p "$DEST"
cp "$WORK"/build/bin/llama-server "$DEST/"
echo "$CPU" > "$DEST/cpu"
"$DEST/llama-server" --version
