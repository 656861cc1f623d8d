#!/usr/bin/env bash
# Linux only: install OpenBLAS so mlx's CPU build stops using its reference BLAS (~50x slower
# matmuls). moebus preloads it by itself once installed. Best effort: never fails the build.
[ "$(uname -s)" = Linux ] || exit 0
for lib in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0 \
           /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
  [ -f "$lib" ] && exit 0
done
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
    && echo "moebus: installed OpenBLAS (libopenblas0-pthread) for mlx's CPU build" && exit 0
fi
echo "moebus: for fast CPU matmuls install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread)" >&2
exit 0
