"""A tiny TCP server/client for the interception tests, run inside network namespaces (by
``ip netns exec``, possibly as another user with the system Python: standard library only).

    python netns_peer.py serve HOST PORT TAG      # answers "<TAG> sees <peer ip>\\n", then echoes
    python netns_peer.py call HOST PORT TEXT      # prints what comes back until the server closes
"""

import socket
import sys
import threading


def serve(host: str, port: int, tag: str) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(64)
    print("ready", flush=True)

    def handle(c: socket.socket, peer: tuple) -> None:
        with c:
            c.sendall(f"{tag} sees {peer[0]}\n".encode())
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)

    while True:
        c, peer = ls.accept()
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()


def call(host: str, port: int, text: str) -> None:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(text.encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            out += data
    sys.stdout.write(out.decode())


if __name__ == "__main__":
    cmd, host, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    (serve if cmd == "serve" else call)(host, port, arg)
