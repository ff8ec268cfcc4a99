#!/usr/bin/env bash
# The gateway's cost (bench/run calls this; it also runs alone): wrk against
# the upstream directly, then through `resil-lua gateway` with the full
# policy (key lookup, the key's bucket, the provider's bucket and breaker,
# retry, the cost ledger). Requests/s at GW_C connections, and the latency the
# gateway adds at one connection (p50, p99). Side by side in the same run:
# the gateway with --workers 2, and Portkey's gateway (npm @portkey-ai/gateway,
# installed into bench/node_modules; skipped when node or the package is not
# there) with the same upstream and body.
set -eu
cd "$(dirname "$0")/.."
RESIL=${RESIL:-./resil-lua}
GW_C=${GW_C:-64}
GW_SECONDS=${GW_SECONDS:-10}
command -v wrk >/dev/null || { echo "gateway: wrk is not installed (Debian package wrk; make deps)"; exit 0; }
command -v nginx >/dev/null || { echo "gateway: nginx is not installed"; exit 0; }
work=$(mktemp -d)
cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -f "$work/proxy.pid" ] && kill "$(cat "$work/proxy.pid")" 2>/dev/null || true
  [ -n "${gw_pid:-}" ] && kill "$gw_pid" 2>/dev/null || true
  [ -n "${cg_pid:-}" ] && kill "$cg_pid" 2>/dev/null || true
  [ -n "${w2_pid:-}" ] && kill "$w2_pid" 2>/dev/null || true
  [ -n "${al_pid:-}" ] && kill "$al_pid" 2>/dev/null || true
  [ -n "${pk_pid:-}" ] && kill "$pk_pid" 2>/dev/null || true
  [ -n "${sgw_pid:-}" ] && kill "$sgw_pid" 2>/dev/null || true
  [ -n "${mock_pid:-}" ] && kill "$mock_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { "$RESIL" -e 'local s = require("resil").server.listen({ handler = function() end }); print(s:port()); s:close()'; }

up_port=$(free_port)
# every answer has an id of its own (nginx's $request_id), as a provider's do:
# the ledger keeps one row per provider response id, so a fixed id would have
# recorded one row for the whole run and measured no ledger writes at all
reply='{"id":"chatcmpl-$request_id","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
# start_nginx NAME SERVERS: one nginx worker (its pid in $work/NAME.pid) serving the http-level
# SERVERS text; pin_nginx NAME CORE: that nginx's processes onto CORE
start_nginx() {
  cat > "$work/$1.conf" <<CONF
worker_processes 1;
daemon on;
pid $work/$1.pid;
error_log $work/$1.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
  uwsgi_temp_path $work; scgi_temp_path $work;
  keepalive_requests 1000000;
$2
}
CONF
  nginx -c "$work/$1.conf" -p "$work"
}
pin_nginx() { for p in $(cat "$work/$1.pid") $(pgrep -P "$(cat "$work/$1.pid")" || true); do taskset -pc "$2" "$p" >/dev/null; done; }
start_nginx nginx "  server {
    listen 127.0.0.1:$up_port;
    location / { default_type application/json; return 200 '$reply'; }
  }"

cat > "$work/gateway.lua" <<CONF
local ai = require "policies.ai"
ai.configure("openai", { base_url = "http://127.0.0.1:$up_port/v1", api_key = "sk-bench-123456",
  rate = { rate = 1e9, per = 1 }, breaker = { failure_rate = 0.5, min_calls = 20 }, retry = { base = 0.1 } })
return { key_cache = 2 }
CONF
db="$work/state.db"
key=$("$RESIL" keys add --name bench --rpm 100000000 --store "$db" 2>/dev/null)
gw_port=$(free_port)
pin_gw="" pin_rest=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  pin_gw="taskset -c 0"
  pin_rest="taskset -c 1"
  pin_nginx nginx 1
fi
$pin_gw "$RESIL" gateway --listen "127.0.0.1:$gw_port" --config "$work/gateway.lua" --store "$db" --log-level error \
  > "$work/gw.out" 2>&1 &
