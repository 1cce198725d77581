"""A reset in the middle of a handshake, on the accepting side.

Run in a network namespace of its own with TCP Fast Open on for servers
without cookies (net.ipv4.tcp_fastopen=0x203): prints the listener's port
once the reset has closed the listener's child socket in SYN_RECV.
"""
import socket, struct, time
TCP_FASTOPEN = 23
listener = socket.socket()
listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 5)
listener.bind(("127.0.0.1", 0))
listener.listen()
port = listener.getsockname()[1]

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

# A SYN carrying data from a port no socket has: the listener makes a
# Fast Open child in SYN_RECV at once, and the kernel answers its SYN-ACK
# with a reset.
src = dst = socket.inet_aton("127.0.0.1")
sport, payload = 40000, b"hello"  # the port the test looks for
header = struct.pack("!HHIIBBHHH", sport, port, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
header = header[:16] + struct.pack("!H", checksum(pseudo + header + payload)) + header[18:]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
raw.sendto(header + payload, ("127.0.0.1", 0))
time.sleep(0.2)
print(port, flush=True)
