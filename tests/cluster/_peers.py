"""The two ends of a CURVE connection, run as separate processes (in namespaces).

``python -m tests.cluster._peers serve BIND_ADDRESS KEY_FILE`` prints the
endpoint it bound, echoes the first message it gets, then prints the
authenticator's counts and exits. ``python -m tests.cluster._peers call
ENDPOINT KEY_FILE [--stranger]`` sends ``ping`` and prints the reply, or
exits 3 with what its handshakes came to. ``--stranger`` knows the head's
public key but has a node keypair of its own (so ZAP, not CURVE, refuses it).
Every wait is bounded by ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

import zmq

from futurepool.protocol import security
from futurepool.protocol.zap import AuthenticatorThread, HandshakeWatch


def serve(bind: str, key_file: str, timeout: float) -> int:
    keys = security.load_keys(key_file)
    context = zmq.Context()
    auth = AuthenticatorThread(context, security.admitted_keys(keys))
    server = context.socket(zmq.ROUTER)
    server.linger = 0
    try:
        security.make_curve_server(server, keys)
        auth.watch(server)
        port = server.bind_to_random_port(f"tcp://{bind}")
        print(f"tcp://{bind}:{port}", flush=True)
        if not server.poll(timeout * 1000):
            print("no message", flush=True)
            return 3
        routing_id, body = server.recv_multipart()
        server.send_multipart([routing_id, b"pong:" + body])
        time.sleep(0.2)  # let the reply leave before the socket closes
        print(f"admitted {auth.admitted} refused {auth.refused}", flush=True)
        return 0
    finally:
        server.close()
        auth.stop()
        context.term()


def call(endpoint: str, key_file: str, timeout: float, stranger: bool) -> int:
    keys = security.load_keys(key_file)
    if stranger:
        public, secret = zmq.curve_keypair()
        keys = keys._replace(node_public=public, node_secret=secret)
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.linger = 0
    security.make_curve_client(client, keys)
    watch = HandshakeWatch(client)
    try:
        client.connect(endpoint)
        client.send(b"ping")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.poll(50):
                print(client.recv().decode(), flush=True)
                return 0
            watch.handle()
        watch.handle()
        print(f"no reply; handshakes {watch.succeeded} failures {watch.failures}:"
              f" {watch.last_failure}", flush=True)
        return 3
    finally:
        watch.close()
        client.close()
        context.term()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["serve", "call"])
    parser.add_argument("address")
    parser.add_argument("key_file")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--stranger", action="store_true")
    args = parser.parse_args(argv)
    if args.role == "serve":
        return serve(args.address, args.key_file, args.timeout)
    return call(args.address, args.key_file, args.timeout, args.stranger)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
