#!/usr/bin/env bash
# Cold start: process start -> first streamed token, wick beside llama-server on the same
# GGUF file in the same run, with the page cache dropped (cold) and with the file cached
# (warm); then the weight-reading comparison on a throttled block device.
# Usage (as root: it drops the page cache, makes a loop device and a blkio cgroup):
#   scripts/cold-start.sh [GGUF...]      default: the GGUF test models
# Env: WICK_BIN (default target/debug/wick under $CARGO_TARGET_DIR or ./target), RUNS (3),
#      THROTTLE_BPS (read bytes/s of the throttled device, default 100 MiB/s),
#      THROTTLE_IOPS (read requests/s, default 200), READ_AHEAD_KB (the device's readahead,
#      default 128 as on many network mounts), SKIP_THROTTLE=1, SKIP_COLD=1.
# llama-server comes from scripts/llama-cpp-baseline.sh (native build minus AMX).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (drops the page cache)" >&2; exit 2; }

RUNS="${RUNS:-3}"
models_dir="${WICK_TEST_MODELS:-$HOME/.cache/candlewick/test-models}"
if [ $# -gt 0 ]; then models=("$@"); else
  models=("$models_dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$models_dir/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
fi
wick="${WICK_BIN:-${CARGO_TARGET_DIR:-target}/debug/wick}"
[ -x "$wick" ] || { echo "no wick binary at $wick (cargo build --bin wick, or set WICK_BIN)" >&2; exit 2; }
scripts/llama-cpp-baseline.sh build >&2
llama="${WICK_BASELINE_DIR:-$HOME/.cache/candlewick/llama.cpp}/build/bin/llama-server"

work="$(mktemp -d /var/tmp/wick-cold.XXXXXX)"
cleanup() {
  [ -n "${mnt:-}" ] && umount "$mnt" 2>/dev/null || true
  [ -n "${loopdev:-}" ] && losetup -d "$loopdev" 2>/dev/null || true
  [ -n "${cg:-}" ] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# One measurement: seconds from starting the server to the first streamed token.
cat >"$work/ttft.py" <<'EOF'
import http.client, json, os, socket, subprocess, sys, time
kind, port, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cmd = sys.argv[4:]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def elapsed(): return time.monotonic() - t0
try:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
        except OSError:
            if elapsed() > 300: sys.exit("server never listened")
            time.sleep(0.002)
    if kind == "wick":
        path, body = "/api/generate", {"model": model, "prompt": "Hi", "stream": True, "options": {"num_predict": 2}}
    else:
        path, body = "/completion", {"prompt": "Hi", "n_predict": 2, "stream": True}
    while True:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status == 503:  # llama-server while it loads
            r.read(); c.close(); time.sleep(0.002); continue
        assert r.status == 200, (r.status, r.read())
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "): line = line[6:]
            if not line: continue
            v = json.loads(line)
            if v.get("response") or v.get("content"):
                print(f"{elapsed():.3f}"); sys.exit(0)
            if v.get("error") or v.get("done") or v.get("stop"):
                sys.exit(f"no token: {v}")
        sys.exit("stream ended without a token")
finally:
    p.terminate(); p.wait()
EOF

port=$((20000 + RANDOM % 20000))
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
run_one() { # kind blob store -> seconds
  local kind=$1 blob=$2 store=$3
  port=$((port + 1))
  if [ "$kind" = wick ]; then
    OLLAMA_HOST="127.0.0.1:$port" OLLAMA_MODELS="$store" WICK_KV_CACHE_BYTES=$((256 << 20)) \
      RUST_LOG=error python3 "$work/ttft.py" wick "$port" m:1 "$wick" serve
  else
    python3 "$work/ttft.py" llama "$port" - "$llama" -m "$blob" --host 127.0.0.1 --port "$port" -t 2 -c 4096 -np 1
  fi
}

if [ "${SKIP_COLD:-}" != 1 ]; then
echo "| model | weights | seq. read | goal 2x(bytes/bw)+1s | wick cold | llama-server cold | wick warm | llama-server warm |"
echo "|---|---|---|---|---|---|---|---|"
for gguf in "${models[@]}"; do
  store="$work/store-$(basename "$gguf")"
  OLLAMA_MODELS="$store" "$wick" import m:1 "$gguf" >/dev/null
  blob="$(find "$store/blobs" -size +1M | head -1)"
  bytes=$(stat -c %s "$blob")
  drop
  bw=$(dd if="$blob" of=/dev/null bs=16M 2>&1 | awk '/copied/ {print $(NF-1) * ($NF ~ /GB/ ? 1000 : 1)}')
  goal=$(awk -v b="$bytes" -v bw="$bw" 'BEGIN {printf "%.2f", 2 * b / (bw * 1e6) + 1}')
  declare -A t=()
  for mode in cold warm; do
    for kind in wick llama; do
      for _ in $(seq "$RUNS"); do
        if [ $mode = cold ]; then drop; else cat "$blob" "$wick" "$llama" >/dev/null; fi
        t[$mode-$kind]+="$(run_one $kind "$blob" "$store") "
      done
    done
  done
  m() { echo "${t[$1]}" | tr ' ' '\n' | grep . | median; }
  echo "| $(basename "$gguf") | $((bytes / 1000000)) MB | $bw MB/s | ${goal} s | $(m cold-wick) s | $(m cold-llama) s | $(m warm-wick) s | $(m warm-llama) s |"
done
echo
echo "(medians of $RUNS runs; cold: \`sync; echo 3 > /proc/sys/vm/drop_caches\` before each start;"
echo " seq. read: dd bs=16M of the cold file; wick: $wick; llama-server: native build minus AMX)"
fi

[ "${SKIP_THROTTLE:-}" = 1 ] && exit 0
# Weight reading on a throttled device: page faults on the map only (WICK_READ_THREADS=0)
# against parallel large reads ahead of the loader (4 threads), cold each time.
bps="${THROTTLE_BPS:-$((100 << 20))}" iops="${THROTTLE_IOPS:-200}"
img="$work/fs.img" mnt="$work/mnt"
size=$(( $(for g in "${models[@]}"; do stat -c %s "$g"; done | sort -n | tail -1) * 2 + (64 << 20) ))
truncate -s "$size" "$img"
mkfs.ext4 -q -F "$img"
loopdev="$(losetup -f --show "$img")"
mkdir -p "$mnt"
mount "$loopdev" "$mnt"
echo "${READ_AHEAD_KB:-128}" >"/sys/block/$(basename "$loopdev")/queue/read_ahead_kb"
majmin="$(lsblk -dno MAJ:MIN "$loopdev" | tr -d ' ')"
cg=/sys/fs/cgroup/blkio/wick-cold-$$
mkdir "$cg"
echo "$majmin $bps" >"$cg/blkio.throttle.read_bps_device"
echo "$majmin $iops" >"$cg/blkio.throttle.read_iops_device"
echo
echo "Throttled $loopdev (ext4 on a loop device; blkio: $((bps >> 20)) MiB/s, $iops reads/s; readahead ${READ_AHEAD_KB:-128} KiB), cold each run:"
echo
echo "| model | dd bs=16M | page faults on the map | 4 threads of 8 MiB reads ahead | llama-server |"
echo "|---|---|---|---|---|"
for gguf in "${models[@]}"; do
  store="$mnt/store-$(basename "$gguf")"
  OLLAMA_MODELS="$store" "$wick" import m:1 "$gguf" >/dev/null
  blob="$(find "$store/blobs" -size +1M | head -1)"
  in_cg() { sh -c 'echo $$ >"$0/cgroup.procs"; shift; exec "$@"' "$cg" _ "$@"; }
  drop
  dd_s=$(in_cg dd if="$blob" of=/dev/null bs=16M 2>&1 | awk '/copied/ {print $(NF-1), $NF}')
  declare -A r=()
  for _ in $(seq "$RUNS"); do
    for threads in 0 4; do
      drop
      r[$threads]+="$(WICK_READ_THREADS=$threads in_cg bash -c "$(declare -f run_one); wick=$wick llama=$llama work=$work port=$((port + RANDOM % 1000)); run_one wick '$blob' '$store'") "
    done
    drop
    r[llama]+="$(in_cg bash -c "$(declare -f run_one); wick=$wick llama=$llama work=$work port=$((port + 1000 + RANDOM % 1000)); run_one llama '$blob' '$store'") "
  done
  m() { echo "${r[$1]}" | tr ' ' '\n' | grep . | median; }
  echo "| $(basename "$gguf") | $dd_s | $(m 0) s | $(m 4) s | $(m llama) s |"
done
