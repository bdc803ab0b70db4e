#!/usr/bin/env bash
# The manual's 17.2 deployment scaled to one machine (docs/dynamo.md): Dynamo's frontend with the KV router on
# port 8000 and WORKERS dynamo.vllm workers with FlexKV (block size 64, each its own FlexKV endpoint and SSD
# directory through ${worker_id}), without etcd or NATS. Run it with the Dynamo environment's python first on
# the PATH (PATH=$PWD/.venv-dynamo/bin:$PATH). Logs and state in $OUT (default /tmp/flexkv-dynamo); Ctrl-C stops all.
#   examples/dynamo/run_local.sh MODEL [WORKERS]     REMOTE_TIER=1: a shared remote tier on local SeaweedFS + Redis
set -euo pipefail
model=${1:?usage: run_local.sh MODEL [WORKERS]}
workers=${2:-2}
here=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/flexkv-dynamo}
mkdir -p "$OUT/discovery"
cd "$OUT"  # not the checkout: its flexkv/ source folder would shadow the installed package for `python -m`
export DYN_FILE_KV=$OUT/discovery DYN_TCP_RPC_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 \
       DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 DYN_SYSTEM_HOST=127.0.0.1 VLLM_HOST_IP=127.0.0.1 \
       VLLM_CPU_NUM_OF_RESERVED_CPU=0 PYTHONPATH=$here/tests/sglang_standin  # torchvision: import-only stand-in
planes=(--discovery-backend file --event-plane zmq --request-plane tcp)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM

remote=""
if [ "${REMOTE_TIER:-0}" = 1 ]; then
  mkdir -p "$OUT/s3" "$OUT/redis"
  redis-server --port 6379 --bind 127.0.0.1 --dir "$OUT/redis" --save "" >"$OUT/redis.log" 2>&1 & pids+=($!)
  weed mini -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$OUT/s3" -s3.port=8333 -bucket=flexkv-cache \
      -webdav=false -admin.ui=false >"$OUT/weed.log" 2>&1 & pids+=($!)
  export AWS_ENDPOINT_URL_S3=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=any AWS_SECRET_ACCESS_KEY=any \
         AWS_REGION=us-east-1 FLEXKV_REDIS_URL=redis://127.0.0.1:6379/0
  remote=', "enable_remote": true, "num_remote_blocks": 100000, "remote_cache_path": "s3://flexkv-cache/"'
fi
cat >"$OUT/flexkv_config.json" <<JSON
{
    "server_recv_port": "ipc://$OUT/flexkv_\${worker_id}",
    "cache_config": {
        "enable_cpu": true, "enable_ssd": true, "tokens_per_block": 64,
        "num_cpu_blocks": 512, "num_ssd_blocks": 4096,
        "ssd_cache_dir": "$OUT/ssd_\${worker_id}/", "evict_ratio": 0.05$remote
    }
}
JSON

python -m dynamo.frontend --router-mode kv --http-port 8000 --kv-cache-block-size 64 "${planes[@]}" \
    >"$OUT/frontend.log" 2>&1 & pids+=($!)
for ((i = 0; i < workers; i++)); do
  worker_id=$i FLEXKV_CONFIG_PATH=$OUT/flexkv_config.json DYN_SYSTEM_PORT=$((9100 + i)) \
  python -m dynamo.vllm --model "$model" --served-model-name tiny --block-size 64 --enforce-eager \
      --max-model-len 4096 --kv-cache-memory-bytes $((64 << 20)) \
      --kv-transfer-config '{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both"}' \
      --kv-events-config "{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"ipc://$OUT/kv_events_$i\"}" \
      "${planes[@]}" >"$OUT/worker$i.log" 2>&1 & pids+=($!)
done
echo "frontend on http://127.0.0.1:8000 (model \"tiny\"), logs in $OUT; the router's choices: grep 'Selected worker' $OUT/frontend.log"
wait
