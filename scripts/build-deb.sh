#!/usr/bin/env bash
# Builds target/deb/vutap_VERSION_ARCH.deb from the release build: the daemon, its systemd
# unit template, example configuration, a man page and bash/zsh/fish completions (generated
# from the daemon's clap definitions by `vutap-gen`). Prints the .deb's path.
#
# dpkg-deb by hand rather than cargo-deb: nothing to install or compile first (cargo-deb is a
# crate of its own to build), and the package's layout is spelled out here in a few lines.
# Reuses target/release when it is up to date (cargo only relinks what changed).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p vutap --bin vutap -p vutap-pkg --bin vutap-gen

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
arch="$(dpkg --print-architecture)"
bin="$target/release/vutap"
# The newest glibc symbol version the binary uses: the oldest libc6 it runs on.
glibc="$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)"

stage="$target/deb/vutap_${version}_${arch}"
rm -rf "$stage"
install -d "$stage/DEBIAN"
# Debug info is for the build tree; the installed binary is stripped of it.
install -D -m 0755 "$bin" "$stage/usr/bin/vutap"
strip --strip-debug "$stage/usr/bin/vutap"
install -d "$stage/usr/lib/systemd/system"
sed 's|/usr/local/bin/vutap|/usr/bin/vutap|g' examples/systemd/vutap@.service > "$stage/usr/lib/systemd/system/vutap@.service"
chmod 0644 "$stage/usr/lib/systemd/system/vutap@.service"
doc="$stage/usr/share/doc/vutap"
install -D -m 0644 examples/vutap.conf "$doc/examples/vutap.conf"
install -D -m 0644 examples/systemd/vm0.env "$doc/examples/vm0.env"
install -D -m 0644 examples/grafana/vutap.json "$doc/examples/grafana-vutap.json"
cat > "$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vutap
License: Apache-2.0 OR BSD-3-Clause
COPYRIGHT
"$target/release/vutap-gen" man "$stage/usr/share/man/man1" >/dev/null
gzip -9n "$stage/usr/share/man/man1/vutap.1"
"$target/release/vutap-gen" completions "$stage/usr/share" >/dev/null

cat > "$stage/DEBIAN/control" <<CONTROL
Package: vutap
Version: $version
Architecture: $arch
Maintainer: vutap developers <vutap@localhost>
Depends: libc6 (>= $glibc), libgcc-s1
Section: net
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Description: vhost-user-net backend on macvtap/tap
 Moves a VM's virtio-net frames between a vhost-user socket (QEMU,
 cloud-hypervisor, libvirt) and a macvtap or tap, one worker thread per
 queue pair, under seccomp, with a Prometheus endpoint.
CONTROL
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
# The unit starts vutap as root to open the tap and bind the socket, then drops to this user.
if [ "$1" = configure ] && ! getent passwd vutap >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vutap
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
POSTINST
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
(cd "$stage" && find usr -type f -print0 | sort -z | xargs -0 md5sum) > "$stage/DEBIAN/md5sums"

deb="$target/deb/vutap_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
