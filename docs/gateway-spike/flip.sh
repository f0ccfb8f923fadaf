#!/bin/bash
# alternately stop the active gateway's keepalived (then start it again) while 2 connections are held
R=/run/eagw
start() { ip netns exec eagw-$1 keepalived -n -l -D --vrrp -f $R/$1-ka.conf -p $R/$1-ka.pid -r $R/$1-kav.pid > $R/$1-ka.log 2>&1 & }
for g in g1 g2; do pgrep -f "$R/$g-ka.conf" >/dev/null || start $g; done; sleep 2
for i in $(seq 1 ${1:-6}); do
  m=$(ip netns exec eagw-g1 ip -br a | grep -q 203.0.113.140 && echo g1 || echo g2)
  for k in 1 2; do rm -f $R/c$k.json; ip netns exec eagw-m$k python3 client.py 6 $R/c$k.json & done
  sleep 1.5; pkill -f "$R/$m-ka.conf"; sleep 1.5; start $m
  sleep 6
  echo "$i stopped $m: $(cat $R/c1.json 2>/dev/null || echo none) | $(cat $R/c2.json 2>/dev/null|| echo none)"
done
