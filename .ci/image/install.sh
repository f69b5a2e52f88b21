#!/usr/bin/env bash
# Image step 2 (build stage): lays out the runtime files under a root folder
# (/out in the image, a temporary folder in CI): the server binary, the image
# scripts, and the shipped adapters.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:?usage: install.sh ROOT}
install -D -m 0755 target/release/steerling "$root/usr/local/bin/steerling"
install -D -m 0755 .ci/image/runtime-deps.sh "$root/usr/local/lib/steerling/runtime-deps.sh"
install -D -m 0755 .ci/image/healthcheck.sh "$root/usr/local/lib/steerling/healthcheck.sh"
install -D -m 0755 .ci/image/add-user.sh "$root/usr/local/lib/steerling/add-user.sh"
mkdir -p "$root/var/lib/steerling"
rm -rf "$root/var/lib/steerling/adapters"
cp -r adapters "$root/var/lib/steerling/adapters"
