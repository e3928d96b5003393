#!/bin/sh
# The "script" baseline of benches/hotplug: what an operator would run by hand
# in the launcher pod to hot-plug one bridge-bound NIC, with iproute2 and virsh.
# Same links, names and device XML as nicplug. The harness stamps each line
# as it arrives on the pipe (CLOCK_MONOTONIC).
#
# usage: operator.sh POD BRIDGE TAP BRIDGE_MAC UID GID URI DOMAIN XML_TEMPLATE
# XML_TEMPLATE is nicplug's device XML with @MAC@ and @MTU@ for the pod link's values.
set -eu
POD=$1 BRIDGE=$2 TAP=$3 BRIDGE_MAC=$4 QUID=$5 QGID=$6 URI=$7 DOMAIN=$8 TEMPLATE=$9
XML=$TEMPLATE.$$.xml

echo ready
# Wait for CNI to put the pod interface in (test is a shell builtin).
until [ -e "/sys/class/net/$POD" ]; do sleep 0.002; done
echo noticed

VM_MAC=$(cat "/sys/class/net/$POD/address")
MTU=$(cat "/sys/class/net/$POD/mtu")
sed -e "s/@MAC@/$VM_MAC/" -e "s/@MTU@/$MTU/" "$TEMPLATE" >"$XML"
ip link add "$BRIDGE" address "$BRIDGE_MAC" type bridge
ip link set "$BRIDGE" up
ip addr flush dev "$POD"
ip link set "$POD" address "$BRIDGE_MAC" master "$BRIDGE" up
bridge link set dev "$POD" learning off
ip tuntap add dev "$TAP" mode tap user "$QUID" group "$QGID" vnet_hdr
ip link set "$TAP" mtu "$MTU" master "$BRIDGE" up
echo plumbed

virsh -q -c "$URI" attach-device "$DOMAIN" "$XML" --live --config >/dev/null
echo attached

until virsh -q -c "$URI" qemu-agent-command "$DOMAIN" \
    '{"execute":"guest-network-get-interfaces"}' 2>/dev/null | grep -qi "$VM_MAC"; do
  sleep 0.01
done
echo guest

read -r _cmd
echo detach
# detach-device waits (up to libvirt's 5 s) for the guest to release the device.
virsh -q -c "$URI" detach-device "$DOMAIN" "$XML" --live --config >/dev/null
echo removed
ip link del "$TAP"
ip link set "$POD" nomaster
ip link set "$POD" address "$VM_MAC"
ip link del "$BRIDGE"
echo gone
rm -f "$XML"
