#!/usr/bin/env bash
# Instructions a gateway request costs, by callgrind: the figure to compare
# between two builds on a noisy machine (wall-clock figures move by 10 % from
# one run to the next; instruction counts do not). Not part of bench/run (it
# takes a minute or two, valgrind being some 50 times slower).
#
#   bash bench/gateway_instructions.sh [BINARY]       (default ./resil-lua)
#   DUR=10 LEVEL=info bash bench/gateway_instructions.sh   (the access line too)
#
# The gateway with the full policy (key, buckets, breaker, retry, ledger) as
# bench/gateway.sh runs it, an nginx upstream, wrk at 8 connections for 5 s
# of warm-up then DUR seconds counted; prints requests=, Ir= and per_request=.
# Alternate the builds compared, two runs each.
set -eu
cd "$(dirname "$0")/.."
BIN=$(readlink -f "${1:-./resil-lua}")
DUR=${DUR:-10}
for tool in valgrind callgrind_control callgrind_annotate wrk nginx; do
  command -v "$tool" >/dev/null || { echo "gateway_instructions: $tool is not installed"; exit 0; }
done
work=$(mktemp -d)
cleanup() {
  [ -n "${vg:-}" ] && kill "$vg" 2>/dev/null || true
  [ -f "$work/n.pid" ] && kill "$(cat "$work/n.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { "$BIN" -e 'local s = require("resil").server.listen({ handler = function() end }); print(s:port()); s:close()'; }
up=$(free_port)
gw=$(free_port)
reply='{"id":"chatcmpl-$request_id","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
cat > "$work/n.conf" <<CONF
worker_processes 1; daemon on; pid $work/n.pid; error_log $work/n.log;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
  uwsgi_temp_path $work; scgi_temp_path $work; keepalive_requests 1000000;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '$reply'; } } }
CONF
nginx -c "$work/n.conf" -p "$work"
cat > "$work/gateway.lua" <<CONF
local ai = require "policies.ai"
ai.configure("openai", { base_url = "http://127.0.0.1:$up/v1", api_key = "sk-bench-123456",
  rate = { rate = 1e9, per = 1 }, breaker = { failure_rate = 0.5, min_calls = 20 }, retry = { base = 0.1 } })
return { key_cache = 2 }
CONF
key=$("$BIN" keys add --name bench --rpm 100000000 --store "$work/state.db" 2>/dev/null)
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" "$BIN" gateway \
  --listen "127.0.0.1:$gw" --config "$work/gateway.lua" --store "$work/state.db" --log-level "${LEVEL:-error}" \
  > "$work/gw.out" 2>&1 &
vg=$!
for _ in $(seq 300); do grep -q listening "$work/gw.out" && break; sleep 0.1; done
wrk -t1 -c8 -d5s -s "$work/post.lua" "http://127.0.0.1:$gw/v1/chat/completions" > /dev/null
callgrind_control -i on "$vg" > /dev/null
wrk -t1 -c8 -d"${DUR}s" -s "$work/post.lua" "http://127.0.0.1:$gw/v1/chat/completions" > "$work/wrk.out"
callgrind_control -i off "$vg" > /dev/null
n=$(awk '/requests in/ {print $1}' "$work/wrk.out")
kill "$vg"; wait "$vg" 2>/dev/null || true; vg=
ir=$(callgrind_annotate "$work/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
echo "requests=$n Ir=$ir per_request=$((ir / n))"
grep -i "non-2xx" "$work/wrk.out" || true
