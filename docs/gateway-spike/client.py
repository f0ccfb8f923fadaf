import socket, sys, time, json
dur = float(sys.argv[1]); out = sys.argv[2]
c = socket.create_connection(("203.0.113.10", 7000), timeout=10)
f = c.makefile("rwb", buffering=0)
seen = {}; gaps = []; last = time.monotonic(); err = None; n = 0
end = time.monotonic() + dur
try:
    while time.monotonic() < end:
        f.write(b"x\n"); r = f.readline().decode().strip()
        if not r: err = "closed"; break
        now = time.monotonic(); gaps.append(now - last); last = now
        seen[r] = seen.get(r, 0) + 1; n += 1
        time.sleep(0.02)
except Exception as e:
    err = repr(e)
json.dump({"seen": seen, "n": n, "max_gap_ms": round(max(gaps) * 1000), "error": err}, open(out, "w"))
