#!/usr/bin/env bash
# Image step 1 (build stage): the release binaries.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked
