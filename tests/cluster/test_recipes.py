"""The deployment recipes of examples/cluster/, run as far as this machine allows (issue 9).

Each test takes the commands a recipe runs out of its file and runs them,
as text, on "hosts" that are network namespaces (:class:`Network`), against a
head in another namespace; a task proves it ran on a node by returning the
inode of its network namespace. What the machine lacks is stood in for, and
only that:

* **SLURM** (``slurm.sbatch``): the batch script itself runs, with bash, on
  the allocation's first node, whose host name is its address (so that
  ``$(hostname)`` is something the other nodes can dial without DNS);
  ``srun`` is :mod:`tests.cluster._stand_ins`, which runs the step's command
  in the other nodes' namespaces. The allocation's size comes from the
  script's ``#SBATCH --nodes``.
* **Kubernetes** (``kubernetes.yaml``): the manifest is filled in with the
  command its header gives, then parsed; the kubelet's part is played here:
  the Secret is written out as the kubelet mounts it (symbolic links into a
  timestamped directory, ``defaultMode``), each container's command runs with
  its environment in a namespace of its own, and the Service's name resolves
  to the head's address. Pods are stopped as Kubernetes stops them: SIGTERM.
* **systemd** (``futurepool-worker.service``, ``worker.env``): ``ExecStart=``
  runs with exactly the variables of the ``EnvironmentFile=``, in a node's
  namespace; ``systemctl stop`` is played as ``KillMode=mixed`` does it
  (SIGTERM to the main process) while a task runs. ``systemd-analyze
  verify`` checks the unit where it is installed.

Substituted, and nothing else: the head's address (for a DNS name), the key
file's path (for a path outside the test's directory), the script the head
runs, the executable's install path, and the Python that runs futurepool
(this one, so that head and nodes agree on every version). The structural
checks need no root and run everywhere; those that start hosts are marked
``chaos``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

import futurepool
from futurepool import config
from futurepool.protocol import security
from futurepool.testing import netns, wait_until

from ._hosts import REPO, Output, as_host, clean_env, namespace_id, stand_ins, stop

#: Seconds for one wait: a node to join, a script or a process to finish.
TIMEOUT = 60.0
RECIPES = REPO / "examples" / "cluster"

# What the head runs in these tests: it maps tasks until each namespace named
# in RECIPE_NAMESPACES has run one, prints the namespaces seen, and exits 0
# (3 if some never showed up within RECIPE_TIMEOUT seconds).
_HEAD_SCRIPT = """
import json, os, sys, time
import futurepool

def where(_):
    time.sleep(0.02)
    return os.readlink("/proc/self/ns/net")

if __name__ == "__main__":
    wanted = set(os.environ["RECIPE_NAMESPACES"].split(","))
    deadline = time.monotonic() + float(os.environ["RECIPE_TIMEOUT"])
    seen = set()
    with futurepool.Executor() as executor:
        while not wanted <= seen and time.monotonic() < deadline:
            seen.update(executor.map(where, range(32), timeout=30))
    print(json.dumps(sorted(seen)), flush=True)
    sys.exit(0 if wanted <= seen else 3)
