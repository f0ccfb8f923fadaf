#!/bin/sh
# One host of the gateway-pair lab as a VM (issue 13): the same hosts, addresses
# and fleet file as `egress-agent lab pair`, whose namespaces become machines.
#   provision.sh HOST RENDERED [IFNAME=MAC ...]
# HOST is w1, w2, g1, g2 or origin; RENDERED the directory `vagrant/vmlab render`
# wrote (`egress-agent fleet render` of the lab's fleet file: RENDERED/HOST/...);
# IFNAME=MAC renames the NIC with that MAC to fabr0 (the fabric) or up0 (the
# uplink), the names the fleet file uses. Run as root, once per boot; runs
# again without harm. Needs no mirror: the image (vagrant/vm-image) has every
# package, and the agent comes from /egress-agent/dist/*.deb (packaging/build-deb).
# `vagrant/vmlab` runs it in its qemu VMs; vagrant/pair/Vagrantfile in boxes.
set -eu
host=$1 rendered=$2
shift 2
export DEBIAN_FRONTEND=noninteractive
for m in "$@"; do  # IFNAME=MAC
  name=${m%%=*} mac=${m#*=}
  dev=$(ip -o link | awk -v mac="$mac" 'tolower($0) ~ "link/ether " tolower(mac) {sub(":$", "", $2); sub("@.*", "", $2); print $2; exit}')
  [ -n "$dev" ] || { echo "provision: no NIC with MAC $mac for $name" >&2; exit 1; }
  if [ "$dev" != "$name" ]; then
    ip addr flush dev "$dev"
    ip link set "$dev" down
    ip link set "$dev" name "$name"
  fi
  ip link set "$name" up
done
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
case $host in
  w1) ip addr replace 10.200.0.11/24 dev fabr0 ;;
  w2) ip addr replace 10.200.0.12/24 dev fabr0 ;;
  g1|g2)
    a=$([ "$host" = g1 ] && echo 2 || echo 3)
    ip addr replace "10.200.0.$a/24" dev fabr0
    ip addr replace "203.0.113.$a/24" dev up0
    ip -6 addr replace "2001:db8:f::$a/64" dev up0 nodad ;;
  origin)
    ip addr replace 203.0.113.10/24 dev up0
    ip -6 addr replace 2001:db8:f::10/64 dev up0 nodad ;;
  *) echo "provision: unknown host $host (w1 w2 g1 g2 origin)" >&2; exit 2 ;;
esac
# the agent from the checkout's package (its Python dependencies are inside it);
# reinstalled only when the package changed
deb=$(ls /egress-agent/dist/egress-agent_*.deb | tail -n 1)
if ! cmp -s "$deb" /var/cache/egress-agent-lab.deb; then
  dpkg -i "$deb" >/dev/null
  cp "$deb" /var/cache/egress-agent-lab.deb
fi

if [ "$host" = origin ]; then
  # the app range is routed to the pair's IPv6 address on the uplink (vip6)
  ip -6 route replace 2001:db8:140::/64 via 2001:db8:f::1
  cat > /etc/systemd/system/egress-lab-echo.service <<'UNIT'
[Unit]
Description=echo server of egress-agent's pair lab: answers with the source it saw
[Service]
Environment=PYTHONPATH=/usr/lib/egress-agent
ExecStart=/usr/bin/python3 -m egress_agent.lab.echo --tcp 203.0.113.10:7000 --udp 203.0.113.10:7000 --tcp [2001:db8:f::10]:7000 --tcp 203.0.113.10:7001
Restart=always
UNIT
  systemctl daemon-reload
  systemctl restart egress-lab-echo.service
  # what reaches the echo ports from anyone but the app IPs: must stay 0
  nft -f - <<'NFT'
table inet lab_origin
delete table inet lab_origin
table inet lab_origin {
  counter leaked { }
  chain input {
    type filter hook input priority 0;
    tcp dport 7000 ip saddr != 203.0.113.140 counter name "leaked"
    tcp dport 7000 ip6 saddr != 2001:db8:140::/64 counter name "leaked"
    tcp dport 7001 ip saddr != 203.0.113.141 counter name "leaked"
  }
}
NFT
  echo "provision: origin ready"
  exit 0
