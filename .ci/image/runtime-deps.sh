#!/usr/bin/env bash
# Image step 3 (runtime stage): what the server needs at run time: python3
# and pip (`steerling fetch-model`), curl (the health check), CA certificates.
set -euo pipefail
missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v curl >/dev/null || missing+=(curl)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  rm -rf /var/lib/apt/lists/*
fi
