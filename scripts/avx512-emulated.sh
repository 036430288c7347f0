#!/usr/bin/env bash
# Runs the kernel tests on the AVX-512 paths on a machine without AVX-512: the tests boot in
# Bochs 3.0 (Debian 13's package) under Debian 12's cloud kernel, with an initramfs holding
# busybox and the release test binaries of diffuse-models: its `ops::` unit tests and
# `tests/kernels.rs`. Those compare the AVX-512 tiles and exponentials with the AVX2 ones bit
# for bit, the bf16 tiles (`vdpbf16ps`) and every other path with scalar references; on the
# emulated CPU `kernels()` picks AVX-512, so the layer tests run on it. Two CPUs, one boot
# each: a Skylake-X (AVX-512 F/CD/BW/DQ/VL: the f32 kernels) and a Sapphire Rapids (also
# AVX512-BF16: `kernels()` picks `avx512bf16`); AVX512_CPUS picks others. AVX512_KERNEL_TESTS
# passes a libtest filter to the kernels.rs binary. Everything comes from Debian's packages.
# About 15 minutes on a 2-core machine, the build included (Bochs interprets every
# instruction). Exit status 0 when, on every CPU, both test binaries exit 0 and the guest shows the
# model's AVX-512 flags. Needs root for apt-get (skipped when the tools are there).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${AVX512_WORK:-$PWD/target/avx512-emulated}
TIMEOUT=${AVX512_TIMEOUT:-3600}
FILTER=${AVX512_KERNEL_TESTS:-}
CPUS=${AVX512_CPUS:-corei7_skylake_x sapphire_rapids}
mkdir -p "$WORK" && rm -rf "$WORK/root" "$WORK/iso" "$WORK"/serial-*.txt

# The flags the guest must show, and the CPU features its kernel must not use. Every model:
# XSAVEC and XSAVES (321, 323), since Bochs 2.7 reported the compacted XSAVE area's size
# wrongly and Linux 6.1 then turned XSAVE off, and AVX with it (the standard format is right;
# kept for 3.0). The Sapphire Rapids also: FSRM (580) and 5-level paging, with which Linux
# stops early in its boot on Bochs 3.0 (at the security modules, and after the mount caches).
# Neither is an AVX-512 feature.
model() {
    case $1 in
        sapphire_rapids)
            want="avx512f avx512_bf16"
            kernel_args="clearcpuid=321,323,580 no5lvl"
            ;;
        *)
            want="avx512f"
            kernel_args="clearcpuid=321,323"
            ;;
    esac
}

# Bochs 3.0 is Debian 13's (Debian 12 has 2.7, whose newest models have no BF16): its
# packages are fetched with apt under a private configuration (the suite's signature checked
# against the system's Debian keyring, the system's sources untouched) and unpacked under
# $WORK/bochs, with Debian 13's C library, which the binary needs (2.38; Debian 12 has
# 2.36), run through its own loader. Its other libraries come from the system's packages.
for need in xorriso:xorriso libgtk-3.so.0:libgtk-3-0 libpulse.so.0:libpulse0 \
    libasound.so.2:libasound2 libreadline.so.8:libreadline8 libltdl.so.7:libltdl7; do
    if ! command -v "${need%%:*}" >/dev/null && ! ldconfig -p | grep -q "${need%%:*} "; then
        apt-get install -y -q "${need##*:}" >/dev/null
    fi