gw_pid=$!
for _ in $(seq 100); do grep -q listening "$work/gw.out" && break; sleep 0.05; done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"' .. (os.getenv("GW_MODEL") or "gpt-4o-mini") .. '","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("GW_KEY")
LUA
export GW_KEY=$key
direct="http://127.0.0.1:$up_port/v1/chat/completions"
through="http://127.0.0.1:$gw_port/v1/chat/completions"
check=$(curl -s -o /dev/null -w "%{http_code}" -H "Authorization: Bearer $key" -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "$through")
[ "$check" = 200 ] || { echo "gateway: a request through the gateway got $check"; cat "$work/gw.out"; exit 1; }

# --- GW_INSTRUCTIONS=1: the instructions a request costs, by callgrind, instead of the rest ---
# The figure to compare between two builds on a noisy machine (wall-clock figures move by 10 % from
# one run to the next; instruction counts do not): the same gateway under valgrind, 8 connections,
# a 5 s warm-up, then GW_SECONDS counted; GW_LEVEL=info counts the access line too. Prints
# requests=, Ir= and per_request=. Alternate the builds compared, two runs each.
if [ -n "${GW_INSTRUCTIONS:-}" ]; then
  for tool in valgrind callgrind_control callgrind_annotate; do
    command -v "$tool" >/dev/null || { echo "gateway: $tool is not installed"; exit 0; }
  done
  cg_port=$(free_port)
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" "$RESIL" gateway \
    --listen "127.0.0.1:$cg_port" --config "$work/gateway.lua" --store "$db" --log-level "${GW_LEVEL:-error}" \
    > "$work/cg.log" 2>&1 &
  cg_pid=$!
  for _ in $(seq 300); do grep -q listening "$work/cg.log" && break; sleep 0.1; done
  cg_url="http://127.0.0.1:$cg_port/v1/chat/completions"
  wrk -t1 -c8 -d5s -s "$work/post.lua" "$cg_url" > /dev/null
  callgrind_control -i on "$cg_pid" > /dev/null 2>&1
  wrk -t1 -c8 -d"${GW_SECONDS}s" -s "$work/post.lua" "$cg_url" > "$work/wrk.out"
  callgrind_control -i off "$cg_pid" > /dev/null 2>&1
  n=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  kill "$cg_pid"; wait "$cg_pid" 2>/dev/null || true
  ir=$(callgrind_annotate "$work/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
  echo "gateway instructions: requests=$n Ir=$ir per_request=$((ir / n)) (--log-level ${GW_LEVEL:-error})"
  # GW_CG_OUT=FILE keeps the profile, for callgrind_annotate --inclusive=yes FILE
  [ -n "${GW_CG_OUT:-}" ] && cp "$work/cg.out" "$GW_CG_OUT"
  grep -i "non-2xx" "$work/wrk.out" || true
  exit 0
fi

run() { $pin_rest wrk -t1 -c"$1" -d"${GW_SECONDS}s" --latency -s "$work/post.lua" "$2" > "$work/wrk.out"; }
rps() { awk '/^Requests\/sec/ { print $2 }' "$work/wrk.out"; }
# wrk prints "50%  1.23ms" (or us, s); -> microseconds
pct() { awk -v p="$1" '$1 == p { v = $2; u = v; gsub(/[0-9.]/, "", u); sub(/[a-z]+$/, "", v);
  m = (u == "us") ? 1 : (u == "ms") ? 1000 : 1000000; printf "%.0f", v * m }' "$work/wrk.out"; }
errs() { awk '/Non-2xx|Socket errors/ { print }' "$work/wrk.out" | tr '\n' ' '; }

run "$GW_C" "$direct"; d_rps=$(rps); d_err=$(errs)
run "$GW_C" "$through"; g_rps=$(rps); g_err=$(errs)

# --- the same gateway writing its access log: a line per request at info, to a file ---
# (the runs above are at --log-level error, where no line is built)
if [ -z "${GW_STAGES:-}" ]; then
  al_port=$(free_port)
  $pin_gw "$RESIL" gateway --listen "127.0.0.1:$al_port" --config "$work/gateway.lua" --store "$db" --log-level info \
    --log-file "$work/access.log" > "$work/al.out" 2>&1 &
  al_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/al.out" && break; sleep 0.05; done
  run "$GW_C" "http://127.0.0.1:$al_port/v1/chat/completions"; al_rps=$(rps); al_err=$(errs)
  kill "$al_pid" 2>/dev/null || true
  wait "$al_pid" 2>/dev/null || true
  al_lines=$(grep -c '"msg":"access"' "$work/access.log" || true)
fi

# --- a reference: nginx itself as a reverse proxy, no policy, pinned as the gateway ---
# What a proxy written in C pays on this machine for the two sockets of a
# request (the client's and the upstream's, kept alive): a ceiling that no
# gateway doing more than relaying reaches. Skipped in GW_STAGES runs.
if [ -z "${GW_STAGES:-}" ]; then
  px_port=$(free_port)
  start_nginx proxy "  upstream provider { server 127.0.0.1:$up_port; keepalive 128; }
  server {
    listen 127.0.0.1:$px_port;
    location / { proxy_pass http://provider; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
  if [ -n "$pin_gw" ]; then pin_nginx proxy 0; fi
  proxy="http://127.0.0.1:$px_port/v1/chat/completions"
  run "$GW_C" "$proxy"; x_rps=$(rps); x_err=$(errs)
fi

# --- GW_STAGES=1: what each piece of a request costs (bench/gateway_stages.lua) ---
# The same gateway with its handler cut down to the first N pieces of the
# work, side by side with the full policy above: requests/s and user+system
# CPU per request at GW_C connections (gateway on core 0), p50/p99 at one
# connection (all on core 0). Instead of the usual figures; not in bench/run.
if [ -n "${GW_STAGES:-}" ]; then
  cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # user + system, in 1/100 s
  pin_upstream() { pin_nginx nginx "$1"; }
  stage() { # $1: a label; $2: the gateway's pid; $3: its URL
    local t0 t1 n r64 cpu
    t0=$(cpu_ticks "$2"); run "$GW_C" "$3"; t1=$(cpu_ticks "$2"); r64=$(rps)
    n=$(awk '/requests in/ { print $1 }' "$work/wrk.out")
    cpu=$(awk -v a="$t0" -v b="$t1" -v n="$n" 'BEGIN { printf "%.1f", (b - a) * 10000 / n }')
    [ -n "$pin_gw" ] && { pin_rest="taskset -c 0"; pin_upstream 0; }
    run 1 "$3"
    printf "  %-52s %9s req/s %7s us CPU/request   p50 %5s us  p99 %6s us\n" "$1" "$r64" "$cpu" "$(pct 50%)" "$(pct 99%)"
    [ -n "$pin_gw" ] && { pin_rest="taskset -c 1"; pin_upstream 1; }
  }
  echo "gateway stages: wrk ${GW_SECONDS}s at $GW_C connections (gateway on core 0), then 1 connection (all on core 0)"
  names=("relay: the body sent upstream, the answer back" "+ the virtual key (SHA-256, cached record)"
    "+ the request's JSON decoded" "+ policies.call (bucket, breaker, retry, metrics)" "+ a ledger row (pricing, resil.cost.record)")
  for n in 0 1 2 3 4; do
    { sed '$d' "$work/gateway.lua"; echo "UP = $up_port"; echo "dofile('bench/gateway_stages.lua')"
      echo "return { key_cache = 2 }"; } > "$work/stage.lua"
    sp=$(free_port)
    GW_STAGE=$n $pin_gw "$RESIL" gateway --listen "127.0.0.1:$sp" --config "$work/stage.lua" --store "$db" \
      --log-level error > "$work/stage.out" 2>&1 &
    st_pid=$!
    for _ in $(seq 100); do grep -q listening "$work/stage.out" && break; sleep 0.05; done
    stage "$n ${names[$n]}" "$st_pid" "http://127.0.0.1:$sp/v1/chat/completions"
    kill "$st_pid" 2>/dev/null || true
    wait "$st_pid" 2>/dev/null || true
  done
  stage "full policy (policies/gateway.lua)" "$gw_pid" "$through"
  exit 0
fi

# --- the same gateway with --workers 2 (N processes on one SO_REUSEPORT socket) ---
# Not pinned: wrk and nginx stay on core 1 as above, and on two cores there is
# no core left free of them; with three or more the workers get 0 and 2.
w2_pin="" w2_where="not pinned: on 2 cores none is free of wrk and nginx"
if [ -n "$pin_gw" ] && [ "$(nproc)" -ge 3 ]; then w2_pin="taskset -c 0,2" w2_where="on cores 0 and 2"; fi
w2_port=$(free_port)
$w2_pin "$RESIL" gateway --listen "127.0.0.1:$w2_port" --workers 2 --config "$work/gateway.lua" --store "$db" \
  --log-level error > "$work/w2.out" 2>&1 &
w2_pid=$!
# each worker says it listens
for _ in $(seq 100); do [ "$(grep -sc listening "$work/w2.out")" = 2 ] && break; sleep 0.05; done
w2_url="http://127.0.0.1:$w2_port/v1/chat/completions"
check=$(curl -s -o /dev/null -w "%{http_code}" -H "Authorization: Bearer $key" -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' "$w2_url")
[ "$check" = 200 ] || { echo "gateway: a request through the gateway (--workers 2) got $check"; cat "$work/w2.out"; exit 1; }
run "$GW_C" "$w2_url"; w2_rps=$(rps); w2_err=$(errs)
kill "$w2_pid" 2>/dev/null || true

# --- Portkey's gateway (node), the same upstream and body, pinned as the gateway ---
# Started from the package's bin (build/start-server.js --port=N --headless);
# the provider and upstream go in headers on every request: x-portkey-provider
# openai, x-portkey-custom-host the upstream's /v1 (127.0.0.1 is in Portkey's
# default trusted hosts). A warm-up run first so that V8 has compiled the hot
# path (without it the first seconds run at half speed, with 2 s timeouts).
PK_VERSION=1.15.2
PK_WARMUP=${PK_WARMUP:-10}
pk_dir=bench/node_modules/@portkey-ai/gateway
pk_skip=""
if ! command -v node >/dev/null; then
  pk_skip="node is not installed"
else
  if ! grep -q "\"version\": \"$PK_VERSION\"" "$pk_dir/package.json" 2>/dev/null; then
    # the same list as bench/run: an `npm install --no-save` removes what an earlier one put there
    (cd bench && npm install --no-save --no-audit --no-fund --silent --fetch-retries 1 \
      --fetch-retry-mintimeout 1000 --fetch-retry-maxtimeout 2000 cockatiel@3 bottleneck@2 \
      "@portkey-ai/gateway@$PK_VERSION" > "$work/npm.out" 2>&1) || true
  fi
  grep -q "\"version\": \"$PK_VERSION\"" "$pk_dir/package.json" 2>/dev/null ||
    pk_skip="npm package @portkey-ai/gateway@$PK_VERSION unavailable (npm install failed or no registry)"
fi
if [ -z "$pk_skip" ]; then
  pk_port=$(free_port)
  # the pinning at start, so that node's threads (libuv, V8's) are on core 0 too
  $pin_gw node "$pk_dir/build/start-server.js" --port="$pk_port" --headless > "$work/pk.out" 2>&1 &
  pk_pid=$!
  pk_url="http://127.0.0.1:$pk_port/v1/chat/completions"
  pk_host="http://127.0.0.1:$up_port/v1"
  pk_check() { curl -s -o "$work/pk.body" -w "%{http_code}" -H "Content-Type: application/json" \
    -H "x-portkey-provider: openai" -H "x-portkey-custom-host: $pk_host" -H "Authorization: Bearer sk-bench-123456" \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' "$pk_url" || true; }
  check=000
  for _ in $(seq 100); do check=$(pk_check); [ "$check" = 000 ] || break; sleep 0.1; done
  # nginx's reply (its id, made of nginx's $request_id) comes back: the request went through to the upstream
  if [ "$check" != 200 ] || ! grep -Eq '"id": ?"chatcmpl-[0-9a-f]{32}"' "$work/pk.body"; then
    pk_skip="a request through Portkey got $check: $(head -c 300 "$work/pk.body" 2>/dev/null)"
    kill "$pk_pid" 2>/dev/null || true
  fi
fi
if [ -z "$pk_skip" ]; then
  { cat "$work/post.lua"; cat <<LUA
wrk.headers["Authorization"] = "Bearer sk-bench-123456"
wrk.headers["x-portkey-provider"] = "openai"
wrk.headers["x-portkey-custom-host"] = "$pk_host"
LUA
  } > "$work/post_pk.lua"
  GW_KEY=unused $pin_rest wrk -t1 -c"$GW_C" -d"${PK_WARMUP}s" -s "$work/post_pk.lua" "$pk_url" > /dev/null || true
  pk_run() { GW_KEY=unused $pin_rest wrk -t1 -c"$1" -d"${GW_SECONDS}s" --latency -s "$work/post_pk.lua" "$pk_url" \
    > "$work/wrk.out" || true; }
  pk_run "$GW_C"; pk_rps=$(rps); pk_err=$(errs)
fi
# latency: everything on one core, so that neither path pays for waking another core
# (an idle core takes tens of microseconds to wake; the direct path would pay none)
if [ -n "$pin_gw" ]; then
  pin_rest="taskset -c 0"
  pin_nginx nginx 0
fi
# GW_LAT_RUNS rounds (default 3) of the three, alternated, each figure their median: one run's
# p99 on a shared machine is one scheduling hiccup (the direct path's went from 30 us to 1,250)
# and put the gateway's added p99 below zero
median() { tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
d50s="" d99s="" g50s="" g99s="" x50s="" x99s=""
for _ in $(seq "${GW_LAT_RUNS:-3}"); do
  run 1 "$direct"; d50s="$d50s $(pct 50%)"; d99s="$d99s $(pct 99%)"
  run 1 "$through"; g50s="$g50s $(pct 50%)"; g99s="$g99s $(pct 99%)"
  run 1 "$proxy"; x50s="$x50s $(pct 50%)"; x99s="$x99s $(pct 99%)"
done
d50=$(echo $d50s | median) d99=$(echo $d99s | median) g50=$(echo $g50s | median) g99=$(echo $g99s | median)
x50=$(echo $x50s | median) x99=$(echo $x99s | median)
kill "$(cat "$work/proxy.pid")" 2>/dev/null || true
if [ -z "$pk_skip" ]; then pk_run 1; p50=$(pct 50%); p99=$(pct 99%); kill "$pk_pid" 2>/dev/null || true; fi
echo "gateway: wrk ${GW_SECONDS}s per run, nginx upstream (1 worker), full policy (key, buckets, breaker, retry, ledger)"
echo "  $GW_C connections  direct ${d_rps} req/s; through the gateway ${g_rps} req/s ${d_err}${g_err}${pin_gw:+(gateway on core 0, wrk and nginx on core 1)}"
awk -v a="$w2_rps" -v b="$g_rps" -v w="$w2_where" -v e="$w2_err" -v c="$GW_C" 'BEGIN {
  printf "  --workers 2     %s req/s at %s connections, %.2fx one worker %s(%s)\n", a, c, a / b, e, w }'
awk -v a="$al_rps" -v b="$g_rps" -v e="$al_err" -v c="$GW_C" -v n="$al_lines" 'BEGIN {
  printf "  access log      %s req/s at %s connections, %.2fx without it %s(--log-level info to a file: %s lines)\n",
    a, c, (b > 0 ? a / b : 0), e, n }'
echo "  1 connection    direct p50 ${d50} us p99 ${d99} us; through p50 ${g50} us p99 ${g99} us; added p50 $((g50 - d50)) us, p99 $((g99 - d99)) us (medians of ${GW_LAT_RUNS:-3} runs${pin_gw:+, all on core 0})"
awk -v x="$x_rps" -v g="$g_rps" -v c="$GW_C" -v e="$x_err" -v a50="$((x50 - d50))" -v a99="$((x99 - d99))" -v w="${pin_gw:+, on core 0 as the gateway}" 'BEGIN {
  printf "  nginx proxy     %s req/s at %s connections %s(proxy_pass alone, no policy%s), the gateway %.2fx of it; added at 1 connection p50 %d us, p99 %d us\n",
    x, c, e, w, (x > 0 ? g / x : 0), a50, a99 }'
if [ -z "$pk_skip" ]; then
  pk_where="node $(node --version)${pin_gw:+, on core 0 as the gateway}, after a ${PK_WARMUP} s warm-up"
  awk -v a="$pk_rps" -v g="$g_rps" -v c="$GW_C" -v e="$pk_err" -v v="$PK_VERSION" -v w="$pk_where" 'BEGIN {
    r = a > 0 ? sprintf("%.1fx", g / a) : "n/a" # no division by zero: Portkey never fails the bench
    printf "  Portkey %s  %s req/s at %s connections %s(%s); resil-lua gateway %s Portkey (target >= 15x)\n",
      v, a, c, e, w, r }'
  awk -v p50="$p50" -v p99="$p99" -v d50="$d50" -v d99="$d99" -v g50="$g50" -v g99="$g99" 'BEGIN {
    ap = p50 - d50; aq = p99 - d99; gp = g50 - d50; gq = g99 - d99
    # a ratio only over an added latency above zero (noise can put a p99 below the direct p99)
    r50 = gp > 0 ? sprintf("%.1fx", ap / gp) : "n/a"; r99 = gq > 0 ? sprintf("%.1fx", aq / gq) : "n/a"
    printf "  Portkey 1 conn. p50 %d us p99 %d us; added p50 %d us, p99 %d us (%s and %s what the gateway adds)\n",
      p50, p99, ap, aq, r50, r99 }'
else
  echo "  Portkey         skipped: $pk_skip"
fi

# --- streams: GW_STREAMS concurrent streams of 200 deltas (10 ms apart) from the mock ---
GW_STREAMS=${GW_STREAMS:-1000}
kill "$gw_pid" 2>/dev/null || true
echo 'return { strict = true, reply = ("w "):rep(200), stream_interval = 0.01 }' > "$work/streams.lua"
mock_port=$(free_port)
"$RESIL" mock "$work/streams.lua" --port "$mock_port" > "$work/mock.out" 2>&1 &
mock_pid=$!
cat > "$work/streams_gw.lua" <<CONF
require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:$mock_port/v1", api_key = "sk-bench-123456" })
return { key_cache = 2 }
CONF
sgw_port=$(free_port)
"$RESIL" gateway --listen "127.0.0.1:$sgw_port" --config "$work/streams_gw.lua" --store "$db" --log-level error \
  > "$work/sgw.out" 2>&1 &
sgw_pid=$!
for _ in $(seq 100); do grep -q listening "$work/sgw.out" && grep -q http "$work/mock.out" && break; sleep 0.05; done
read -r _ d_ok _ d_s _ d_gap < <("$RESIL" bench/gateway_streams.lua "http://127.0.0.1:$mock_port/v1/chat/completions" "$GW_STREAMS")
read -r _ g_ok _ g_s _ g_gap < <("$RESIL" bench/gateway_streams.lua "http://127.0.0.1:$sgw_port/v1/chat/completions" "$GW_STREAMS")
rss=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$sgw_pid/status")
echo "gateway streams: $GW_STREAMS at once, 200 deltas each, 10 ms apart (mock upstream, no pinning)"
echo "  direct          ${d_ok} complete in ${d_s} s, mean gap between deltas ${d_gap} ms"
echo "  through         ${g_ok} complete in ${g_s} s, mean gap ${g_gap} ms; gateway peak RSS ${rss} MB"
