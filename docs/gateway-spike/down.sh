#!/bin/bash
P=eagw
for f in /run/$P/*.pid; do [ -f "$f" ] && kill $(cat $f) 2>/dev/null; done
sleep 0.5
for x in fab inet o w1 w2 g1 g2 m1 m2; do ip netns del $P-$x 2>/dev/null; done
rm -rf /run/$P
