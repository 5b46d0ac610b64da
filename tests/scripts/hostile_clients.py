"""Hostile clients of a metrics endpoint, in their own process (their sockets are not the tested process's).

Usage: python hostile_clients.py MODE N HOST PORT

Opens N connections (non-blocking connects, at most 5 s for all of them) and holds them, each in MODE:

* ``idle``: connect and send nothing (``nc HOST PORT``; on a TLS port, a handshake that never starts);
* ``partial``: slowloris: a request line and part of a header, then one more byte every 0.5 s;
* ``halfclose``: a partial request, then shut down the sending side (half-open);
* ``tls-partial``: the first bytes of a TLS ClientHello record, then nothing (a handshake left hanging).

Prints ``ready <connected>`` once the connects are done, then ``closed <k>`` lines as the server closes
connections (k: how many it has closed so far), and exits when stdin closes (the test ends it) or after
120 s. It never reconnects: the attack is bounded by N.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

REQUEST_START = b"GET /metrics HTTP/1.1\r\nHost: victim\r\nX-Slow: "
#: A TLS handshake record header announcing a 512-byte ClientHello, and its first bytes.
TLS_START = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


def main() -> None:
    mode, n, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    socks: list[socket.socket] = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        socks.append(s)
    deadline = time.monotonic() + 5
    pending = list(socks)
    connected: list[socket.socket] = []
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], max(0.0, deadline - time.monotonic()))
        for s in writable:
            pending.remove(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected.append(s)
    for s in connected:
        try:
            if mode in ("partial", "halfclose"):
                s.send(REQUEST_START)
            elif mode == "tls-partial":
                s.send(TLS_START)
            if mode == "halfclose":
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    print(f"ready {len(connected)}", flush=True)
    open_socks = set(connected)
    closed = 0
    end = time.monotonic() + 120
    last_drip = time.monotonic()
    while time.monotonic() < end:
        readable, _, _ = select.select([sys.stdin, *open_socks], [], [], 0.5)
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            break
        for s in readable:
            if s is sys.stdin:
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                open_socks.discard(s)
                closed += 1
                print(f"closed {closed}", flush=True)
        if mode == "partial" and time.monotonic() - last_drip >= 0.5:
            last_drip = time.monotonic()
            for s in list(open_socks):
                try:
                    s.send(b"x")
                except OSError:
                    pass
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
