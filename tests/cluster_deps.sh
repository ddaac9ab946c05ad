#!/usr/bin/env bash
# Debian packages for the cluster tests (make cluster-test; make test runs them too): sshd and
# rsync for `ray up` onto test hosts, Slurm and munge for the sbatch test; and Chromium, the
# headless browser that opens the MLflow link a sweep prints (tests/tracking/test_mlflow_ui.py;
# optional: if it cannot be installed, that test skips and the cluster tests still run). Installed only where
# they are missing and we are root with apt-get; otherwise those tests skip and say why.
# No daemon is started here: a policy-rc.d keeps Debian's install scripts from starting them
# (the tests start their own, on their own ports and namespaces, and stop them).
set -euo pipefail
packages=(openssh-server openssh-client rsync iproute2 slurmctld slurmd slurm-client munge chromium)
optional=(chromium)  # its install failing must not cost the cluster tests theirs
need=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p"); done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "[tlcore] cluster tests will skip: ${need[*]} missing (as root: apt-get install ${need[*]})" >&2
  exit 0
fi
guard=/usr/sbin/policy-rc.d
made_guard=0
if [ ! -e "$guard" ]; then printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod +x "$guard" && made_guard=1; fi
trap '[ $made_guard = 1 ] && rm -f "$guard"' EXIT
echo "[tlcore] installing ${need[*]} (Debian packages for the cluster tests)"
export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get install -y -q --no-install-recommends "$@" > /dev/null \
  || { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends "$@" > /dev/null; }; }
required=(); wanted=()
for p in "${need[@]}"; do [[ " ${optional[*]} " == *" $p "* ]] && wanted+=("$p") || required+=("$p"); done
[ ${#required[@]} -eq 0 ] || apt_install "${required[@]}"
[ ${#wanted[@]} -eq 0 ] || apt_install "${wanted[@]}" || echo "[tlcore] ${wanted[*]} could not be installed: the tests that need it skip" >&2
