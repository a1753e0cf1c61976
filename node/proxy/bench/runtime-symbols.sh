#!/bin/bash
# usage: node/proxy/bench/runtime-symbols.sh BIN OUT [REQUESTS]
# Writes OUT (node/hot-symbols.txt): the mangled names of every function of
# BIN that ran in a node after start-up, on both sides of a request, most
# instructions first. Two nodes (B serving an nginx upstream, A calling it
# through its outbound listener) run under valgrind's callgrind with
# collection off until they are up and warmed; then REQUESTS keep-alive
# requests (default 2000), a few concurrent ones, a metrics scrape and
# some idle gossip rounds are collected. node/build.rs hands the list to
# the linker, so this code sits together at the start of .text and a node
# that lets go of its start-up code (node/src/resident.rs) maps back only
# these pages. Needs nginx, valgrind and curl. Regenerate from a
# `--profile dist` build after changes to the request or gossip paths.
set -e
BIN=$(realpath "$1"); OUT=$2; N=${3:-2000}
D=$(mktemp -d); chmod 755 $D
trap 'kill $PA $PB $NGX 2>/dev/null; rm -rf $D' EXIT
mkdir -p $D/www; head -c 1024 /dev/zero | tr '\0' x > $D/www/bench
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
UP=$(port); OB=$(port); AA=$(port); BA=$(port)
cat > $D/nginx.conf <<NG
worker_processes 1; pid $D/nginx.pid; error_log $D/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:$UP; root $D/www; keepalive_requests 1000000; } }
NG
nginx -p $D -c $D/nginx.conf -g 'daemon off;' & NGX=$!
$BIN cert init --trust-domain rt.shoal --out $D/ca >/dev/null
$BIN cert issue --ca $D/ca --name a --service client --out $D/a >/dev/null
$BIN cert issue --ca $D/ca --name b --service web --out $D/b >/dev/null
VG="valgrind --tool=callgrind --instr-atstart=no --dump-instr=no --demangle=no"
$VG --callgrind-out-file=$D/cg.b $BIN node --name b --certs $D/b --listen 127.0.0.1:0 --admin 127.0.0.1:$BA --worker-threads 1 --service web=127.0.0.1:$UP > $D/b.out 2>$D/b.err & PB=$!
for i in $(seq 240); do grep -q ' ready ' $D/b.out 2>/dev/null && break; sleep 0.5; done
BQ=$(grep -o 'quic=[^ ]*' $D/b.out | head -1 | cut -d= -f2)
$VG --callgrind-out-file=$D/cg.a $BIN node --name a --certs $D/a --listen 127.0.0.1:0 --admin 127.0.0.1:$AA --worker-threads 1 --seed $BQ --outbound 127.0.0.1:$OB > $D/a.out 2>$D/a.err & PA=$!
for i in $(seq 480); do c=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: web' http://127.0.0.1:$OB/bench || true); [ "$c" = 200 ] && break; sleep 0.5; done
[ "$c" = 200 ] || { echo "the mesh never answered 200 (last: $c)" >&2; exit 1; }
curl -s -o /dev/null -H 'Host: web' "http://127.0.0.1:$OB/bench?[1-50]"
callgrind_control -i on $PA >/dev/null; callgrind_control -i on $PB >/dev/null
curl -s -o /dev/null -H 'Host: web' "http://127.0.0.1:$OB/bench?[1-$N]"
for j in 1 2 3 4; do curl -s -o /dev/null -H 'Host: web' "http://127.0.0.1:$OB/bench?[1-100]" & done; wait %4 %5 %6 %7 2>/dev/null || true
curl -s -o /dev/null http://127.0.0.1:$AA/metrics; curl -s -o /dev/null http://127.0.0.1:$BA/metrics
sleep 5
callgrind_control -d $PA >/dev/null; callgrind_control -d $PB >/dev/null
kill $PA $PB; wait $PA $PB 2>/dev/null || true
# Self cost per function of BIN, summed over both nodes, highest first.
for f in $D/cg.a.1 $D/cg.b.1; do
  awk -v bin="$BIN" '
    /^ob=/ { s = substr($0, 4); if (s ~ /^\([0-9]+\) /) { id = s; sub(/ .*/, "", id); nm = s; sub(/^\([0-9]+\) /, "", nm); ob[id] = nm; cur = nm } else if (s ~ /^\([0-9]+\)$/) cur = ob[s]; else cur = s; next }
    /^fn=/ { s = substr($0, 4); if (s ~ /^\([0-9]+\) /) { id = s; sub(/ .*/, "", id); nm = s; sub(/^\([0-9]+\) /, "", nm); fnn[id] = nm; fn = nm } else if (s ~ /^\([0-9]+\)$/) fn = fnn[s]; else fn = s; infn = (cur == bin); next }
    /^c(ob|fn|fi|fe)=/ { s = substr($0, 5); if (s ~ /^\([0-9]+\) /) { id = s; sub(/ .*/, "", id); nm = s; sub(/^\([0-9]+\) /, "", nm); if ($0 ~ /^cob/) ob[id] = nm; else if ($0 ~ /^cfn/) fnn[id] = nm } next }
    /^calls=/ { skip = 1; next }
    /^[0-9+-]/ { if (skip) { skip = 0; next } if (infn) cost[fn] += $2; next }
    END { for (f in cost) if (cost[f] > 0) print cost[f], f }' "$f"
done | awk '{c[$2] += $1} END {for (f in c) print c[f], f}' | sort -rn | awk '{print $2}' > "$OUT"
echo "$(wc -l < "$OUT") functions written to $OUT"