"""


def where(started=None, seconds=0.0):
    """Runs in a worker: touches ``started``, sleeps, returns its network namespace."""
    if started:
        Path(started).touch()
    time.sleep(seconds)
    return os.readlink("/proc/self/ns/net")


def head_script(directory: Path) -> Path:
    path = directory / "my_script.py"
    path.write_text(textwrap.dedent(_HEAD_SCRIPT))
    return path


def keygen(bin_dir: Path, home: Path) -> Path:
    """``futurepool keygen`` as a user runs it; the key file it wrote."""
    done = subprocess.run(["futurepool", "keygen"], env=clean_env(bin_dir, home),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def seen_namespaces(out: Output) -> set[str]:
    lines = [line for line in out.lines() if line.startswith("[")]
    assert lines, f"the head script printed no result:\n{out.text()}"
    return set(json.loads(lines[-1]))


# --- SLURM ------------------------------------------------------------------------------------


def sbatch_option(script: str, name: str) -> str:
    match = re.search(rf"^#SBATCH\s+--{name}=(\S+)", script, re.MULTILINE)
    assert match, f"slurm.sbatch has no #SBATCH --{name}="
    return match.group(1)


def test_the_slurm_script_is_valid_bash_with_one_task_per_node():
    script = (RECIPES / "slurm.sbatch").read_text()
    done = subprocess.run(["bash", "-n", str(RECIPES / "slurm.sbatch")], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert int(sbatch_option(script, "nodes")) >= 2
    assert sbatch_option(script, "ntasks-per-node") == "1"
    assert re.search(r"^\s*srun\b.*\\$", script, re.MULTILINE), "no srun step"
    assert re.search(r"FUTUREPOOL_LISTEN=\S+ python3 \"\$@\"", script), "no head"


@pytest.mark.chaos
def test_the_slurm_batch_script_runs_tasks_on_the_other_nodes(tmp_path):
    """The batch script, run on an allocation's first node, scales the script out."""
    netns.skip_unless_available()
    sbatch = RECIPES / "slurm.sbatch"
    nodes = int(sbatch_option(sbatch.read_text(), "nodes"))
    bin_dir, home = stand_ins(tmp_path / "bin"), tmp_path / "home"
    home.mkdir()
    keygen(bin_dir, home)  # once, on a login node; $HOME is shared
    head_script(tmp_path)
    job_id = 4242
    port = 20000 + job_id % 20000
    srun_log = tmp_path / "srun.log"
    out, err = Output(tmp_path / "slurm.out"), Output(tmp_path / "slurm.err")
    with netns.Network(nodes=nodes - 1) as net:
        allocation = [net.namespace(m) for m in net.members]  # the batch node first
        workers = [namespace_id(ns) for ns in allocation[1:]]
        env = clean_env(bin_dir, home, SLURM_JOB_ID=str(job_id),
                        SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
                        SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="1",
                        STAND_IN_SLURM_NAMESPACES=",".join(allocation),
                        STAND_IN_SRUN_LOG=str(srun_log),
                        RECIPE_NAMESPACES=",".join(workers), RECIPE_TIMEOUT="30")
        head_ip = net.address("head")
        batch = net.popen("head", as_host(head_ip, ["bash", str(sbatch), "my_script.py"]),
                          cwd=tmp_path, env=env, stdout=out.file, stderr=err.file,
                          stdin=subprocess.DEVNULL)
        try:
            code = batch.wait(TIMEOUT)
        finally:
            if batch.poll() is None:
                stop(batch, signal.SIGKILL, timeout=TIMEOUT)
            out.close()
            err.close()
    assert code == 0, f"the batch script exited {code}:\n{err.text()[-4000:]}"
    assert set(workers) <= seen_namespaces(out)
    assert f"listening on tcp://0.0.0.0:{port} for remote nodes" in err.text()
    [step] = [json.loads(line) for line in srun_log.read_text().splitlines()]
    assert step["namespaces"] == allocation[1:], "srun did not run on the other nodes"
    assert step["command"] == ["futurepool", "worker", "--connect", f"tcp://{head_ip}:{port}",
                               "--once"]
    # 0: it left when the head said BYE, or on srun's SIGTERM at the end of the job;
    # -SIGTERM: that SIGTERM came while it was still starting, before its handler.
    assert set(step["exit_codes"]) <= {0, -signal.SIGTERM}, err.text()[-4000:]
    assert len(step["exit_codes"]) == nodes - 1


# --- Kubernetes ---------------------------------------------------------------------------------


