"""A host under attack, from another process: ``python host_attack.py PORT KEY SECONDS``.

Half-open request heads from eight loopback addresses (127.0.0.2-9), 48 each, reopened as
soon as the host closes them, and 40 uploads with a valid key trickling a byte a second
from 127.0.0.10. It stops after SECONDS or when its stdin closes, and prints what it did
as JSON: ``{"opens": N, "closes": [seconds each trickled upload stayed open]}``.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time


def half_open(stop: threading.Event, port: int, source: str, hold: int, opens: list[int]) -> None:
    """Keep ``hold`` connections from ``source`` open with half a request head."""
    held: list[socket.socket] = []
    while not stop.is_set():
        while len(held) < hold and not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), 2, (source, 0))
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
                opens[0] += 1
            except OSError:
                time.sleep(0.01)
        for sock in select.select(held, [], [], 0.05)[0]:
            held.remove(sock)
            sock.close()
    for sock in held:
        sock.close()


def trickle(stop: threading.Event, port: int, key: str, closes: list[float]) -> None:
    """A keyed upload sending a byte a second until the host closes it; then another."""
    head = (
        "POST /v1/models/gpt2/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n"
        f"Authorization: Bearer {key}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), 5, ("127.0.0.10", 0)) as sock:
                sock.sendall(head)
                while not stop.wait(1.0):
                    sock.sendall(b"x")
                    if select.select([sock], [], [], 0)[0] and not sock.recv(1 << 16):
                        break
        except OSError:
            pass
        if not stop.is_set():
            closes.append(time.monotonic() - start)


def main(port: int, key: str, seconds: float) -> None:
    stop = threading.Event()
    opens: list[int] = [0]
    closes: list[float] = []
    threads = [
        threading.Thread(target=half_open, args=(stop, port, f"127.0.0.{i}", 48, opens))
        for i in range(2, 10)
    ] + [threading.Thread(target=trickle, args=(stop, port, key, closes)) for _ in range(40)]
    for thread in threads:
        thread.start()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(10)
    print(json.dumps({"opens": opens[0], "closes": closes}))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