fi

d=$rendered/$host
# the machine on a workload host: a network namespace behind a veth, as in the
# namespace lab (a VM or container on a real host)
case $host in
  w1|w2)
    k=${host#w}
    ip netns add "m$k" 2>/dev/null || true
    ip link show "m$k" >/dev/null 2>&1 || ip link add "m$k" type veth peer name eth0 netns "m$k"
    ip addr replace "10.1.$k.1/24" dev "m$k"
    ip -6 addr replace "fd00:$k::1/64" dev "m$k" nodad
    ip link set "m$k" up
    ip -n "m$k" link set lo up
    ip -n "m$k" link set eth0 up
    ip -n "m$k" addr replace "10.1.$k.2/24" dev eth0
    ip -n "m$k" -6 addr replace "fd00:$k::2/64" dev eth0 nodad
    ip -n "m$k" route replace default via "10.1.$k.1"
    ip -n "m$k" -6 route replace default via "fd00:$k::1" ;;
esac
# what packaging/ansible/pair.yml installs: the tunnels script, and on gateways
# keepalived's and conntrackd's files
# tunnels.sh sets conntrack's sysctls on gateways: the module must be there first
# (on a host that has run nftables' NAT it is; a fresh VM has not)
modprobe nf_conntrack
install -m 0755 "$d/tunnels.sh" /usr/local/sbin/egress-agent-tunnels
/usr/local/sbin/egress-agent-tunnels
install -d /etc/egress-agent
install -m 0644 "$d/config.yaml" /etc/egress-agent/config.yaml
egress-agent check -c /etc/egress-agent/config.yaml >/dev/null
case $host in
  g1|g2)
    install -m 0644 "$d/keepalived.conf" /etc/keepalived/keepalived.conf
    install -m 0755 "$d/notify" /etc/keepalived/egress-agent-notify
    install -d /etc/conntrackd /run/conntrackd
    install -m 0644 "$d/conntrackd.conf" /etc/conntrackd/conntrackd.conf ;;
esac
case $host in
  w1|w2)
    # the daemon's probe of the pair (ICMP echo through the tunnel) needs a ping
    # socket for its group and the tunnel peers allowed by the unit's IP filter
    # (README: "Install on a host")
    gid=$(getent group egress-agent | cut -d: -f3)
    echo "net.ipv4.ping_group_range = $gid $gid" > /etc/sysctl.d/60-egress-agent-ping.conf
    sysctl -q -p /etc/sysctl.d/60-egress-agent-ping.conf
    install -d /etc/systemd/system/egress-agent.service.d
    printf '[Service]\nIPAddressAllow=10.250.0.0/16 fd00:250::/64\n' \
      > /etc/systemd/system/egress-agent.service.d/probe.conf
    systemctl daemon-reload ;;
esac
if [ "$(systemd-detect-virt 2>/dev/null)" = qemu ]; then
  # qemu's own emulation (TCG, no KVM): Python runs several times slower and the
  # daemon's start (imports, first sync) outlasts the unit's 30 s watchdog
  install -d /etc/systemd/system/egress-agent.service.d
  printf '[Service]\nWatchdogSec=300\nTimeoutStartSec=600\n' \
    > /etc/systemd/system/egress-agent.service.d/emulated.conf
  systemctl daemon-reload
fi
systemctl enable egress-agent.service >/dev/null 2>&1
systemctl restart egress-agent.service
if [ "$host" = g1 ] || [ "$host" = g2 ]; then
  # the gate is closed until keepalived makes this host the active one
  egress-agent gateway backup -c /etc/egress-agent/config.yaml >/dev/null
  systemctl enable conntrackd.service keepalived.service >/dev/null 2>&1
  systemctl restart conntrackd.service
  systemctl restart keepalived.service
fi
echo "provision: $host ready"
