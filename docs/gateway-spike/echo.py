import socket, threading, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("203.0.113.10", 7000)); s.listen(64)
def serve(c, peer):
    f = c.makefile("rwb", buffering=0)
    for line in f:
        f.write(f"{peer[0]}:{peer[1]}\n".encode())
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
