#!/bin/sh
# Entry point of the lazysnap-installer DaemonSet's pod: installs this image's lazysnap package
# on the node itself and runs it under the node's systemd, then follows its log.
#
# Why on the node and not in the pod: with containerd's CRI snapshotter set to lazysnap, every
# pod's root filesystem, this one's included, is a lazysnap snapshot; a lazysnap running in a
# pod could not be restarted (its new container needs lazysnap to exist). Under systemd it
# starts before containerd and kubelet, after reboots too.
#
# Needs: privileged, hostPID (nsenter into PID 1's namespaces), the node's /var/cache/lazysnap
# mounted at /host-cache, a Debian 12 node with systemd and its apt sources (for python3 and
# libfuse3-3). Optional: a config.toml at /config/config.toml (a ConfigMap), copied to the
# node's /etc/lazysnap/config.toml; lazysnap is restarted when it changes.
set -eu

DEB=/usr/share/lazysnap/lazysnap.deb
on_host() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }
say() { echo "lazysnap-installer: $*"; }

want=$(dpkg-deb --field "$DEB" Version)
have=$(on_host dpkg-query -W -f='${Version}' lazysnap 2>/dev/null || true)
if [ "$(on_host dpkg-query -W -f='${Status}' lazysnap 2>/dev/null || true)" != "install ok installed" ]; then
  have=""
fi

if [ "$have" != "$want" ]; then
  say "installing lazysnap $want on the node (was: ${have:-not installed})"
  cp "$DEB" "/host-cache/lazysnap_$want.deb"
  # confold: keep a config.toml the node already has; it is this script's (or the admin's).
  on_host env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    -o Dpkg::Options::=--force-confold "/var/cache/lazysnap/lazysnap_$want.deb"
  rm -f "/host-cache/lazysnap_$want.deb"
else
  say "lazysnap $want is installed on the node"
fi

restart=""
if [ -f /config/config.toml ]; then
  if ! on_host cat /etc/lazysnap/config.toml 2>/dev/null | cmp -s - /config/config.toml; then
    say "writing /etc/lazysnap/config.toml from the ConfigMap"
    on_host sh -c 'cat > /etc/lazysnap/config.toml.new && mv /etc/lazysnap/config.toml.new /etc/lazysnap/config.toml' \
      < /config/config.toml
    restart=yes
  fi
fi

on_host systemctl enable lazysnap.service
if [ -n "$restart" ] && on_host systemctl is-active --quiet lazysnap.service; then
  say "restarting lazysnap for the new config"
  on_host systemctl restart lazysnap.service
else
  on_host systemctl start lazysnap.service
fi
on_host systemctl --no-pager status lazysnap.service | head -n 5 || true

# Stay, so the DaemonSet shows the node's lazysnap log (`kubectl logs`) and keeps it installed.
exec nsenter --target 1 --mount --pid -- journalctl -u lazysnap.service -f -n 50 -o short-iso
