#!/usr/bin/env bash
# Idle and light-load RSS/CPU of real release `shoal node` processes (3-node mesh on loopback).
set -euo pipefail
S=${1:?shoal binary}; RPS=${2:-200}; SECS=${3:-20}
cd "$(mktemp -d)"
$S cert init --out ca --trust-domain meas.shoal >/dev/null
for n in n1 n2 n3; do $S cert issue --ca ca --name $n --service web --out $n >/dev/null; done
mkdir www && echo hello > www/hello
python3 -m http.server 28080 --bind 127.0.0.1 --directory www >/dev/null 2>&1 & APP=$!
$S node --name n1 --listen 127.0.0.1:27001 --admin 127.0.0.1:29001 --certs n1 --outbound 127.0.0.1:24140 >n1.log 2>&1 & P1=$!
$S node --name n2 --listen 127.0.0.1:27002 --admin 127.0.0.1:29002 --certs n2 --seed 127.0.0.1:27001 >n2.log 2>&1 & P2=$!
$S node --name n3 --listen 127.0.0.1:27003 --admin 127.0.0.1:29003 --certs n3 --seed 127.0.0.1:27001 --service web=127.0.0.1:28080 >n3.log 2>&1 & P3=$!
trap 'kill $P1 $P2 $P3 $APP 2>/dev/null' EXIT
until [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: web' http://127.0.0.1:24140/hello)" = 200 ]; do sleep 0.5; done
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
rss() { awk '/VmRSS/{print $2}' /proc/$1/status; }
sample() { # label seconds
  local a1 a3 b1 b3; a1=$(cpu $P1); a3=$(cpu $P3); sleep $2; b1=$(cpu $P1); b3=$(cpu $P3)
  echo "$1: n1 (caller) RSS $(( $(rss $P1)/1024 )) MiB CPU $(awk -v d=$((b1-a1)) -v t=$tck -v s=$2 'BEGIN{printf "%.1f", 100*d/t/s}')% | n3 (server) RSS $(( $(rss $P3)/1024 )) MiB CPU $(awk -v d=$((b3-a3)) -v t=$tck -v s=$2 'BEGIN{printf "%.1f", 100*d/t/s}')%"
}
sleep 5
sample "idle ${SECS}s" $SECS
python3 - "$RPS" "$((SECS+4))" <<'PY' & LOAD=$!
import http.client, sys, time
rps, secs = int(sys.argv[1]), float(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", 24140); ok = n = 0
start = time.monotonic()
while time.monotonic() - start < secs:
    t = start + n / rps
    d = t - time.monotonic()
    if d > 0: time.sleep(d)
    c.request("GET", "/hello", headers={"Host": "web"}); r = c.getresponse(); r.read()
    ok += r.status == 200; n += 1
print(f"load: {n} requests in {secs:.0f}s, {ok} ok", file=sys.stderr)
PY
sleep 2
sample "${RPS} req/s ${SECS}s" $SECS
wait $LOAD
