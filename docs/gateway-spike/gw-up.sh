#!/bin/bash
# keepalived + conntrackd on g1 (priority 150) and g2 (100)
set -eu
P=eagw; R=/run/$P; D=$(cd "$(dirname "$0")" && pwd)
for g in g1 g2; do
  if [ $g = g1 ]; then me=10.200.0.2; peer=10.200.0.3; prio=150; else me=10.200.0.3; peer=10.200.0.2; prio=100; fi
  cat > $R/$g-ct.conf <<CT
Sync {
	Mode FTFW {
		DisableExternalCache Off
	}
	UDP {
		IPv4_address $me
		IPv4_Destination_Address $peer
		Port 3780
		Interface fabr0
		SndSocketBuffer 1249280
		RcvSocketBuffer 1249280
		Checksum on
	}
}
General {
	HashSize 8192
	HashLimit 65536
	LogFile $R/$g-ct.log
	Syslog off
	LockFile $R/$g-ct.lock
	UNIX {
		Path $R/$g-ct.ctl
	}
	NetlinkBufferSize 2097152
	NetlinkBufferSizeMaxGrowth 8388608
	Filter From Userspace {
		Protocol Accept {
			TCP
			UDP
		}
		Address Ignore {
			IPv4_address 127.0.0.1
			IPv4_address 10.200.0.0/24
		}
	}
}
CT
  cat > $R/$g-ka.conf <<KA
global_defs {
	router_id $g
	script_user root
	enable_script_security
}
vrrp_instance app {
	state BACKUP
	nopreempt
	interface fabr0
	virtual_router_id 51
	version 3
	priority $prio
	advert_int 0.1
	unicast_src_ip $me
	unicast_peer {
		$peer
	}
	track_interface {
		up0
	}
	virtual_ipaddress {
		10.200.0.100/24 dev fabr0
		203.0.113.140/24 dev up0
	}
	notify_master "$D/ct.sh $g primary"
	notify_backup "$D/ct.sh $g backup"
	notify_fault "$D/ct.sh $g fault"
}
KA
  ip netns exec $P-$g conntrackd -C $R/$g-ct.conf -d
  sleep 0.3
  pgrep -f "conntrackd -C $R/$g-ct.conf" > $R/$g-ct.pid
  ip netns exec $P-$g keepalived -n -l -D --vrrp -f $R/$g-ka.conf -p $R/$g-ka.pid -r $R/$g-kav.pid > $R/$g-ka.log 2>&1 &
done
