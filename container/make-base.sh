#!/bin/sh
# Make a Debian base image with no image registry: debootstrap (minbase) from the Debian package
# registry, trimmed like debian:bookworm-slim (no docs, man pages, locales, apt lists), then
# `podman import`. Used by `make container-base` when the image is absent; needs root.
#   container/make-base.sh IMAGE WORKDIR [MIRROR] [PODMAN...]
set -eu
image=$1 work=$2 mirror=${3:-http://deb.debian.org/debian}
shift 3 2>/dev/null || shift $#
[ $# -gt 0 ] || set -- podman
rootfs=$work/rootfs
rm -rf "$rootfs"
mkdir -p "$work"
echo "debootstrap --variant=minbase bookworm ($mirror; about 30 s)"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
printf '%s\n' "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >"$rootfs/etc/apt/sources.list"
# What later apt-get installs (the Dockerfile's python3) leave out, as in the slim images.
printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    'path-include /usr/share/locale/locale.alias' >"$rootfs/etc/dpkg/dpkg.cfg.d/imgclf-slim"
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log \
    "$rootfs"/var/log/apt/*
tar -C "$rootfs" -c . | "$@" import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
rm -rf "$rootfs"
echo "made $image: $("$@" image inspect --format '{{.Size}}' "$image") bytes"