done
bochs=$WORK/bochs
if [ ! -x "$bochs/usr/bin/bochs-bin" ]; then
    apt=$WORK/apt
    mkdir -p "$apt/parts" "$apt/lists/partial" "$apt/cache" "$apt/debs"
    cat > "$apt/parts/trixie.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/parts"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1)
    apt-get "${opts[@]}" update -q >/dev/null
    (cd "$apt/debs" && apt-get "${opts[@]}" download -q bochs bochsbios vgabios libc6 \
        libstdc++6 libgcc-s1 libsamplerate0 >/dev/null 2>&1)
    for deb in "$apt"/debs/*.deb; do dpkg-deb -x "$deb" "$bochs"; done
    rm -rf "$apt"
fi
libdir=$bochs/usr/lib/x86_64-linux-gnu
run_bochs=(env "LTDL_LIBRARY_PATH=$libdir/bochs/plugins" "$libdir/ld-linux-x86-64.so.2"
    --library-path "$libdir:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"
    "$bochs/usr/bin/bochs-bin" -q)
if [ ! -x "$WORK/pkgs/bin/busybox" ]; then
    kernel=$(apt-cache depends linux-image-cloud-amd64 |
        awk '/Depends: linux-image-/ {print $2; exit}')
    (cd "$WORK" &&
        apt-get download -q "$kernel" busybox-static isolinux syslinux-common >/dev/null 2>&1)
    for deb in "$WORK"/*.deb; do dpkg-deb -x "$deb" "$WORK/pkgs"; done
    rm -f "$WORK"/*.deb
fi

# The test binaries, as cargo names them. `avx512-emulation`: Bochs 3.0 reads the memory
# operand of `vdpbf16ps` from the wrong address when its displacement is compressed
# (disp8·64, e.g. `0x40(%rax)`), the form the compiler folds a one-row bf16 tile's panel
# loads into (the bf16 product and convolution tests then fail at those tiles); with the
# feature the tiles keep those loads in registers (cargo keeps the usual builds apart).
binaries=$(cargo test --release -p diffuse-models \
    --features avx512-emulation --lib --test kernels --no-run 2>&1 |
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
# Debian's bochs is built with its debugger, which waits for a command first. Its builds have
# no display-less GUI: the VNC one, waiting for no viewer, is the one that needs no terminal
# (the terminal one stopped the emulation once its output went unread).
printf 'c\nquit\n' > "$WORK/debugger-commands"
failed=""
for cpu in $CPUS; do
    model "$cpu"
    serial=$WORK/serial-$cpu.txt
    cat > "$WORK/iso/isolinux/isolinux.cfg" <<EOF
default linux
prompt 0
timeout 0
label linux
  kernel /vmlinuz
  append initrd=/initrd.img console=ttyS0 panic=-1 rdinit=/init $kernel_args
EOF
    rm -f "$WORK/test.iso"
    xorriso -as mkisofs -quiet -o "$WORK/test.iso" -b isolinux/isolinux.bin \
        -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 -boot-info-table "$WORK/iso" \
        2>/dev/null
    cat > "$WORK/bochsrc" <<EOF
megs: 768
cpu: model=$cpu, count=1, ips=400000000
clock: sync=none, time0=local
romimage: file=$bochs/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=$bochs/usr/share/vgabios/vgabios.bin
display_library: rfb, options="timeout=0"
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=cdrom, path=$WORK/test.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$serial
log: $WORK/bochs.log
panic: action=fatal
error: action=ignore
info: action=ignore
mouse: enabled=0
EOF
    echo "=== $cpu"
    timeout "$TIMEOUT" "${run_bochs[@]}" -f "$WORK/bochsrc" -rc "$WORK/debugger-commands" \
        </dev/null >"$WORK/bochs.out" 2>&1 || true
    touch "$serial"
    sed -n '/^== /,$p' "$serial" | grep -v '^\[ *[0-9.]*\] ' || true
    passed=$(grep -c '^== exit 0' "$serial" || true)
    flags=$(sed -n 's/^== cpu flags: //p' "$serial")
    missing=""
    for flag in $want; do
        case " $flags " in *" $flag "*) ;; *) missing="$missing $flag" ;; esac
    done
    if [ -z "$missing" ] && [ "$passed" = 2 ]; then
        echo "=== $cpu: passed ($want)"
    else
        echo "=== $cpu: failed (flags missing:${missing:- none}; see $serial)" >&2
        failed="$failed $cpu"
    fi
done
if [ -n "$failed" ]; then
    echo "AVX-512 kernel tests did not all pass under emulation on:$failed" >&2
    exit 1
fi
echo "AVX-512 kernel tests passed under emulation on: $CPUS"
