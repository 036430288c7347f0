#!/usr/bin/env bash
# Runs the kernel tests on the AVX-512 paths on a machine without AVX-512: the tests boot in
# Bochs (Debian's bochs 2.7, an emulated Skylake-X: AVX-512 F/CD/BW/DQ/VL, no BF16) under
# Debian's cloud kernel, with an initramfs holding busybox and the release test binaries of
# diffuse-models (its `ops::` unit tests, and `tests/kernels.rs` but for the convolutions).
# Those tests compare the AVX-512 tiles and exponentials with the AVX2 ones bit for bit, and
# every path with scalar references; on this emulated CPU `kernels()` picks AVX-512, so the
# layer tests run on it. Everything comes from Debian's packages. Slow, since Bochs interprets
# every instruction: about 15 minutes on a 2-core machine (6 to boot, 3 for the unit tests, 5
# for kernels.rs); the convolution cases, whose candle references are the slowest, are left
# out (their GEMMs run on the tiles `gemm_matches_naive` checks): AVX512_KERNEL_TESTS=conv_
# runs them instead. Exit status 0 when both test binaries exit 0. Needs root for apt-get
# (skipped when the tools are there).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${AVX512_WORK:-$PWD/target/avx512-emulated}
TIMEOUT=${AVX512_TIMEOUT:-5400}
# Arguments of the kernels.rs binary (a libtest filter): by default all but the convolutions.
FILTER=${AVX512_KERNEL_TESTS:---skip conv_}
mkdir -p "$WORK" && rm -rf "$WORK/root" "$WORK/iso" "$WORK/serial.txt"

if ! command -v bochs >/dev/null || ! command -v xorriso >/dev/null; then
    apt-get install -y -q bochs bochsbios vgabios xorriso >/dev/null
fi
if [ ! -x "$WORK/pkgs/bin/busybox" ]; then
    kernel=$(apt-cache depends linux-image-cloud-amd64 |
        awk '/Depends: linux-image-/ {print $2; exit}')
    (cd "$WORK" &&
        apt-get download -q "$kernel" busybox-static isolinux syslinux-common >/dev/null 2>&1)
    for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/pkgs"; done
    rm -f "$WORK"/*.deb
fi

# The test binaries, as cargo names them.
binaries=$(cargo test --release -p diffuse-models --lib --test kernels --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\))$/\1/p')
unit=$(echo "$binaries" | grep '/diffuse_models-')
kernels=$(echo "$binaries" | grep '/kernels-')

root=$WORK/root
mkdir -p "$root"/{bin,proc,sys,dev,t,lib64,lib/x86_64-linux-gnu} "$WORK/iso/isolinux"
cp "$WORK/pkgs/bin/busybox" "$root/bin/"
for tool in sh mount grep sort tr poweroff uname sleep sync; do
    ln -sf busybox "$root/bin/$tool"
done
cp "$unit" "$root/t/unit" && cp "$kernels" "$root/t/kernels"
libs=$(ldd "$unit" "$kernels" | awk '/=> \// {print $3} /^\t\/lib64/ {print $1}' | sort -u)
for lib in $libs; do
    cp -L "$lib" "$root$lib"
done
cat > "$root/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "== cpu flags: $(grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "== ops:: unit tests"
/t/unit ops:: --test-threads=1 2>&1
echo "== exit $?"
echo "== tests/kernels.rs @FILTER@"
/t/kernels --test-threads=1 @FILTER@ 2>&1
echo "== exit $?"
# The console drains before the power goes (it cut the last line once).
sync
sleep 2
poweroff -f
EOF
sed -i "s|@FILTER@|$FILTER|" "$root/init" && chmod +x "$root/init"
(cd "$root" && find . | "$WORK/pkgs/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -1 > "$WORK/iso/initrd.img"
cp "$WORK"/pkgs/boot/vmlinuz-* "$WORK/iso/vmlinuz"
cp "$WORK/pkgs/usr/lib/ISOLINUX/isolinux.bin" \
    "$WORK/pkgs/usr/lib/syslinux/modules/bios/ldlinux.c32" "$WORK/iso/isolinux/"
# clearcpuid=321,323 (XSAVEC, XSAVES): Bochs 2.7 reports the size of the compacted XSAVE area
# wrongly, and Linux 6.1 then turns XSAVE off, AVX and AVX-512 with it; the standard format
# is right.
cat > "$WORK/iso/isolinux/isolinux.cfg" <<'EOF'
default linux
prompt 0
timeout 0
label linux
  kernel /vmlinuz
  append initrd=/initrd.img console=ttyS0 panic=-1 rdinit=/init clearcpuid=321,323
EOF
rm -f "$WORK/test.iso"
xorriso -as mkisofs -quiet -o "$WORK/test.iso" -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table "$WORK/iso" 2>/dev/null
cat > "$WORK/bochsrc" <<EOF
megs: 768
cpu: model=corei7_skylake_x, count=1, ips=400000000
clock: sync=none, time0=local
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
display_library: rfb, options="timeout=0"
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=cdrom, path=$WORK/test.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$WORK/serial.txt
log: $WORK/bochs.log
panic: action=fatal
error: action=ignore
info: action=ignore
mouse: enabled=0
EOF
# Debian's bochs is built with its debugger, which waits for a command first. Its builds have
# no display-less GUI: the VNC one, waiting for no viewer, is the one that needs no terminal
# (the terminal one stopped the emulation once its output went unread).
printf 'c\nquit\n' > "$WORK/debugger-commands"
timeout "$TIMEOUT" bochs -q -f "$WORK/bochsrc" -rc "$WORK/debugger-commands" </dev/null \
    >"$WORK/bochs.out" 2>&1 || true
touch "$WORK/serial.txt"
sed -n '/^== /,$p' "$WORK/serial.txt" | grep -v '^\[ *[0-9.]*\] ' || true
passed=$(grep -c '^== exit 0' "$WORK/serial.txt" || true)
if grep -q '^== cpu flags: .*avx512f' "$WORK/serial.txt" && [ "$passed" = 2 ]; then
    echo "AVX-512 kernel tests passed under emulation"
else
    echo "AVX-512 kernel tests did not all pass (see $WORK/serial.txt)" >&2
    exit 1
fi
