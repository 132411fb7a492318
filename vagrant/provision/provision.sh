#!/bin/bash
# Provision one host of vagrant/topology.json, as root: `provision.sh NAME [NAME...]`.
# Vagrant runs it on each VM (vagrant/Vagrantfile); the UML lab runs the same script in its
# guests (tests/test_vm_topology.py). What it does, by the host's role in the topology:
#   every host  install.sh: steelfusion, /usr/local/bin/steelfusion{,-topology}, coredr, units
#   witness, core, edge   a system user, /etc/steelfusion/NAME.toml and the node key from the
#               topology, then `systemctl enable --now steelfusion-ROLE@NAME` (without
#               systemd, e.g. a UML guest booted with sf-init: the unit's command by hand)
#   san         LIO through `steelfusion san create --config /etc/steelfusion/NAME-lio.toml`
#               (LUN files in /srv/steelfusion/NAME, saved config restored at boot)
#   initiator   open-iscsi: initiator name, CHAP, discovery and login to the Edge
# Idempotent: running it again rewrites the configs and restarts nothing that is running
# unless its config changed.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: provision.sh HOST-NAME... (see vagrant/topology.json)" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
export SF_SRC=${SF_SRC:-$(dirname "$(dirname "$HERE")")}
export SF_TOPOLOGY=${SF_TOPOLOGY:-$SF_SRC/vagrant/topology.json}
export SF_SECRETS=${SF_SECRETS:-$SF_SRC/vagrant/.secrets.json}
bash "$HERE/install.sh" >/dev/null
topo() { steelfusion-topology "$@"; }
systemd_up() { [ -d /run/systemd/system ]; }
say() { echo "provision $NAME ($role): $*"; }

node() {
  id steelfusion >/dev/null 2>&1 ||
    useradd --system --home-dir /var/lib/steelfusion --no-create-home --shell /usr/sbin/nologin steelfusion
  install -d -o root -g steelfusion -m 0750 /etc/steelfusion
  local cfg=/etc/steelfusion/$NAME.toml old=""
  [ -f "$cfg" ] && old=$(sha256sum < "$cfg")
  topo config "$NAME" --out "$cfg" --key-out /etc/steelfusion/node.key
  chgrp steelfusion "$cfg"
  chown steelfusion:steelfusion /etc/steelfusion/node.key
  local unit=steelfusion-$role@$NAME.service
  if systemd_up; then
    systemctl enable "$unit" >/dev/null 2>&1
    if [ -n "$old" ] && [ "$old" != "$(sha256sum < "$cfg")" ]; then systemctl restart "$unit"
    else systemctl start "$unit"; fi
    say "$unit $(systemctl is-active "$unit")"
  else
    # what the unit does, by hand: same user, folders and command
    install -d -o steelfusion -g steelfusion -m 0700 "/var/lib/steelfusion/$NAME"
    install -d -o steelfusion -g steelfusion -m 0755 /var/log/steelfusion
    if pgrep -f "steelfusion $role run --config $cfg" >/dev/null; then say "already running"; return; fi
    local caps=()  # the Edge keeps the one privilege its unit gives it: binding port 3260
    [ "$role" = edge ] && caps=(--inh-caps=+net_bind_service --ambient-caps=+net_bind_service)
    setsid setpriv --reuid=steelfusion --regid=steelfusion --init-groups "${caps[@]}" \
      /usr/local/bin/steelfusion "$role" run --config "$cfg" --quiet \
      >> "/var/log/steelfusion/$NAME.out" 2>&1 < /dev/null &
    say "started by hand (no systemd), pid $!"
  fi
}

san() {
  modprobe -a configfs target_core_mod target_core_file target_core_iblock iscsi_target_mod
  local spec=/etc/steelfusion/$NAME-lio.toml
  install -d -m 0750 /etc/steelfusion
  topo san "$NAME" --out "$spec"
  local iqn
  iqn=$(sed -n 's/^target = "\(.*\)"$/\1/p' "$spec")
  if steelfusion san status --target "$iqn" >/dev/null 2>&1; then
    say "target $iqn exists (steelfusion san delete --config $spec, then provision again, to remake it)"
  else
    steelfusion san create --config "$spec"
  fi
  # the saved LIO config comes back at every boot
  if systemd_up; then
    systemctl unmask rtslib-fb-targetctl.service >/dev/null 2>&1 || true
    systemctl enable rtslib-fb-targetctl.service >/dev/null 2>&1
  fi
}

initiator() {
  local INITIATOR TARGET PORTAL CHAP_USER CHAP_SECRET
  eval "$(topo initiator "$NAME")"
  echo "InitiatorName=$INITIATOR" > /etc/iscsi/initiatorname.iscsi
  if systemd_up; then systemctl restart iscsid; else pgrep -x iscsid >/dev/null || iscsid; fi
  if ! iscsiadm -m discovery -t sendtargets -p "$PORTAL" >/dev/null; then
    say "the Edge at $PORTAL does not answer yet: provision edge first, then run this again"
    exit 1
  fi
  for kv in node.session.auth.authmethod=CHAP "node.session.auth.username=$CHAP_USER" \
            "node.session.auth.password=$CHAP_SECRET" node.startup=automatic \
            node.session.timeo.replacement_timeout=120; do
    iscsiadm -m node -T "$TARGET" -p "$PORTAL" -o update -n "${kv%%=*}" -v "${kv#*=}"
  done
  iscsiadm -m session 2>/dev/null | grep -q "$TARGET" ||
    iscsiadm -m node -T "$TARGET" -p "$PORTAL" --login >/dev/null
  local disk="" i
  for i in $(seq 1 300); do  # the kernel attaches the disk a moment after the login
    disk=$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/ {print "/dev/"$4}' | xargs)
    [ -n "$disk" ] && [ -b "${disk%% *}" ] && break
    sleep 0.1
  done
  [ -n "$disk" ] || { say "logged in to $TARGET at $PORTAL, but no disk appeared within 30 s"; exit 1; }
  say "logged in to $TARGET at $PORTAL: $disk"
}

# several hosts in one machine (a UML guest standing for a whole site): in the order given
for NAME in "$@"; do
  role=$(topo role "$NAME")
  case "$role" in
    witness|core|edge) node ;;
    san) san ;;
    initiator) initiator ;;
    *) echo "provision.sh: $NAME has role $role, which this script does not know" >&2; exit 1 ;;
  esac
done
