#!/bin/bash
# mallocs.sh FILE N: calls to malloc per request in a callgrind dump
f=$1; n=$2
id=$(grep -oE '^c?fn=\([0-9]+\) malloc$' $f | head -1 | grep -oE '\([0-9]+\)')
awk -v id="$id" 'index($0,"cfn="id)==1{m=1;next} m&&/^calls=/{split($1,a,"=");s+=a[2];m=0;next} {m=0} END{printf "%.1f\n", s/'$n'}' $f
