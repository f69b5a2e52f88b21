#!/usr/bin/env bash
# Runs the Dockerfile's steps outside a container (the CI machines run no
# container engine), so the image cannot rot unseen: every RUN of the
# Dockerfile must be one of these scripts; they lay the image out in a
# temporary root, and the server started from there with the image's
# environment must pass the image's health check and serve its adapters.
set -euo pipefail
cd "$(dirname "$0")/../.."
if grep -E '^RUN ' Dockerfile | grep -vE '^RUN (bash \.ci/image/|/usr/local/lib/steerling/|steerling )' ; then
  echo "every RUN step of the Dockerfile must call a script of .ci/image or steerling itself"; exit 1
fi
for script in .ci/image/*.sh; do bash -n "$script"; done
root=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$root"' EXIT
pid=""
bash .ci/image/build.sh
bash .ci/image/install.sh "$root"
bash "$root/usr/local/lib/steerling/runtime-deps.sh"
# add-user.sh only runs in the image (it would add a user to this machine).
"$root/usr/local/bin/steerling" fetch-model >/dev/null
# The image's environment (ENV in the Dockerfile), on a free loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export STEERLING_HOST=127.0.0.1 STEERLING_PORT=$port
export STEERLING_ADAPTERS=$root/var/lib/steerling/adapters
"$root/usr/local/bin/steerling" serve >"$root/server.log" 2>&1 &
pid=$!
for _ in $(seq 240); do
  bash "$root/usr/local/lib/steerling/healthcheck.sh" 2>/dev/null && break
  sleep 0.5
done
bash "$root/usr/local/lib/steerling/healthcheck.sh" || { cat "$root/server.log"; exit 1; }
curl -fsS "http://127.0.0.1:$port/v1/models" | grep -q '"occupation-gender"' \
  || { echo "the image does not serve the default adapter"; exit 1; }
echo "image steps: ok"
