#!/usr/bin/env bash
# Runs the identical workload against steerling, llama.cpp's llama-server and
# llama-cpp-python's server, one after the other on loopback, with the same
# SmolLM2 GGUF and 2 threads, and writes one table of ratios.
#
#   bash loadtest/compare.sh            # everything
#   SERVERS="steerling llama-server" bash loadtest/compare.sh
#
# llama.cpp is built from the sources inside the PyPI sdist of
# llama-cpp-python 0.3.36 (vendor/llama.cpp) in $CACHE, never in the repo.
# Results: target/compare/<server>-<run>.json and target/compare/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=0.3.36
CACHE=${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/steerling/compare}
OUT=${OUT:-target/compare}
SERVERS=${SERVERS:-steerling steerling-steering llama-server llama-cpp-python}
THREADS=2
MAX_TOKENS=${MAX_TOKENS:-64}
ADAPTER=${ADAPTER:-occupation-gender}
mkdir -p "$CACHE" "$OUT"

# The same CPU flags for both llama.cpp builds: GGML_NATIVE=ON crashes on
# these CPUs (the AMX int8 path), so native detection is off and AMX too.
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
 -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF \
 -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"

cargo build --release --locked
MODEL=$(./target/release/steerling fetch-model 2>/dev/null | tail -1)
[ -f "$MODEL" ] || MODEL=$(find "${STEERLING_HOME:-$HOME/.cache/steerling}" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)
[ -f "$MODEL" ] || { echo "the default model is missing: run steerling fetch-model"; exit 1; }

# A virtual environment with the build tools (cmake from its binary wheel):
# `pip download --no-binary :all:` would otherwise build cmake itself from
# source to read the sdist's metadata.
VENV="$CACHE/venv"
tools() {
  if [ ! -x "$VENV/bin/cmake" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet cmake scikit-build-core
  fi
  export PATH="$VENV/bin:$PATH"
}

build_llama_server() {
  local bin="$CACHE/llama.cpp/build/bin/llama-server"
  if [ ! -x "$bin" ]; then
    tools
    (cd "$CACHE" &&
      pip download --quiet --no-binary :all: --no-deps --no-build-isolation \
        "llama-cpp-python==$LLAMA_CPP_PYTHON" -d . &&
      rm -rf src llama.cpp && mkdir src && tar xzf "llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C src &&
      mv "src/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" llama.cpp)
    # shellcheck disable=SC2086
    cmake -S "$CACHE/llama.cpp" -B "$CACHE/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release $CMAKE_FLAGS >/dev/null
    cmake --build "$CACHE/llama.cpp/build" --target llama-server -j "$THREADS" >/dev/null
  fi
  echo "$bin"
}

install_llama_cpp_python() {
  tools
  if ! "$VENV/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
    CMAKE_ARGS="$CMAKE_FLAGS" "$VENV/bin/pip" install --quiet "llama-cpp-python[server]==$LLAMA_CPP_PYTHON"
  fi
  echo "$VENV/bin/python"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ready() { # url path
  for _ in $(seq 600); do
    curl -sf "$1$2" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server at $1 not ready"; return 1
}

PID=""
stop_server() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  PID=""
}
trap stop_server EXIT

start_server() { # name port
  local name=$1 port=$2
  case $name in
    steerling|steerling-steering)
      ./target/release/steerling serve --host 127.0.0.1 --port "$port" --model "$MODEL" \
        --max-batch 32 >"$OUT/$name.log" 2>&1 &
      PID=$!; wait_ready "http://127.0.0.1:$port" /ready ;;
    llama-server)
      "$(build_llama_server)" -m "$MODEL" --host 127.0.0.1 --port "$port" -t "$THREADS" \
        --parallel 16 --cont-batching -c 16384 >"$OUT/$name.log" 2>&1 &
      PID=$!; wait_ready "http://127.0.0.1:$port" /health ;;
    llama-cpp-python)
      "$(install_llama_cpp_python)" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 \
        --port "$port" --n_threads "$THREADS" --n_ctx 4096 --interrupt_requests False \
        >"$OUT/$name.log" 2>&1 &
      PID=$!; wait_ready "http://127.0.0.1:$port" /v1/models ;;
  esac
}

