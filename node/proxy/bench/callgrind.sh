#!/bin/bash
# usage: cg.sh BIN OUTDIR N [tool]
# Runs nginx upstream (1 KiB), node B and node A under valgrind (callgrind, instrumentation off
# at start), warms up, turns instrumentation on, drives N sequential keep-alive requests with curl,
# dumps, and prints Ir per request per node.
set -e
BIN=$1; OUT=$2; N=${3:-500}
rm -rf $OUT; mkdir -p $OUT/www
head -c 1024 /dev/zero | tr '\0' x > $OUT/www/bench
UP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
OB=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat > $OUT/nginx.conf <<NG
worker_processes 1; pid $OUT/nginx.pid; error_log $OUT/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$UP; root $OUT/www; keepalive_requests 1000000; } }
NG
nginx -p $OUT -c $OUT/nginx.conf -g 'daemon off;' & NGX=$!
$BIN cert init --trust-domain bench.shoal --out $OUT/ca >/dev/null
$BIN cert issue --ca $OUT/ca --name a --service client --out $OUT/a >/dev/null
$BIN cert issue --ca $OUT/ca --name b --service web --out $OUT/b >/dev/null
VG="valgrind --tool=callgrind --instr-atstart=no --dump-instr=no"
$VG --callgrind-out-file=$OUT/cg.b $BIN node --name b --certs $OUT/b --listen 127.0.0.1:0 --admin 127.0.0.1:0 --worker-threads 1 --service web=127.0.0.1:$UP > $OUT/b.out 2>$OUT/b.err & PB=$!
for i in $(seq 120); do grep -q ' ready ' $OUT/b.out 2>/dev/null && break; sleep 0.5; done
BQ=$(grep -o 'quic=[^ ]*' $OUT/b.out | head -1 | cut -d= -f2)
$VG --callgrind-out-file=$OUT/cg.a $BIN node --name a --certs $OUT/a --listen 127.0.0.1:0 --admin 127.0.0.1:0 --worker-threads 1 --seed $BQ --outbound 127.0.0.1:$OB > $OUT/a.out 2>$OUT/a.err & PA=$!
for i in $(seq 240); do c=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: web' http://127.0.0.1:$OB/bench || true); [ "$c" = 200 ] && break; sleep 0.5; done
echo "ready after $i polls (code $c)"
# warm-up
curl -s -o /dev/null -H 'Host: web' "http://127.0.0.1:$OB/bench?[1-50]"
sleep 1
callgrind_control -i on $PA >/dev/null; callgrind_control -i on $PB >/dev/null
T0=$(date +%s.%N)
curl -s -o /dev/null -w '%{http_code}\n' -H 'Host: web' "http://127.0.0.1:$OB/bench?[1-$N]" | sort | uniq -c
T1=$(date +%s.%N)
callgrind_control -d $PA >/dev/null; callgrind_control -d $PB >/dev/null
callgrind_control -i off $PA >/dev/null; callgrind_control -i off $PB >/dev/null
# idle for the same time, to subtract background (gossip, timers)
callgrind_control -z $PA >/dev/null; callgrind_control -z $PB >/dev/null
callgrind_control -i on $PA >/dev/null; callgrind_control -i on $PB >/dev/null
sleep $(python3 -c "print($T1-$T0)")
callgrind_control -d idle $PA >/dev/null; callgrind_control -d idle $PB >/dev/null
kill $PA $PB $NGX; wait $PA $PB 2>/dev/null || true
echo "load seconds: $(python3 -c "print(round($T1-$T0,1))")"
for n in a b; do
  f=$OUT/cg.$n.1; fi=$OUT/cg.$n.2
  ir=$(grep '^summary:' $f | awk '{print $2}'); idle=$(grep '^summary:' $fi | awk '{print $2}')
  echo "node $n: Ir/req $(( (ir-idle)/N ))  (load $ir, idle $idle)"
done
