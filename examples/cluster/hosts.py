"""Which hosts run the tasks: a script that knows nothing of the cluster.

Every second or so it runs a batch of small tasks and prints how many ran on
each host. Alone it uses this host's cores; run it with FUTUREPOOL_LISTEN
set and start `futurepool worker --connect ...` on other hosts, and their
names join the counts within a second or two. It stops after two minutes,
or at Ctrl-C.

Run: FUTUREPOOL_LISTEN=tcp://0.0.0.0:7777 python3 examples/cluster/hosts.py
"""

import socket
import time
from collections import Counter

import futurepool

#: How long the demo runs, in seconds.
DURATION = 120


def host(_):
    time.sleep(0.02)  # long enough that every worker gets a share
    return socket.gethostname()


def main():
    deadline = time.monotonic() + DURATION
    with futurepool.Executor() as executor:
        while time.monotonic() < deadline:
            counts = Counter(executor.map(host, range(64)))
            print("tasks per host:", dict(sorted(counts.items())), flush=True)
            time.sleep(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass  # Ctrl-C: the executor has already stopped its workers
