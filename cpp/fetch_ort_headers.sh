#!/usr/bin/env bash
# ONNX Runtime's C/C++ API headers (MIT, ORT API version 29) from the npm package
# com.github.asus4.onnxruntime@0.4.9: its Android archive carries them under headers/.
# The shared library comes from the onnxruntime wheel (>= 1.29 serves API 29); only the
# headers are fetched here, into DEST (default ~/.cache/locllm/ort-headers-0.4.9), once.
set -euo pipefail
VERSION=0.4.9
SHA256=e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d
DEST=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/locllm/ort-headers-$VERSION}
if [ -f "$DEST/onnxruntime_cxx_api.h" ]; then echo "$DEST"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "com.github.asus4.onnxruntime@$VERSION" >/dev/null)
tarball="$work/com.github.asus4.onnxruntime-$VERSION.tgz"
echo "$SHA256  $tarball" | sha256sum -c --quiet - >&2
tar -xzf "$tarball" -C "$work" package/Plugins/Android/onnxruntime.aar
unzip -q -o "$work/package/Plugins/Android/onnxruntime.aar" 'headers/*' -d "$work/aar"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.partial" && mv "$work/aar/headers" "$DEST.partial" && mv "$DEST.partial" "$DEST"
echo "$DEST"
