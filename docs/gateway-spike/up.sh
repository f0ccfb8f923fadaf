#!/bin/bash
# spike: two gateways (keepalived VRRP + conntrackd FTFW) for one app IP, two workload hosts over VXLAN
set -eux
P=eagw; R=/run/$P; mkdir -p $R
n() { ip netns exec $P-$1 "${@:2}"; }
for x in fab inet o w1 w2 g1 g2 m1 m2; do ip netns add $P-$x; n $x ip link set lo up; done
n fab ip link add br0 type bridge; n fab ip link set br0 up
n inet ip link add br0 type bridge; n inet ip link set br0 up
# fabric links
i=0; for h in w1 w2 g1 g2; do
  ip link add $P-f$h netns $P-$h type veth peer name f$h netns $P-fab
  n fab ip link set f$h master br0 up
  n $h ip link set $P-f$h name fabr0; n $h ip link set fabr0 up
done
n w1 ip addr add 10.200.0.11/24 dev fabr0; n w2 ip addr add 10.200.0.12/24 dev fabr0
n g1 ip addr add 10.200.0.2/24 dev fabr0;  n g2 ip addr add 10.200.0.3/24 dev fabr0
# uplink (internet) for gateways + origin
for h in g1 g2 o; do
  ip link add $P-u$h netns $P-$h type veth peer name u$h netns $P-inet
  n inet ip link set u$h master br0 up
  n $h ip link set $P-u$h name up0; n $h ip link set up0 up
done
n o ip addr add 203.0.113.10/24 dev up0
n g1 ip addr add 203.0.113.2/24 dev up0; n g2 ip addr add 203.0.113.3/24 dev up0
# machines
for k in 1 2; do
  ip link add $P-m netns $P-m$k type veth peer name m$k netns $P-w$k
  n m$k ip link set $P-m name eth0; n m$k ip link set eth0 up; n m$k ip addr add 10.1.$k.2/24 dev eth0
  n m$k ip route add default via 10.1.$k.1
  n w$k ip link set m$k up; n w$k ip addr add 10.1.$k.1/24 dev m$k
  n w$k sysctl -qw net.ipv4.ip_forward=1
  # overlay to the gateway pair's fabric VIP; the app's traffic goes there untranslated
  n w$k ip link add gw0 type vxlan id 10$k remote 10.200.0.100 local 10.200.0.1$k dstport 4789 dev fabr0 nolearning
  n w$k ip link set gw0 up; n w$k ip addr add 10.250.$k.1/30 dev gw0
  n w$k ip rule add from 10.1.$k.2 lookup 100 pref 100
  n w$k ip route add default via 10.250.$k.2 dev gw0 table 100
done
for g in g1 g2; do
  n $g sysctl -qw net.ipv4.ip_forward=1
  n $g sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0 || { n $g modprobe nf_conntrack; n $g sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0; }
  for k in 1 2; do
    n $g ip link add w$k type vxlan id 10$k remote 10.200.0.1$k dstport 4789 dev fabr0 nolearning
    n $g ip link set w$k address 02:ea:00:00:00:0$k   # same MAC on both gateways
    n $g ip link set w$k up; n $g ip addr add 10.250.$k.2/30 dev w$k
    n $g ip route add 10.1.$k.0/24 via 10.250.$k.1 dev w$k
  done
  n $g nft -f - <<NFT
table ip eagw {
  chain gate { drop; }
  chain input { type filter hook input priority 0; policy accept;
    ip daddr 203.0.113.140 drop; }
  chain forward { type filter hook forward priority 0; policy accept;
    ct state invalid drop
    iifname { "w1", "w2" } ct state new jump gate
    iifname "w1" ip saddr != 10.1.1.2 drop
    iifname "w2" ip saddr != 10.1.2.2 drop; }
  chain postrouting { type nat hook postrouting priority srcnat;
    oifname "up0" iifname "w1" ip saddr 10.1.1.2 meta l4proto { tcp, udp } snat to 203.0.113.140:10240-11263
    oifname "up0" iifname "w2" ip saddr 10.1.2.2 meta l4proto { tcp, udp } snat to 203.0.113.140:11264-12287; }
}
NFT
done
