#!/bin/bash
# usage: node/proxy/bench/sched-policy.sh BIN [ROUNDS] [HOGS]
# nginx (1 KiB file) <- node B <- node A, both `--worker-threads 1`, started
# with `--sched-policy normal`, then `batch`, ROUNDS times (default 3). Each
# start gets 5,000 requests at 1,000 a second on one keep-alive connection
# (h2load --rps), and the script prints h2load's mean latency and, per node,
# context switches (voluntary / involuntary) and CPU-seconds per 1,000
# requests from /proc. HOGS (default 0) busy loops run meanwhile, to see the
# policy with CPU-bound neighbours filling the cores.
set -e
BIN=$(realpath "$1"); ROUNDS=${2:-3}; HOGS=${3:-0}; N=5000
OUT=$(mktemp -d /tmp/sched-policy.XXXXXX)
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; nginx -p $OUT -c $OUT/nginx.conf -s stop 2>/dev/null || true; rm -rf $OUT; }
trap cleanup EXIT
mkdir -p $OUT/www; head -c 1024 /dev/zero | tr '\0' x > $OUT/www/bench
UP=$(port)
cat > $OUT/nginx.conf <<NG
worker_processes 1; pid $OUT/nginx.pid; error_log $OUT/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$UP; root $OUT/www; keepalive_requests 1000000; } }
NG
nginx -p $OUT -c $OUT/nginx.conf
$BIN cert init --trust-domain bench.shoal --out $OUT/ca >/dev/null
$BIN cert issue --ca $OUT/ca --name a --service client --out $OUT/a >/dev/null
$BIN cert issue --ca $OUT/ca --name b --service web --out $OUT/b >/dev/null
for i in $(seq $HOGS); do sh -c 'while :; do :; done' & PIDS+=($!); done
# switches (voluntary, involuntary) of all threads, then utime+stime ticks
usage() { v=0; nv=0; for t in /proc/$1/task/*; do
  v=$((v + $(awk '/^voluntary_ctxt/{print $2}' $t/status))); nv=$((nv + $(awk '/^nonvoluntary_ctxt/{print $2}' $t/status))); done
  echo "$v $nv $(awk '{print $14+$15}' /proc/$1/stat)"; }
TCK=$(getconf CLK_TCK)
for r in $(seq $ROUNDS); do for pol in normal batch; do
  $BIN node --name b --certs $OUT/b --listen 127.0.0.1:0 --admin 127.0.0.1:0 --worker-threads 1 \
    --sched-policy $pol --service web=127.0.0.1:$UP > $OUT/b.out 2>$OUT/b.err & B=$!
  for i in $(seq 80); do grep -q ' ready ' $OUT/b.out 2>/dev/null && break; sleep 0.25; done
  BQ=$(grep -o 'quic=[^ ]*' $OUT/b.out | head -1 | cut -d= -f2); OB=$(port)
  $BIN node --name a --certs $OUT/a --listen 127.0.0.1:0 --admin 127.0.0.1:0 --worker-threads 1 \
    --sched-policy $pol --seed $BQ --outbound 127.0.0.1:$OB > $OUT/a.out 2>$OUT/a.err & A=$!
  PIDS+=($A $B)
  for i in $(seq 80); do [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: web' http://127.0.0.1:$OB/bench)" = 200 ] && break; sleep 0.25; done
  h2load --h1 -n 1000 -c 1 -H ':authority: web' http://127.0.0.1:$OB/bench > /dev/null   # warm-up
  ua0=$(usage $A); ub0=$(usage $B)
  mean=$(h2load --h1 -n $N -c 1 --rps 1000 -H ':authority: web' http://127.0.0.1:$OB/bench | awk '/time for request:/{print $6}')
  ua1=$(usage $A); ub1=$(usage $B)
  line="round $r $pol: mean $mean"
  for n in A B; do
    if [ $n = A ]; then set -- $ua0 $ua1; else set -- $ub0 $ub1; fi
    line="$line | $n switches/req $(awk -v a=$1 -v b=$4 -v n=$N 'BEGIN{printf "%.2f", (b-a)/n}') / $(awk -v a=$2 -v b=$5 -v n=$N 'BEGIN{printf "%.2f", (b-a)/n}') cpu-s/1k $(awk -v a=$3 -v b=$6 -v n=$N -v t=$TCK 'BEGIN{printf "%.3f", (b-a)/t/n*1000}')"
  done
  echo "$line"
  kill $A $B; wait $A $B 2>/dev/null || true
done; done
