#!/usr/bin/env bash
# Builds the tiny test guest: .deps/guest/vmlinuz and .deps/guest/initrd.img.
# The initramfs holds busybox-static, iperf3 and ethtool (with their shared libraries), the
# virtio-net modules of the Debian kernel, and scripts/guest-init as /init.
# Idempotent: does nothing when both outputs are newer than this script and guest-init.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/.deps/guest"
init="$here/scripts/guest-init"
mkdir -p "$out"

up_to_date() {
  local f
  for f in "$out/vmlinuz" "$out/initrd.img"; do
    [ -s "$f" ] || return 1
    [ "$f" -nt "$0" ] && [ "$f" -nt "$init" ] || return 1
  done
}
if up_to_date; then echo "guest up to date: $out"; exit 0; fi

for bin in busybox iperf3 ethtool cpio; do
  command -v "$bin" >/dev/null || { echo "missing $bin: run scripts/install-deps.sh" >&2; exit 1; }
done

# Kernel: the exact package the linux-image-amd64 metapackage points at, unpacked, not installed.
kdir="$out/kernel"
if [ ! -d "$kdir/boot" ]; then
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kpkg" ] || { apt-get update -q >/dev/null; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); }
  [ -n "$kpkg" ] || { echo "cannot resolve the kernel package of linux-image-amd64" >&2; exit 1; }
  tmp=$(mktemp -d); chmod 755 "$tmp" # so apt's _apt user can write the download
  (cd "$tmp" && apt-get download -q "$kpkg" >/dev/null)
  rm -rf "$kdir"; mkdir -p "$kdir"
  dpkg -x "$tmp"/*.deb "$kdir"
  rm -rf "$tmp"
fi
kver=$(ls "$kdir/lib/modules" | head -1)

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib64,lib/x86_64-linux-gnu}
cp "$(command -v busybox)" "$root/bin/busybox"
for bin in iperf3 ethtool; do
  src=$(command -v "$bin")
  cp "$src" "$root/bin/"
  # Copy each shared library (and the loader) under its own path.
  for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
# Only the virtio/net modules the init loads (keeps the initramfs small).
mdst="$root/lib/modules/$kver"
mkdir -p "$mdst"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net; do
  f=$(find "$kdir/lib/modules/$kver" -name "$m.ko*" | head -1)
  if [ -n "$f" ]; then
    case "$f" in
      *.ko.xz) xz -dc "$f" >"$mdst/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" >"$mdst/$m.ko" ;;
      *) cp "$f" "$mdst/" ;;
    esac
  fi
done
cp "$init" "$root/init"; chmod 755 "$root/init"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -6) >"$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz"
touch "$out/vmlinuz" "$out/initrd.img"
echo "guest built: $out (kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1))"
