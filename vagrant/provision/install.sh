#!/bin/bash
# Install steelfusion on a Debian 12 host: a Vagrant VM, or a User-mode Linux lab guest.
#
#   SF_SRC   the source tree (default /steelfusion: the Vagrantfile's synced folder)
#   SF_SITE  a folder holding steelfusion's Python dependencies, ready installed (the UML lab
#            shares the host's .venv site-packages over hostfs: guests have no network).
#            Unset: a venv in /opt/steelfusion/venv gets them from PyPI with pip.
#
# Either way /usr/local/bin/steelfusion, coredr and steelfusion-topology run it, which is what the
# systemd units (steelfusion-*@.service) call. Debian packages come from apt, only when
# missing (a UML guest's image has them already). Idempotent: run it again after a change.
set -euo pipefail
SRC=${SF_SRC:-/steelfusion}
[ -f "$SRC/pyproject.toml" ] || { echo "install.sh: no steelfusion source tree at $SRC (set SF_SRC)" >&2; exit 1; }

need=()
for p in python3 python3-rtslib-fb open-iscsi; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
[ -z "${SF_SITE:-}" ] && { dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv); }
if [ ${#need[@]} -gt 0 ]; then
  echo "install.sh: apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p /etc/steelfusion /var/lib/steelfusion /var/log/steelfusion
chmod 0750 /etc/steelfusion
if [ -n "${SF_SITE:-}" ]; then
  [ -d "$SF_SITE" ] || { echo "install.sh: SF_SITE=$SF_SITE is not a folder" >&2; exit 1; }
  for cmd in steelfusion coredr steelfusion-topology; do
    case $cmd in coredr) mod=steelfusion.coredr ;; steelfusion-topology) mod=steelfusion.topology ;;
                 *) mod=steelfusion.cli ;; esac
    cat > "/usr/local/bin/$cmd.tmp" <<WRAP
#!/bin/sh
# written by steelfusion's vagrant/provision/install.sh (SF_SITE: dependencies shared by the host)
PYTHONPATH="$SRC:$SF_SITE\${PYTHONPATH:+:\$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 exec python3 -c 'import sys; from $mod import main; sys.argv[0] = "$cmd"; main()' "\$@"
WRAP
    chmod 0755 "/usr/local/bin/$cmd.tmp"
    mv "/usr/local/bin/$cmd.tmp" "/usr/local/bin/$cmd"
  done
else
  # --system-site-packages: Debian's python3-rtslib-fb (the LIO driver) is seen from the venv
  [ -x /opt/steelfusion/venv/bin/python ] || python3 -m venv --system-site-packages /opt/steelfusion/venv
  /opt/steelfusion/venv/bin/pip install -q --upgrade "$SRC"
  for cmd in steelfusion coredr steelfusion-topology; do
    ln -sf "/opt/steelfusion/venv/bin/$cmd" "/usr/local/bin/$cmd"
  done
fi
# the units (one template per role), from the source tree
install -m 0644 "$SRC"/vagrant/systemd/steelfusion-*.service /etc/systemd/system/
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
steelfusion --version
