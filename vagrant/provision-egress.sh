#!/bin/sh
# The egress host: the package, the egress addresses (provisioning's job, not
# the agent's), machine workloads as network namespaces behind vm-* links, a
# cgroup workload, then the agent as its systemd service and a verify.
set -eu
name="$1"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq /egress-agent/dist/egress-agent_*.deb >/dev/null
dev_a=$(ip -o -4 addr show to 203.0.113.0/25 | awk '{print $2; exit}')
dev_b=$(ip -o -4 addr show to 203.0.113.128/25 | awk '{print $2; exit}')
sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
# egress addresses, and a default route to the origin for the lab's destinations
for a in 203.0.113.10 203.0.113.11 203.0.113.20; do ip addr replace "$a/25" dev "$dev_a"; done
ip addr replace 203.0.113.140/25 dev "$dev_b"
ip -6 addr replace 2001:db8:a::2/64 dev "$dev_a" nodad
ip -6 addr replace 2001:db8:10::1/64 dev "$dev_a" nodad
ip -6 addr replace 2001:db8:11::1/64 dev "$dev_a" nodad
for n in 192.0.2.0/24 198.51.100.0/24 10.99.0.0/16; do ip route replace "$n" via 203.0.113.1 dev "$dev_a"; done
ip -6 route replace 2001:db8:ff::/64 via 2001:db8:a::1 dev "$dev_a"
# the host's own default egress for excluded traffic: someone else's masquerade
nft -f - <<NFT
table ip lab_nat
delete table ip lab_nat
table ip lab_nat {
  chain postrouting { type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.0.0.0/8 oifname { "$dev_a", "$dev_b" } masquerade }
}
NFT
# machines: one namespace per workload, routed like VMs behind vm-<name>
machine() {  # name ipv4 [ipv6]
  ip netns add "vm-$1" 2>/dev/null || true
  ip link add "vm-$1" type veth peer name eth0 netns "vm-$1" 2>/dev/null || true
  ip link set "vm-$1" up
  ip addr replace 10.0.1.1/32 dev "vm-$1"
  ip route replace "$2/32" dev "vm-$1"
  ip -n "vm-$1" link set lo up
  ip -n "vm-$1" link set eth0 up
  ip -n "vm-$1" addr replace "$2/32" dev eth0
  ip -n "vm-$1" route replace 10.0.1.1 dev eth0
  ip -n "vm-$1" route replace default via 10.0.1.1
  if [ -n "${3:-}" ]; then
    ip -6 addr replace fd00:1::1/128 dev "vm-$1" nodad
    ip -6 route replace "$3/128" dev "vm-$1"
    ip -n "vm-$1" -6 addr replace "$3/128" dev eth0 nodad
    ip -n "vm-$1" -6 route replace fd00:1::1 dev eth0
    ip -n "vm-$1" -6 route replace default via fd00:1::1
  fi
}
machine m42 10.0.1.2 fd00:1::2
machine m43 10.0.1.3
machine m44 10.0.1.4
# the cgroup workload's cgroup (a real host would use a systemd unit's slice)
mkdir -p /sys/fs/cgroup/egress-lab-vm/app.service
sed -e 's/@PREFIX@/vm/' -e 's|state_dir: .*|state_dir: /var/lib/egress-agent|' \
    -e "s/dev: up1/dev: $dev_b/" /egress-agent/egress_agent/lab/demo.yaml \
    > /etc/egress-agent/config.yaml
egress-agent check -c /etc/egress-agent/config.yaml
systemctl enable --now egress-agent.service
sleep 2
systemctl --no-pager status egress-agent.service | head -n 5
# the same checks as the namespace lab: cgroup workloads and the vm-* machines
egress-agent verify -c /etc/egress-agent/config.yaml --echo 192.0.2.10:8080 --lab vm
