#!/usr/bin/env python3
"""Writes the DHCP fuzz targets' seeds: one Ethernet frame per message a guest
sends on its tap, as udhcpc, systemd-networkd and dhclient send them.
Checksums are left zero: a virtio guest leaves them to offload and the
parser does not check them. Run from anywhere; writes beside this file:

    fuzz/seeds/dhcp_request/*.bin   DISCOVER, REQUEST (selecting, init-reboot,
                                    renewing), INFORM, RELEASE, DECLINE, a
                                    foreign client MAC
    fuzz/seeds/dhcp6_request/*.bin  Solicit, Request, Renew, Confirm,
                                    Information-Request, router solicitation
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = bytes.fromhex("020000000005")
OTHER = bytes.fromhex("02000000aaaa")


def write(target, name, frame):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name + ".bin"), "wb") as f:
        f.write(frame)


def ipv4(src, dst, payload):
    udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         bytes(src), bytes(dst))
    return header + udp


def dhcp4(kind, mac, ciaddr=(0, 0, 0, 0), options=b""):
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234abcd, 0, 0x8000,
                        bytes(ciaddr), bytes(4), bytes(4), bytes(4), mac + bytes(10),
                        bytes(64), bytes(128))
    opts = bytes([53, 1, kind]) + bytes([61, 7, 1]) + mac + options
    opts += bytes([55, 6, 1, 3, 6, 15, 26, 121]) + bytes([255])
    return bootp + bytes([99, 130, 83, 99]) + opts


def eth(dst, src, ethertype, payload):
    return dst + src + struct.pack("!H", ethertype) + payload


BCAST = b"\xff" * 6
ZERO = (0, 0, 0, 0)
ALL = (255, 255, 255, 255)
ADDR = (169, 254, 2, 5)
SERVER = (169, 254, 2, 1)
REQ_IP = bytes([50, 4, 169, 254, 2, 5])
SERVER_ID = bytes([54, 4, 169, 254, 2, 1])

v4 = {
    "discover": (GUEST, ZERO, ALL, dhcp4(1, GUEST)),
    "request-selecting": (GUEST, ZERO, ALL, dhcp4(3, GUEST, options=REQ_IP + SERVER_ID)),
    "request-init-reboot": (GUEST, ZERO, ALL, dhcp4(3, GUEST, options=REQ_IP)),
    "request-renewing": (GUEST, ADDR, SERVER, dhcp4(3, GUEST, ciaddr=ADDR)),
    "inform": (GUEST, ADDR, ALL, dhcp4(8, GUEST, ciaddr=ADDR)),
    "release": (GUEST, ADDR, SERVER, dhcp4(7, GUEST, ciaddr=ADDR, options=SERVER_ID)),
    "decline": (GUEST, ZERO, ALL, dhcp4(4, GUEST, options=REQ_IP + SERVER_ID)),
    "foreign-mac": (OTHER, ZERO, ALL, dhcp4(1, OTHER)),
}
for name, (mac, src, dst, msg) in v4.items():
    write("dhcp_request", name, eth(BCAST, mac, 0x0800, ipv4(src, dst, msg)))

LINK_LOCAL = bytes.fromhex("fe800000000000000000000000000005")
ALL_DHCP = bytes.fromhex("ff020000000000000000000000010002")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
DUID = bytes.fromhex("00030001") + GUEST
SERVER_DUID = bytes.fromhex("00030001020000000001")


def opt(code, data):
    return struct.pack("!HH", code, len(data)) + data


def ipv6(next_header, hop_limit, dst, payload):
    return struct.pack("!IHBB", 0x60000000, len(payload), next_header, hop_limit) \
        + LINK_LOCAL + dst + payload


def dhcp6(kind, options):
    msg = bytes([kind]) + b"\x00\x12\x34" + opt(1, DUID) + options + opt(6, b"\x00\x17\x00\x18")
    return struct.pack("!HHHH", 546, 547, 8 + len(msg), 0) + msg


IA_ADDR = opt(5, bytes.fromhex("fe800000000000000000000000020005") + struct.pack("!II", 0, 0))
IA_NA = opt(3, struct.pack("!III", 1, 0, 0))
IA_NA_ADDR = opt(3, struct.pack("!III", 1, 0, 0) + IA_ADDR)
v6 = {
    "solicit": dhcp6(1, IA_NA + opt(8, b"\x00\x00")),
    "request": dhcp6(3, opt(2, SERVER_DUID) + IA_NA_ADDR),
    "renew": dhcp6(5, opt(2, SERVER_DUID) + IA_NA_ADDR),
    "confirm": dhcp6(4, IA_NA_ADDR),
    "information-request": dhcp6(11, b""),
}
DHCP_MAC = bytes.fromhex("333300010002")
for name, udp in v6.items():
    write("dhcp6_request", name, eth(DHCP_MAC, GUEST, 0x86DD, ipv6(17, 1, ALL_DHCP, udp)))
rs = bytes([133, 0, 0, 0, 0, 0, 0, 0]) + bytes([1, 1]) + GUEST
write("dhcp6_request", "router-solicitation",
      eth(bytes.fromhex("333300000002"), GUEST, 0x86DD, ipv6(58, 255, ALL_ROUTERS, rs)))
