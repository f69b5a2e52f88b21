#!/usr/bin/env bash
# Image step 4 (runtime stage): the unprivileged user the server runs as,
# owning the adapters volume (trained adapters are written there).
set -euo pipefail
id -u steerling >/dev/null 2>&1 || useradd --create-home --uid 10001 steerling
chown -R steerling /var/lib/steerling