def fill_in_manifest(bin_dir: Path, home: Path) -> str:
    """Run the manifest's own instructions, ``kubectl apply -f -`` replaced by ``cat``."""
    manifest = RECIPES / "kubernetes.yaml"
    header = [line[1:].strip() for line in manifest.read_text().splitlines()
              if line.startswith("#   ")]
    commands = [line for line in header if line.startswith(("key=", "sed "))]
    assert len(commands) == 2 and commands[1].endswith("| kubectl apply -f -"), header
    script = "\n".join(commands).replace("| kubectl apply -f -", "| cat")
    done = subprocess.run(["sh", "-ec", script], cwd=REPO, env=clean_env(bin_dir, home),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def by_kind(documents: list[dict]) -> dict[str, dict]:
    kinds = [doc["kind"] for doc in documents]
    assert len(kinds) == len(set(kinds)), f"one object of each kind expected: {kinds}"
    return {doc["kind"]: doc for doc in documents}


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def cpu_count(quantity: str) -> int:
    """A CPU quantity as ``resourceFieldRef`` with divisor 1 gives it: rounded up."""
    if quantity.endswith("m"):
        return math.ceil(int(quantity[:-1]) / 1000)
    return math.ceil(float(quantity))


def check_manifest(documents: list[dict]) -> dict[str, dict]:
    """What must hold for the manifest to work; returns its objects by kind."""
    objects = by_kind(documents)
    assert set(objects) == {"Secret", "Service", "Deployment", "Job"}
    secret, service = objects["Secret"], objects["Service"]
    deployment, job = objects["Deployment"], objects["Job"]
    assert set(secret["stringData"]) == {"cluster.key"}
    worker_pod, head_pod = deployment["spec"]["template"], job["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        worker_pod["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] >= 1
    # The Service reaches the head's pod, on the port it listens on, and no worker.
    selector = service["spec"]["selector"].items()
    assert selector <= head_pod["metadata"]["labels"].items()
    assert not selector <= worker_pod["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    [head] = head_pod["spec"]["containers"]
    [head_port] = [p for p in head["ports"] if p["name"] == port["targetPort"]]
    listen = env_of(head)["FUTUREPOOL_LISTEN"]["value"]
    assert listen == f"tcp://0.0.0.0:{head_port['containerPort']}"
    [worker] = worker_pod["spec"]["containers"]
    workers_env = env_of(worker)
    connect = workers_env["FUTUREPOOL_CONNECT"]["value"]
    assert connect == f"tcp://{service['metadata']['name']}:{port['port']}"
    assert worker["command"][:2] == ["futurepool", "worker"]
    # FUTUREPOOL_WORKERS follows the CPU limit of the container itself.
    field = workers_env["FUTUREPOOL_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert field["containerName"] == worker["name"] and field["resource"] == "limits.cpu"
    # Both read the key from the Secret, read-only, with a mode futurepool accepts.
    for pod, container in ((worker_pod, worker), (head_pod, head)):
        key_file = env_of(container)["FUTUREPOOL_KEY_FILE"]["value"]
        [mount] = [m for m in container["volumeMounts"]
                   if key_file.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mount["readOnly"] is True
        assert os.path.basename(key_file) in secret["stringData"]
        [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert volume["secret"]["defaultMode"] & 0o077 == 0, "futurepool refuses that mode"
        assert "fsGroup" not in pod["spec"].get("securityContext", {}), \
            "an fsGroup makes the key group-readable (kubernetes/kubernetes#57923)"
        assert container["securityContext"]["runAsUser"] == 0, "only root reads the key"
    # A stopped pod's running tasks get FUTUREPOOL_GRACE, then the workers stop.
    grace = float(workers_env["FUTUREPOOL_GRACE"]["value"])
    assert worker_pod["spec"]["terminationGracePeriodSeconds"] > \
        grace + config.SHUTDOWN_TIMEOUT
    assert head_pod["spec"]["restartPolicy"] == "Never"
    return objects


def test_the_kubernetes_manifest_holds_together(tmp_path):
    yaml = pytest.importorskip("yaml")
    bin_dir, home = stand_ins(tmp_path / "bin"), tmp_path / "home"
    home.mkdir()
    key_file = Path(security.create_key_file(home / ".config" / "futurepool" / "cluster.key"))
    unfilled = list(yaml.safe_load_all((RECIPES / "kubernetes.yaml").read_text()))
    placeholder = by_kind(unfilled)["Secret"]["stringData"]["cluster.key"]
    with pytest.raises(security.KeyFileError, match="not a futurepool key"):
        security.parse_secret(placeholder)  # applied unfilled, it is refused, not weak
    documents = list(yaml.safe_load_all(fill_in_manifest(bin_dir, home)))
    objects = check_manifest(documents)
    filled = objects["Secret"]["stringData"]["cluster.key"]
    assert security.parse_secret(filled) == security.load_secret(key_file)


def mount_secret(secret: dict, volume: dict, directory: Path) -> Path:
    """Write ``secret`` out as the kubelet mounts a secret volume; returns the mount point.

    The files live in a hidden directory named after the time of writing,
    ``..data`` points at it and each key is a symbolic link through
    ``..data``, so that an update swaps one link. Files get ``defaultMode``.
    """
    directory.mkdir(parents=True)
    directory.chmod(0o1777)  # the kubelet's tmpfs
    stamp = directory / "..2026_11_30_10_00_00.123456789"
    stamp.mkdir(mode=0o755)
    for name, value in secret["stringData"].items():
        (stamp / name).write_text(value)
        (stamp / name).chmod(volume["secret"]["defaultMode"])
        (directory / name).symlink_to(f"..data/{name}")
    (directory / "..data").symlink_to(stamp.name)
    return directory


def container_env(container: dict, mounts: dict[str, Path], base: dict[str, str],
                  head_ip: str | None = None) -> dict[str, str]:
    """The container's environment with its paths and the Service's name resolved here."""
    env = dict(base)
    for name, item in env_of(container).items():
        if "value" in item:
            value = item["value"]
        else:  # resourceFieldRef limits.cpu, divisor 1
            field = item["valueFrom"]["resourceFieldRef"]
            value = str(cpu_count(container["resources"]["limits"][field["resource"][7:]]))
        for mount_path, local in mounts.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                value = str(local) + value[len(mount_path.rstrip("/")):]
        if name == "FUTUREPOOL_CONNECT" and head_ip is not None:  # cluster DNS
            value = re.sub(r"^tcp://[^:]+:", f"tcp://{head_ip}:", value)
        env[name] = value
    return env


def pod_mounts(pod: dict, container: dict, secret: dict, directory: Path) -> dict[str, Path]:
    """Mount the container's secret volumes under ``directory``: mount path → local path."""
    mounts = {}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" in volume:
            mounts[mount["mountPath"]] = mount_secret(secret, volume, directory / mount["name"])
    return mounts


@pytest.mark.chaos
def test_the_kubernetes_pods_join_the_head_job_and_leave_on_sigterm(tmp_path):
    """The Deployment's workers run the Job's tasks; deleted pods leave with exit code 0."""
    yaml = pytest.importorskip("yaml")
    netns.skip_unless_available()
    bin_dir, home = stand_ins(tmp_path / "bin"), tmp_path / "home"
    home.mkdir()
    keygen(bin_dir, home)
    objects = check_manifest(list(yaml.safe_load_all(fill_in_manifest(bin_dir, home))))
    secret, deployment, job = objects["Secret"], objects["Deployment"], objects["Job"]
    worker_pod, head_pod = deployment["spec"]["template"], job["spec"]["template"]
    [worker], [head] = worker_pod["spec"]["containers"], head_pod["spec"]["containers"]
    replicas = min(deployment["spec"]["replicas"], 2)
    script = head_script(tmp_path)
    outputs = []
    with netns.Network(nodes=replicas) as net:
        pods_ns = [namespace_id(net.namespace(node)) for node in net.nodes]
        base = clean_env(bin_dir, Path("/root"), RECIPE_NAMESPACES=",".join(pods_ns),
                         RECIPE_TIMEOUT="30")
        env = container_env(head, pod_mounts(head_pod, head, secret, tmp_path / "head-pod"),
                            base)
        command = [str(script) if arg == "/app/my_script.py" else arg
                   for arg in head["command"] + head.get("args", [])]
        assert str(script) in command, f"the head Job no longer runs /app/my_script.py: {command}"
        head_out, head_err = Output(tmp_path / "head.out"), Output(tmp_path / "head.err")
        outputs += [head_out, head_err]
        head_proc = net.popen("head", command, env=env, cwd="/", stdout=head_out.file,
                              stderr=head_err.file, stdin=subprocess.DEVNULL)
        pods = []
        try:
            for index, node in enumerate(net.nodes):
                mounts = pod_mounts(worker_pod, worker, secret, tmp_path / f"pod{index}")
                env = container_env(worker, mounts, base, head_ip=net.address("head"))
                key_file = Path(env["FUTUREPOOL_KEY_FILE"])
                assert key_file.is_symlink() and oct(key_file.stat().st_mode & 0o777) == "0o400"
                pod_err = Output(tmp_path / f"pod{index}.err")
                outputs.append(pod_err)
                pods.append((net.popen(node, worker["command"] + worker.get("args", []),
                                       env=env, cwd="/", stdout=pod_err.file,
                                       stderr=pod_err.file, stdin=subprocess.DEVNULL), pod_err))
            code = head_proc.wait(TIMEOUT)
            assert code == 0, f"the head exited {code}:\n{head_err.text()[-4000:]}"
            assert set(pods_ns) <= seen_namespaces(head_out)
            # The Job is over; the workers stay for the next head until their pods go.
            grace = worker_pod["spec"]["terminationGracePeriodSeconds"]
            for proc, pod_err in pods:
                assert proc.poll() is None, f"a worker pod exited:\n{pod_err.text()}"
            for proc, pod_err in pods:
                code, _took = stop(proc, signal.SIGTERM, timeout=grace)
                assert code == 0, pod_err.text()
        finally:
            for proc in [head_proc, *(proc for proc, _ in pods)]:
                if proc.poll() is None:
                    stop(proc, signal.SIGKILL, timeout=TIMEOUT)
            for output in outputs:
                output.close()


# --- systemd ------------------------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file: section → key → values (a key may repeat); comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: continued lines not handled"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert equals and current is not None, f"{path.name}:{number}: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads an ``EnvironmentFile=``; ``#``/``;`` comments."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, equals, value = line.partition("=")
        assert equals and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), raw
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def seconds(span: str) -> float:
    """A systemd time span such as ``45``, ``45s``, ``2min`` or ``1min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60}
    parts = re.findall(r"(\d+)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(int(n) * units[u] for n, u in parts)


def the_unit():
    unit = read_unit(RECIPES / "futurepool-worker.service")
    service = {key: values[-1] for key, values in unit["Service"].items()}
    env = read_environment_file(RECIPES / "worker.env")
    return unit, service, env


def test_the_systemd_unit_restarts_and_stops_after_the_grace():
    unit, service, env = the_unit()
    argv = shlex.split(service["ExecStart"].lstrip("-@:+!"))
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "futurepool"
    assert argv[1] == "worker"
    assert service["Restart"] in ("on-failure", "always")
    assert "2" in service.get("RestartPreventExitStatus", "").split(), "bad usage loops"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed", "control-group would SIGTERM the tasks too"
    assert os.path.basename(service["EnvironmentFile"].lstrip("-")) == "worker.env"
    assert env["FUTUREPOOL_CONNECT"].startswith("tcp://")
    assert seconds(service["TimeoutStopSec"]) > float(env["FUTUREPOOL_GRACE"]) + \
        config.SHUTDOWN_TIMEOUT
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verifies_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    _unit, service, _env = the_unit()
    executable = stand_ins(tmp_path / "bin") / "futurepool"
    text = (RECIPES / "futurepool-worker.service").read_text()
    installed = shlex.split(service["ExecStart"])[0]
    unit = tmp_path / "futurepool-worker.service"
    unit.write_text(text.replace(f"ExecStart={installed} ", f"ExecStart={executable} "))
    done = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=TIMEOUT)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


@pytest.mark.chaos
def test_the_systemd_service_joins_and_stops_without_losing_its_running_task(tmp_path):
    """ExecStart with the EnvironmentFile's variables joins; a stop lets the task finish."""
    netns.skip_unless_available()
    _unit, service, env_file = the_unit()
    bin_dir = stand_ins(tmp_path / "bin")
    key_file = security.create_key_file(tmp_path / "etc" / "cluster.key")
    argv = shlex.split(service["ExecStart"].lstrip("-@:+!"))
    argv[0] = str(bin_dir / "futurepool")  # wherever pip put it
    err = Output(tmp_path / "journal")
    with netns.Network(nodes=1, head_in_root=True) as net:
        listen = f"tcp://{net.address('head')}:0"
        with futurepool.Executor(0, listen=listen, key_file=key_file) as executor:
            env = dict(env_file, FUTUREPOOL_CONNECT=executor.address,
                       FUTUREPOOL_KEY_FILE=key_file)
            env.update({k: v for k, v in clean_env(bin_dir, tmp_path).items()
                        if k.startswith("FUTUREPOOL_")})  # the leak checks' settings only
            env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            proc = net.popen("node1", argv, env=env, cwd="/", stdout=err.file,
                             stderr=err.file, stdin=subprocess.DEVNULL)
            try:
                assert wait_until(lambda: executor._max_workers >= 1, TIMEOUT), err.text()
                node = namespace_id(net.namespace("node1"))
                assert set(executor.map(where, [None] * 8, timeout=TIMEOUT)) == {node}
                # systemctl stop, KillMode=mixed: SIGTERM to the main process alone.
                started = tmp_path / "started"
                running = executor.submit(where, str(started), 2.0)
                assert wait_until(started.exists, TIMEOUT)
                code, took = stop(proc, signal.SIGTERM,
                                  timeout=seconds(service["TimeoutStopSec"]))
                assert running.result(timeout=TIMEOUT) == node, "the task was not finished"
                assert code == 0, err.text()  # Restart=on-failure leaves it stopped
                assert took < float(env_file["FUTUREPOOL_GRACE"])
                assert wait_until(lambda: executor._max_workers == 0, TIMEOUT)
            finally:
                if proc.poll() is None:
                    stop(proc, signal.SIGKILL, timeout=TIMEOUT)
                err.close()
