#!/bin/sh
# Install the Debian packages splitlearn-comm builds against, when missing.
# Run as root (CI and the dev machines are root); does nothing when all are there.
#
# Chromium (headless, for the dashboard's browser test and `make dashboard-screenshot`)
# is installed too when missing, but is optional: when it cannot be installed (no
# package, no network, not root) this script says so and goes on, and the browser
# test skips with that reason. SPLITLEARN_NO_CHROMIUM=1 leaves it out.
set -eu
PKGS="libgrpc-dev libprotobuf-c-dev protobuf-c-compiler libdlpack-dev zlib1g-dev libzstd-dev pkg-config openssl"
OPTIONAL="chromium fonts-dejavu-core"
installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
missing=""
for p in $PKGS; do
  installed "$p" || missing="$missing $p"
done
optional=""
if [ "${SPLITLEARN_NO_CHROMIUM:-0}" != "1" ]; then
  for p in $OPTIONAL; do
    installed "$p" || optional="$optional $p"
  done
fi
if [ -z "$missing" ] && [ -z "$optional" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
updated=0
if [ -n "$missing" ]; then
  echo "installing system packages:$missing"
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  updated=1
  # shellcheck disable=SC2086
  $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing
fi
if [ -n "$optional" ]; then
  echo "installing optional system packages (headless browser tests):$optional"
  if { [ "$updated" = 1 ] || $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq; } &&
     $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $optional; then
    :
  else
    echo "warning: could not install$optional; the dashboard's browser test will skip" >&2
  fi
fi
