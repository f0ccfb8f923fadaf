#!/bin/bash
# keepalived notify: conntrackd primary/backup transitions (after conntrackd's primary-backup.sh)
g=$1;
# the standby creates no new NAT mapping before the replicated ones are committed
 R=/run/eagw; C="conntrackd -C $R/$g-ct.conf"
echo "$(date +%T.%N) $g $2" >> $R/transitions.log
case "$2" in
  primary) $C -c; ip netns exec eagw-$g nft flush chain ip eagw gate; $C -f; $C -R; $C -B ;;
  backup|fault) ip netns exec eagw-$g nft "flush chain ip eagw gate; add rule ip eagw gate drop"; $C -n ;;
esac
