#!/bin/sh
# The origin: echo servers that answer with the source address and port they
# saw, on the destinations of the lab config; strict rp_filter so a packet that
# left the egress host through the wrong uplink is dropped (proves `via`).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq /egress-agent/dist/egress-agent_*.deb >/dev/null
for a in 192.0.2.10/32 192.0.2.53/32 198.51.100.10/32 10.99.0.10/32; do
  ip addr replace "$a" dev lo
done
ip -6 addr replace 2001:db8:ff::10/128 dev lo
sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1
# IPv6 on uplink A and the egress ranges routed to the egress host
dev_a=$(ip -o -4 addr show to 203.0.113.1 | awk '{print $2}')
ip -6 addr replace 2001:db8:a::1/64 dev "$dev_a" nodad
ip -6 route replace 2001:db8:10::/64 via 2001:db8:a::2
ip -6 route replace 2001:db8:11::/64 via 2001:db8:a::2
cat > /etc/systemd/system/egress-echo.service <<'UNIT'
[Unit]
Description=echo servers for the egress-agent lab
After=network-online.target
[Service]
Environment=PYTHONPATH=/usr/lib/egress-agent
ExecStart=/usr/bin/python3 -m egress_agent.lab.echo --tcp 192.0.2.10:8080 --tcp 198.51.100.10:8080 --tcp 10.99.0.10:8080 --tcp [2001:db8:ff::10]:8080 --tcp 192.0.2.53:53 --udp 192.0.2.10:8081 --udp [2001:db8:ff::10]:8081 --udp 192.0.2.53:53
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now egress-echo.service
