#!/bin/sh
# Install the Debian packages splitlearn-comm builds against, when missing.
# Run as root (CI and the dev machines are root); does nothing when all are there.
set -eu
PKGS="libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libdlpack-dev zlib1g-dev libzstd-dev pkg-config openssl"
missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
if [ -z "$missing" ]; then
  exit 0
fi
echo "installing system packages:$missing"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
