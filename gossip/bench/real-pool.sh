#!/bin/bash
# usage: gossip/bench/real-pool.sh BIN N SECONDS -> gossip bytes per node per second of N real
# `shoal node` processes in one pool at the default interval (from /metrics).
set -e
BIN=$1; N=$2; T=${3:-30}
D=$(mktemp -d); trap 'kill $(cat $D/pids 2>/dev/null) 2>/dev/null; rm -rf $D' EXIT
$BIN cert init --trust-domain g.shoal --out $D/ca >/dev/null
port() { python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
SEED=""
for i in $(seq 1 $N); do
  $BIN cert issue --ca $D/ca --name n$i --service web --out $D/n$i >/dev/null
  Q=$(port)
  $BIN node --name n$i --certs $D/n$i --listen 127.0.0.1:$Q --admin 127.0.0.1:0 --worker-threads 1 ${SEED:+--seed $SEED} > $D/n$i.out 2>&1 &
  echo -n "$! " >> $D/pids
  [ -z "$SEED" ] && SEED=127.0.0.1:$Q
done
for i in $(seq 1 $N); do for k in $(seq 100); do grep -q ' ready ' $D/n$i.out && break; sleep 0.2; done; done
ADM=(); for i in $(seq 1 $N); do ADM+=($(grep -o 'admin=[^ ]*' $D/n$i.out | head -1 | cut -d= -f2)); done
# wait until every node sees N members
for k in $(seq 300); do
  ok=1; for a in "${ADM[@]}"; do m=$(curl -s -m 5 http://$a/v1/members | python3 -c 'import sys,json;d=json.load(sys.stdin);print(len(d if isinstance(d,list) else d.get("members",[])))' 2>/dev/null || echo 0); [ "$m" -ge $N ] || { ok=0; break; }; done
  [ $ok = 1 ] && break; sleep 0.5
done
[ $ok = 1 ] && echo "formed: all $N see $N members (poll $k)" || { echo "not formed after $k polls:"; for a in "${ADM[@]}"; do curl -s -m 5 http://$a/v1/members | python3 -c 'import sys,json;d=json.load(sys.stdin);print(len(d if isinstance(d,list) else d.get("members",[])), end=" ")'; done; echo; }
rd() { for a in "${ADM[@]}"; do curl -s -m 5 http://$a/metrics | awk '/^shoal_gossip_bytes_total\{direction="out"\}/{o=$2} /^shoal_gossip_bytes_total\{direction="in"\}/{i=$2} END{print o+0, i+0}'; done; }
cpu() { for p in $(cat $D/pids); do awk '{print $14+$15}' /proc/$p/stat; done | awk '{s+=$1} END{print s}'; }
c0=$(cpu); rd > $D/m0; sleep $T; rd > $D/m1; c1=$(cpu)
echo "CPU: $(python3 -c "print(round(($c1-$c0)/100/$T/$N*100,2))") % of a core per node (all $N nodes: $(python3 -c "print(round(($c1-$c0)/100/$T*100,1))") %)"
paste $D/m0 $D/m1 | python3 -c "
import sys,statistics
T=$T
outs=[];ins=[]
for l in sys.stdin:
    o0,i0,o1,i1=map(float,l.split()); outs.append((o1-o0)/T); ins.append((i1-i0)/T)
for n,(o,i) in enumerate(zip(outs,ins)):
    if o>3*statistics.median(outs): print(f'outlier: n{n+1} out {o:.0f} B/s in {i:.0f} B/s')
print(f'N=$N interval=default over {T}s: out B/node/s median {statistics.median(outs):.0f} max {max(outs):.0f}; in median {statistics.median(ins):.0f}; out+in median {statistics.median([a+b for a,b in zip(outs,ins)]):.0f}')
"
