"""README.md's "Adding hosts", followed as a new user would, on two hosts (issue 9).

The section's shell blocks are taken out of the README and run as text: each
block starts with a comment saying which host it is for (``# on hostA``).
hostA and hostB are network namespaces with those host names (a UTS namespace
each) and homes of their own; ``ssh hostB`` reaches hostB's namespace through
a stand-in (:mod:`tests.cluster._stand_ins`), and ``futurepool`` / ``python3``
are this checkout with this interpreter. The one substitution: the worker on
hostB dials hostA's address where the README says ``hostA`` (there is no DNS
between namespaces). What the README promises is checked against its own
``text`` blocks: the head's message, word for word (``/home/you`` being
hostA's home), and the shape of the counts, first of hostA alone, then of
both hosts. Then its last step: Ctrl-C on the head; the worker stays and
serves the next run; Ctrl-C on the worker, and both have exited 0.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest

from futurepool.testing import netns

from ._hosts import REPO, Output, as_host, clean_env, stand_ins, stop

#: Seconds for one wait: a command, a line of output, a process to exit.
TIMEOUT = 60.0
_COUNTS = r"^tasks per host: (\{.*\})$"


def section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """``(language, lines)`` of each fenced block, indentation (a list item's) removed."""
    blocks, current, indent = [], None, 0
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            current, indent = (stripped[3:], []), len(line) - len(line.lstrip())
        elif current is not None and stripped == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current[1].append(line[indent:])
    assert current is None, "an unclosed fenced block"
    return blocks


def steps() -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """The shell blocks as ``(host, commands)``, and the text blocks (promised output)."""
    shell, text = [], []
    for language, lines in fenced_blocks(section("Adding hosts")):
        if language == "sh":
            match = re.match(r"# on (host[A-Z])\b", lines[0])
            assert match, f"a shell block that does not say its host: {lines[0]!r}"
            shell.append((match.group(1),
                          [line for line in lines if line and not line.startswith("#")]))
        elif language == "text":
            text.append(lines)
    return shell, text


def counts(line: str) -> dict[str, int]:
    match = re.match(_COUNTS, line)
    assert match, line
    return ast.literal_eval(match.group(1))


@pytest.mark.chaos
def test_adding_a_host_as_the_readme_says(tmp_path):
    netns.skip_unless_available()
    shell, promised = steps()
    assert [host for host, _ in shell] == ["hostA", "hostA", "hostB"], \
        "the steps changed: update this test"
    (_, setup), (_, [head_command]), (_, [worker_command]) = shell
    assert [line.split()[0] for line in setup] == ["futurepool", "ssh"]
    assert len(promised) == 2, "the promised outputs changed: update this test"
    message = [line for line in promised[0] if not re.match(_COUNTS, line)]
    [first_counts] = [line for line in promised[0] if re.match(_COUNTS, line)]
    [both_counts] = promised[1]
    bin_dir = stand_ins(tmp_path / "bin")
    homes = {host: tmp_path / host for host in ("hostA", "hostB")}
    for home in homes.values():
        home.mkdir()
    outputs: list[Output] = []
    started: list[subprocess.Popen] = []

    def output(name: str) -> Output:
        outputs.append(Output(tmp_path / name))
        return outputs[-1]

    with netns.Network(nodes=1) as net:
        where = {"hostA": "head", "hostB": "node1"}
        hosts = {host: {"netns": net.namespace(member), "home": str(homes[host])}
                 for host, member in where.items()}
        env = {host: clean_env(bin_dir, homes[host], STAND_IN_SSH_HOSTS=json.dumps(hosts))
               for host in homes}

        def start(host: str, command: str, out: Output, err: Output,
                  cwd: Path) -> subprocess.Popen:
            """``command`` typed into bash in a terminal on ``host``: a process group of its own."""
            started.append(net.popen(where[host], as_host(host, ["bash", "-c", command]),
                                     env=env[host], cwd=cwd, stdout=out.file,
                                     stderr=err.file, stdin=subprocess.DEVNULL,
                                     start_new_session=True))
            return started[-1]

        try:
            # 1. The key, made on hostA and copied to hostB.
            key_file = homes["hostA"] / ".config" / "futurepool" / "cluster.key"
            for command in setup:
                done = net.run(where["hostA"], as_host("hostA", ["bash", "-c", command]),
                               env=env["hostA"], cwd=homes["hostA"], capture_output=True,
                               text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
                assert done.returncode == 0, f"{command}\n{done.stderr}"
                if command == "futurepool keygen":
                    assert done.stdout.strip() == str(key_file)
            copy = homes["hostB"] / ".config" / "futurepool" / "cluster.key"
            assert copy.read_bytes() == key_file.read_bytes()
            assert copy.stat().st_mode & 0o777 == 0o600

            # 2. The script on hostA: the message, then counts of hostA alone.
            head_out, head_err = output("head.out"), output("head.err")
            head = start("hostA", head_command, head_out, head_err, cwd=REPO)
            expected = [line.replace("/home/you", str(homes["hostA"])) for line in message]
            head_err.wait_for(re.escape(expected[-1]), TIMEOUT, head)
            assert "\n".join(expected) in head_err.text(), head_err.text()
            alone = counts(head_out.wait_for(_COUNTS, TIMEOUT, head).string)
            assert alone.keys() == counts(first_counts).keys()

            # 3. The worker on hostB: the counts show both hosts; it says nothing.
            address = f"tcp://{net.address('head')}:"
            worker_out = output("worker.out")
            worker = start("hostB", worker_command.replace("tcp://hostA:", address),
                           worker_out, worker_out, cwd=homes["hostB"])
            both = counts(head_out.wait_for(r"^tasks per host: .*'hostB'", TIMEOUT, head).string)
            assert both.keys() == counts(both_counts).keys()
            assert sum(both.values()) == sum(alone.values()) == \
                sum(counts(both_counts).values())

            # 4. Ctrl-C on hostA; the worker stays and serves the next run.
            code, _took = stop(head, signal.SIGINT, timeout=TIMEOUT, group=True)
            assert code == 0, head_err.text()
            assert worker.poll() is None, worker_out.text()
            again_out, again_err = output("again.out"), output("again.err")
            again = start("hostA", head_command, again_out, again_err, cwd=REPO)
            again_out.wait_for(r"^tasks per host: .*'hostB'", TIMEOUT, again)
            code, _took = stop(again, signal.SIGINT, timeout=TIMEOUT, group=True)
            assert code == 0, again_err.text()
            code, _took = stop(worker, signal.SIGINT, timeout=TIMEOUT, group=True)
            assert code == 0, worker_out.text()
            assert worker_out.text() == "", "the worker spoke while all was well"
        finally:
            for proc in started:
                if proc.poll() is None:
                    stop(proc, signal.SIGKILL, timeout=TIMEOUT)
            for out in outputs:
                out.close()
