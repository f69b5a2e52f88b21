#!/usr/bin/env bash
# Overload: steerling on SmolLM2 with a small, fixed capacity (running batch
# + queue), then closed-loop clients at 1, at the capacity, and at 4× the
# capacity. Past capacity the server should answer 429 at once, and the
# requests it admits should see the latency they see without overload.
#
#   bash loadtest/overload.sh
#   MAX_BATCH=8 MAX_QUEUED=8 SECONDS_EACH=30 bash loadtest/overload.sh
#
# Results: target/overload/<run>.json and target/overload/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_BATCH=${MAX_BATCH:-8}
MAX_QUEUED=${MAX_QUEUED:-8}
SECONDS_EACH=${SECONDS_EACH:-30}
MAX_TOKENS=${MAX_TOKENS:-64}
OUT=${OUT:-target/overload}
PORT=${PORT:-18631}
CAPACITY=$((MAX_BATCH + MAX_QUEUED))
mkdir -p "$OUT"

cargo build --release --locked
./target/release/steerling serve --port "$PORT" --max-batch "$MAX_BATCH" \
  --max-queued "$MAX_QUEUED" --adapters /nonexistent >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  sleep 0.2
done

run() { # label concurrency [extra flags]
  ./target/release/steerling-loadtest run --url "http://127.0.0.1:$PORT" \
    --label "$1" --concurrency "$2" --requests 1000000 --duration "$SECONDS_EACH" \
    --max-tokens "$MAX_TOKENS" --prompt-words 64 --server-pid "$SERVER" --out "$OUT" "${@:3}" >/dev/null
}
run single 1
run at-capacity "$CAPACITY"
# Refused clients retry at once (the worst case), or wait Retry-After as
# OpenAI's clients do.
run overload-4x $((4 * CAPACITY))
run overload-4x-polite $((4 * CAPACITY)) --honor-retry-after

python3 - "$OUT" "$CAPACITY" <<'PY'
import json, sys
out, cap = sys.argv[1], int(sys.argv[2])
runs = {l: json.load(open(f"{out}/{l}.json")) for l in ["single", "at-capacity", "overload-4x", "overload-4x-polite"]}
def row(label, r):
    refused = r["errors"].get("429", 0)
    other = r["failed"] - refused
    return (f"| {label} | {r['settings']['concurrency']} | {r['completed']} | {refused} | {other} "
            f"| {r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f} | {r['ttft_ms']['p99']:.0f} "
            f"| {r['output_tokens_per_second']:.0f} | {r['server_peak_rss_mib'] or 0:.0f} |")
lines = [f"Capacity {cap} (running batch + queue); {runs['single']['settings']['max_tokens']} tokens per request.", "",
         "| run | clients | admitted, done | refused 429 | other failures | E2E p50 / p99 ms | TTFT p99 ms | out tok/s | server peak RSS MiB |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
lines += [row(l, r) for l, r in runs.items()]
p99 = {l: r["e2e_ms"]["p99"] for l, r in runs.items()}
lines += [""] + [f"p99 of admitted requests, {l}: {p99[l] / p99['at-capacity']:.2f}× the run at capacity, "
                 f"{p99[l] / p99['single']:.2f}× the single-client run." for l in ["overload-4x", "overload-4x-polite"]]
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
