"""Stand-ins for ``srun`` and ``ssh`` that reach "hosts" which are network namespaces.

The recipe and README tests put a directory holding ``srun`` and ``ssh``
scripts (which run this module) first on ``PATH``, so that the commands the
documents give run unchanged and land in the right namespace.

``python _stand_ins.py srun [OPTIONS] COMMAND...`` runs COMMAND once on each
node of a job step, as SLURM's ``srun`` does with one task per node. The
job's nodes are the namespaces listed, comma-separated, in
``STAND_IN_SLURM_NAMESPACES`` (the first is the batch script's node). It
knows the options the recipe uses and refuses any other (exit 2, so a recipe
that starts using one fails the test instead of being half-simulated):
``--nodes``, ``--ntasks`` (one task per node only), ``--relative`` and
``--cpus-per-task`` (each task is bound to that many CPUs, as SLURM's task
affinity does). SIGTERM and SIGINT are passed on to the tasks; the exit code
is the highest of theirs. A line of JSON describing the step (namespaces,
command, exit codes) is appended to ``STAND_IN_SRUN_LOG``.

``python _stand_ins.py ssh HOST COMMAND...`` runs COMMAND with ``sh -c`` on
HOST, found in ``STAND_IN_SSH_HOSTS`` (JSON: host → ``{"netns", "home"}``):
in its namespace, with its host name (a UTS namespace of its own), its
``HOME`` as environment and working directory; stdin, stdout and stderr are
this process's, as with ssh.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys


def as_host(hostname: str, command: list[str]) -> list[str]:
    """``command`` in a UTS namespace of its own, whose host name is ``hostname``."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *command]


def srun(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="srun", allow_abbrev=False)
    parser.add_argument("-N", "--nodes", type=int)
    parser.add_argument("-n", "--ntasks", type=int)
    parser.add_argument("-r", "--relative", type=int, default=0)
    parser.add_argument("-c", "--cpus-per-task", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    allocation = os.environ["STAND_IN_SLURM_NAMESPACES"].split(",")
    nodes = args.nodes if args.nodes is not None else len(allocation) - args.relative
    chosen = allocation[args.relative:args.relative + nodes]
    if not args.command or nodes < 1 or len(chosen) < nodes:
        parser.error(f"cannot place {nodes} node(s) from relative node {args.relative} in an"
                     f" allocation of {len(allocation)}")
    if args.ntasks not in (None, nodes):
        parser.error("this stand-in runs one task per node only")
    cpus = sorted(os.sched_getaffinity(0))[:args.cpus_per_task]
    tasks = []

    def forward(signum, _frame):
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for rank, namespace in enumerate(chosen):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NODEID=str(args.relative + rank),
                   SLURM_STEP_ID="0", SLURM_CPUS_PER_TASK=str(args.cpus_per_task))
        tasks.append(subprocess.Popen(["ip", "netns", "exec", namespace, *args.command],
                                      env=env,
                                      preexec_fn=lambda: os.sched_setaffinity(0, cpus)))
    codes = [task.wait() for task in tasks]
    with open(os.environ["STAND_IN_SRUN_LOG"], "a") as log:
        log.write(json.dumps({"namespaces": chosen, "command": args.command,
                              "cpus_per_task": args.cpus_per_task, "exit_codes": codes}) + "\n")
    return max(codes)


def ssh(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0].startswith("-"):
        print("ssh stand-in: usage: ssh HOST COMMAND...", file=sys.stderr)
        return 255
    hosts = json.loads(os.environ["STAND_IN_SSH_HOSTS"])
    host, command = argv[0], " ".join(argv[1:])
    if host not in hosts:
        print(f"ssh: Could not resolve hostname {host}", file=sys.stderr)
        return 255
    target = hosts[host]
    env = dict(os.environ, HOME=target["home"])
    return subprocess.call(["ip", "netns", "exec", target["netns"],
                            *as_host(host, ["sh", "-c", command])],
                           env=env, cwd=target["home"])


if __name__ == "__main__":
    tool, *rest = sys.argv[1:]
    sys.exit({"srun": srun, "ssh": ssh}[tool](rest))
