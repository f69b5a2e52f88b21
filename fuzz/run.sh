#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each).
# Needs nightly Rust and cargo-fuzz (`cargo install cargo-fuzz`). A crash
# stops the script and leaves its input in fuzz/artifacts/<target>/; turn it
# into a regression test before fixing it.
#
#   bash fuzz/run.sh          # 60 s per target
#   bash fuzz/run.sh 600      # 10 min per target
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-60}
for target in request adapter_config gguf_tokenizer; do
  mkdir -p "corpus/$target"
  cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
  echo "== $target ($SECONDS_EACH s)"
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -max_len=65536
done