load() { # name label args…
  local name=$1 label=$2; shift 2
  local extra=()
  case $name in
    llama-server) extra=(--no-keep-alive) ;;
    steerling-steering) extra=(--model "$ADAPTER") ;;
  esac
  ./target/release/steerling-loadtest run --url "http://127.0.0.1:$PORT" --label "$name-$label" \
    --out "$OUT" --server-pid "$PID" "${extra[@]}" "$@" >/dev/null
}

for name in $SERVERS; do
  PORT=$(free_port)
  echo "== $name"
  start_server "$name" "$PORT"
  if [ "$name" = steerling-steering ]; then
    # The cost of steering: the same requests to the adapter, drawn (prior) or not (off).
    # `off` gets the adapter's prompt format from the client, so both see
    # the same tokens and only the draw, the hidden token and the LoRA differ.
    load "$name" off-c16 --concurrency 16 --requests 48 --max-tokens "$MAX_TOKENS" \
      --prompt-format-of "adapters/$ADAPTER/adapter.json" --extra '{"steering":{"policy":"off"}}'
    load "$name" prior-c16 --concurrency 16 --requests 48 --max-tokens "$MAX_TOKENS" \
      --extra '{"steering":{"policy":"prior"}}'
  else
    # TTFT on a 500-token prompt, one request at a time.
    load "$name" ttft500 --concurrency 1 --requests 4 --prompt-words 500 --max-tokens 4
    for c in 1 4 16 32; do
      n=$(( c < 4 ? 8 : 2 * c ))
      load "$name" "c$c" --concurrency "$c" --requests "$n" --max-tokens "$MAX_TOKENS"
    done
  fi
  stop_server
done

python3 - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def get(name, label):
    p = out / f"{name}-{label}.json"
    return json.loads(p.read_text()) if p.exists() else None
servers = ["steerling", "llama-server", "llama-cpp-python"]
rows = [
    ("single-stream decode, tok/s", "c1", lambda r: 1000 / r["tpot_ms"]["mean"]),
    ("TTFT, 500-token prompt, ms (lower is better)", "ttft500", lambda r: r["ttft_ms"]["mean"]),
] + [(f"throughput at concurrency {c}, output tok/s", f"c{c}", lambda r: r["output_tokens_per_second"]) for c in (1, 4, 16, 32)] + [
    ("peak RSS, MiB (lower is better)", "c32", lambda r: r["server_peak_rss_mib"] or float("nan")),
]
lines = ["| measure | " + " | ".join(servers) + " | steerling / llama-server | steerling / llama-cpp-python |",
         "| --- |" + " ---: |" * (len(servers) + 2)]
for title, label, f in rows:
    vals = []
    for s in servers:
        r = get(s, label)
        vals.append(f(r) if r and r["completed"] else None)
    cell = lambda v: "–" if v is None else f"{v:.1f}"
    ratio = lambda a, b: "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"
    lines.append(f"| {title} | " + " | ".join(cell(v) for v in vals)
                 + f" | {ratio(vals[0], vals[1])} | {ratio(vals[0], vals[2])} |")
off, prior = get("steerling-steering", "off-c16"), get("steerling-steering", "prior-c16")
if off and prior:
    a, b = prior["output_tokens_per_second"], off["output_tokens_per_second"]
    lines += ["", f"Steering cost at concurrency 16: policy prior {a:.1f} tok/s vs off {b:.1f} tok/s = {a / b:.3f}×"]
table = "\n".join(lines) + "\n"
(out / "table.md").write_text(table)
print(table)
EOF
