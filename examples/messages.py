#!/usr/bin/env python3
"""A sockvisor message worker in stdlib Python (docs/messages.md): answers the operator's
"ping" with "pong from slot N", broadcasts what follows "tell ", and tells the operator
what other workers say. Run: sockvisor --messages -l tcp://127.0.0.1:0 -- python3 examples/messages.py"""
import os, socket, struct, sys

if os.environ.get("LISTEN_PID") != str(os.getpid()) or "SOCKVISOR_MESSAGES_FD" not in os.environ:
    sys.exit("messages.py: no message socket (run it with sockvisor --messages)")
sock = socket.socket(fileno=int(os.environ["SOCKVISOR_MESSAGES_FD"]))  # SOCK_SEQPACKET
HEADER = struct.Struct("<BBBBII")  # version 1, kind 1, flags, reserved, from, to
OPERATOR, ALL = 0xFFFFFFFF, 0xFFFFFFFE
me = os.environ.get("SOCKVISOR_WORKER_ID", "?")

def send(to, payload):
    sock.send(HEADER.pack(1, 1, 0, 0, 0, to) + payload)  # sockvisor fills in "from"

while True:
    packet = sock.recv(HEADER.size + 65536)  # one packet is one message
    if not packet:
        break  # end of file: sockvisor is gone
    if len(packet) < HEADER.size or HEADER.unpack_from(packet)[:2] != (1, 1):
        continue  # not a message this version knows: skip it
    sender, payload = HEADER.unpack_from(packet)[4], packet[HEADER.size:]
    if sender == OPERATOR and payload == b"ping":
        send(OPERATOR, f"pong from slot {me}".encode())
    elif sender == OPERATOR and payload.startswith(b"tell "):
        send(ALL, payload[5:])
    elif sender != OPERATOR:
        send(OPERATOR, f"slot {me} heard slot {sender}: ".encode() + payload)
