#!/usr/bin/env python3
"""A stand-in port program for hang_SUITE: it answers every eval request with a reply that
names an atom the VM has never seen, the way a port that lets Python choose atoms would.

Code "payload": {Id, ok, <<term naming a new atom>>}; any other code: {Id, error,
{python, NewAtom, <<"m">>, <<"t">>}}. Heartbeats and stats are not answered (the suite
turns heartbeats off); the program exits on end of input."""
import os
import struct
import sys

fin, fout = sys.stdin.buffer, sys.stdout.buffer


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = fin.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data


def atom(name):
    raw = name.encode()
    return bytes([119, len(raw)]) + raw


def integer(n):
    if 0 <= n < 256:
        return bytes([97, n])
    if n < 2**31:
        return bytes([98]) + struct.pack(">i", n)
    raw = n.to_bytes((n.bit_length() + 7) // 8, "little")
    return bytes([110, len(raw), 0]) + raw


def binary(b):
    return bytes([109]) + struct.pack(">I", len(b)) + b


def parse_int(buf, i):
    tag = buf[i]
    if tag == 97:
        return buf[i + 1], i + 2
    if tag == 98:
        return struct.unpack(">i", buf[i + 1:i + 5])[0], i + 5
    if tag == 110:
        n = buf[i + 1]
        return int.from_bytes(buf[i + 3:i + 3 + n], "little"), i + 3 + n
    raise ValueError("integer tag %d" % tag)


def parse_request(body):
    """(op, id, code) of {op, Id, ...}; code only for eval."""
    assert body[0] == 131 and body[1] == 104
    i = 3
    assert body[i] == 119
    n = body[i + 1]
    op = body[i + 2:i + 2 + n].decode()
    i += 2 + n
    if op == "heartbeat" or op not in ("eval", "exec", "call", "stats"):
        return op, None, None
    rid, i = parse_int(body, i)
    code = None
    if op == "eval":
        # skip the owner pid: NEW_PID_EXT(88) = node atom + 12 bytes
        assert body[i] == 88
        i += 1
        if body[i] == 119:
            i += 2 + body[i + 1] + 12
        else:
            assert body[i] == 118
            i += 3 + struct.unpack(">H", body[i + 1:i + 3])[0] + 12
        assert body[i] == 109
        ln = struct.unpack(">I", body[i + 1:i + 5])[0]
        code = body[i + 5:i + 5 + ln]
    return op, rid, code


def send(term):
    fout.write(struct.pack(">I", len(term)) + term)
    fout.flush()


while True:
    (length,) = struct.unpack(">I", read_exact(4))
    op, rid, code = parse_request(read_exact(length))
    if rid is None:
        continue
    fresh = "unsafe_port_atom_%d_%d" % (os.getpid(), rid)
    if code == b"payload":
        payload = bytes([131, 104, 2]) + atom("ok") + atom(fresh)
        send(bytes([131, 104, 3]) + integer(rid) + atom("ok") + binary(payload))
    else:
        reason = bytes([104, 4]) + atom("python") + atom(fresh) + binary(b"m") + binary(b"t")
        send(bytes([131, 104, 3]) + integer(rid) + atom("error") + reason)
