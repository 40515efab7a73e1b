#!/usr/bin/env bash
# Builds a minimal Debian bookworm base image from Debian's own mirror, for building
# deploy/Dockerfile where no registry can be reached (nothing can be pulled here):
#
#   scripts/build-base-image.sh [TAG]          (default autoserve-base:bookworm)
#   docker build --network host --build-arg BASE=autoserve-base:bookworm -f deploy/Dockerfile .
#
# debootstrap --variant=minbase, then security updates, then docs, man pages, locales and
# apt's lists and caches removed (dpkg is told to keep leaving them out, as Debian's
# official slim images do), then `docker import`. Idempotent: an existing TAG is kept
# (remove it with `docker rmi TAG` to rebuild). Needs root, debootstrap and a Docker engine
# (scripts/ensure-system.sh installs and starts both).
set -euo pipefail

tag=${1:-autoserve-base:bookworm}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists; not rebuilt"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-base-image.sh: needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-base-image.sh: debootstrap missing; run scripts/ensure-system.sh" >&2; exit 1; }

started=$SECONDS
work=$(mktemp -d /var/tmp/autoserve-base.XXXXXX)
root=$work/rootfs
cleanup() {
  mountpoint -q "$root/proc" && umount "$root/proc"
  rm -rf "$work"
}
trap cleanup EXIT

echo "debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# What later `apt-get install`s in the image leave out, and apt without caches.
cat >"$root/etc/dpkg/dpkg.cfg.d/autoserve-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$root/etc/apt/apt.conf.d/autoserve-slim" <<'EOF'
APT::Install-Recommends "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
EOF
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF

echo "security and point-release updates"
mount -t proc proc "$root/proc"
chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
  >"$work/upgrade.log" 2>&1 || { tail -n 30 "$work/upgrade.log" >&2; exit 1; }
umount "$root/proc"

# Trim what debootstrap installed before the rules above existed.
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/* \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/tmp/* "$root"/dev/*
# Docker provides these at run time; nothing of this host stays in the image.
: >"$root/etc/resolv.conf"
: >"$root/etc/hostname"
: >"$root/etc/machine-id"

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $suite $mirror" - "$tag" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')) in $((SECONDS - started)) s"
