#!/usr/bin/env bash
# Fetches Fashion-MNIST into data/fashion-mnist/ from the Debian package dataset-fashion-mnist
# (apt-get download, then dpkg-deb -x; no root needed beyond what apt-get download needs) and
# checks every file against its known SHA-256. Training never downloads anything itself.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=data/fashion-mnist
declare -A sha=(
    [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
    [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)

verify() {
    local ok=0
    for f in "${!sha[@]}"; do
        if [ ! -f "$dest/$f" ] || [ "$(sha256sum "$dest/$f" | cut -d' ' -f1)" != "${sha[$f]}" ]; then
            ok=1
        fi
    done
    return $ok
}

if verify; then
    echo "Fashion-MNIST already in $dest (checksums match)"
    exit 0
fi

for tool in apt-get dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (a Debian/Ubuntu system is needed)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
    cd "$work"
    if ! apt-get download dataset-fashion-mnist; then
        echo "error: apt-get download dataset-fashion-mnist failed; run 'apt-get update' first" >&2
        exit 1
    fi
)
deb=$(ls "$work"/dataset-fashion-mnist_*.deb)
dpkg-deb -x "$deb" "$work/root"

mkdir -p "$dest"
for f in "${!sha[@]}"; do
    src="$work/root/usr/share/datasets/fashion-mnist/$f"
    [ -f "$src" ] || { echo "error: $f not found in $deb" >&2; exit 1; }
    got=$(sha256sum "$src" | cut -d' ' -f1)
    if [ "$got" != "${sha[$f]}" ]; then
        echo "error: $f has SHA-256 $got, expected ${sha[$f]}" >&2
        exit 1
    fi
    cp "$src" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
done
echo "Fashion-MNIST written to $dest (checksums verified)"
