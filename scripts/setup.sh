#!/usr/bin/env bash
# Installs what fsfilter needs on Debian 12 (as root): system packages, then a virtual environment in
# .venv with fsfilter and its test tools. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(python3 python3-venv python3-pip fuse3 util-linux kmod acl attr git sqlite3 rsync tar coreutils
          findutils procps gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -e /dev/fuse ] || modprobe fuse || { echo "setup: /dev/fuse is missing and the fuse module did not load" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -e .venv/.fsfilter-installed ] || [ pyproject.toml -nt .venv/.fsfilter-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.fsfilter-installed
fi
