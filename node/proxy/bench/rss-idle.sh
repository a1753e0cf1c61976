#!/bin/bash
# usage: node/proxy/bench/rss-idle.sh BIN -> VmRSS / RssAnon / RssFile of a lone
# `shoal node --worker-threads 1`, 5 s after start, three times.
BIN=$1
for i in 1 2 3; do
D=$(mktemp -d)
$BIN cert init --trust-domain t.shoal --out $D/ca >/dev/null && $BIN cert issue --ca $D/ca --name a --service web --out $D/a >/dev/null
$BIN node --name a --certs $D/a --listen 127.0.0.1:0 --admin 127.0.0.1:0 --worker-threads 1 > $D/out 2>&1 & P=$!
sleep 5
grep -E 'VmRSS|RssAnon|RssFile' /proc/$P/status | tr -s ' \t' ' ' | tr '\n' ' '; echo
kill $P; wait $P 2>/dev/null; rm -rf $D
done
