#!/usr/bin/env bash
# The image's HEALTHCHECK: ready means the model is loaded.
exec curl -fsS -o /dev/null "http://127.0.0.1:${STEERLING_PORT:-8080}/ready"
