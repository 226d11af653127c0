"""Launch data-parallel training on MXNet's parameter server (kvstore dist_sync / dist_async).

    python -m mx_lsoftmax.launch --workers 2 --servers 1 -- python examples/train_mnist.py --kvstore dist_sync
    python -m mx_lsoftmax.launch --workers 4 --servers 2 --hostfile hosts.txt -- python ...

MXNet 1.9.1's own launcher (``mxnet/tools/launch.py``, dmlc_tracker) stops on Python >= 3.9
(``Thread.isAlive`` is gone). This one starts the same processes with the same ``DMLC_*``
variables: the scheduler and the servers are ``python -c "import mxnet"`` with their role set
(MXNet runs them inside the import and exits there, so they never load mx_lsoftmax or its
compiled library); every worker runs the command. Locally everything listens on 127.0.0.1 at
a free port; with ``--hostfile`` (one host per line) the servers and workers go round-robin
over the hosts through ``ssh`` and the scheduler runs here.

Faults: ps-lite waits forever for a peer that died, so the launcher watches its children.
When a worker exits with an error or a signal, or ``--timeout`` passes, it stops every
process it started (each in its own process group) within ``--grace`` seconds and exits
non-zero with a message naming the process. Starting the processes by hand with the same
variables keeps working; the launcher adds nothing they need.
"""
import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

__all__ = ["Job", "free_port", "role_environment", "launch", "main"]

ROLE_COMMAND = [sys.executable, "-c", "import mxnet"]


def free_port(host="127.0.0.1"):
    """A TCP port nothing listens on now (the scheduler binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def role_environment(role, root_uri, root_port, workers, servers, node_host=None):
    """The DMLC variables of one process of the job."""
    variables = {"DMLC_ROLE": role, "DMLC_PS_ROOT_URI": root_uri, "DMLC_PS_ROOT_PORT": str(root_port),
                 "DMLC_NUM_WORKER": str(workers), "DMLC_NUM_SERVER": str(servers)}
    if node_host:
        variables["DMLC_NODE_HOST"] = node_host  # the address this process announces to the others
    return variables


class Job:
    """The processes of one launch, each in its own session so that a stop reaches its children."""

    def __init__(self):
        self.processes = []  # (name, Popen)

    def start(self, name, command, environment):
        process = subprocess.Popen(command, env={**os.environ, **environment}, start_new_session=True)
        self.processes.append((name, process))
        return process

    def stop(self, grace):
        """SIGTERM to every process group still running, SIGKILL after ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [(name, p) for name, p in self.processes if p.poll() is None]
            for _, process in alive:
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.poll() is None for _, p in alive):
                time.sleep(0.05)
        for _, process in self.processes:
            process.wait()


def _describe(code):
    return f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit status {code}"


def launch(command, workers=2, servers=1, hosts=None, timeout=None, grace=10.0, port=None,
           scheduler_host=None, poll=0.1, log=print, job=None):
    """Run ``command`` (a list) as ``workers`` workers with ``servers`` servers and a scheduler.

    hosts None: everything on 127.0.0.1. Otherwise a list of host names: servers and workers
    go round-robin over them through ssh, the scheduler runs here at ``scheduler_host``.
    Returns 0 when every worker exits 0; otherwise stops the job and returns 1 (a worker
    failed) or 124 (``timeout`` seconds passed), after logging why. Every process started
    has ended when it returns; ``job`` (a ``Job``) lists them.
    """
    if workers < 1 or servers < 1:
        raise ValueError(f"launch needs >= 1 worker and >= 1 server, got workers={workers} servers={servers}")
    local = not hosts
    root = "127.0.0.1" if local else (scheduler_host or socket.getfqdn())
    port = port or free_port("127.0.0.1" if local else "")
    job = Job() if job is None else job

    def environment(role):
        return role_environment(role, root, port, workers, servers, "127.0.0.1" if local else None)

    def start(name, role, role_command, index):
        variables = environment(role)
        if local:
            return job.start(name, role_command, variables)
        host = hosts[index % len(hosts)]
        remote = " ".join(f"{key}={shlex.quote(value)}" for key, value in variables.items())
        remote = f"cd {shlex.quote(os.getcwd())} && env {remote} {' '.join(map(shlex.quote, role_command))}"
        return job.start(f"{name} on {host}", ["ssh", "-o", "BatchMode=yes", host, remote], {})

    started = time.monotonic()
    try:
        job.start("scheduler", ROLE_COMMAND, environment("scheduler"))
        for index in range(servers):
            start(f"server {index}", "server", ROLE_COMMAND, index)
        for index in range(workers):
            start(f"worker {index}", "worker", list(command), index)
        worker_processes = [process for _, process in job.processes[-workers:]]
        while True:
            for name, process in job.processes:
                code = process.poll()
                if code not in (None, 0):  # a worker, a server or the scheduler failed
                    log(f"launch: {name} (pid {process.pid}) stopped with {_describe(code)}; stopping the other "
                        f"processes (ps-lite would wait for it forever)")
                    return 1
            if all(process.poll() == 0 for process in worker_processes):
                # Scheduler and servers leave once every worker has finalised.
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(p.poll() is None for _, p in job.processes):
                    time.sleep(poll)
                return 0
            if timeout is not None and time.monotonic() - started > timeout:
                log(f"launch: the job ran past --timeout {timeout:g} s; stopping every process")
                return 124
            time.sleep(poll)
    finally:
        job.stop(grace)


def read_hostfile(path):
    try:
        with open(path) as handle:
            hosts = [line.split("#")[0].strip() for line in handle]
    except OSError as error:
        raise SystemExit(f"launch: cannot read --hostfile {path}: {error.strerror}")
    hosts = [host for host in hosts if host]
    if not hosts:
        raise SystemExit(f"launch: --hostfile {path} names no host")
    return hosts


def main(argv=None):
    from .support.cli import DefaultsFormatter, positive_float, positive_int
    parser = argparse.ArgumentParser(prog="python -m mx_lsoftmax.launch", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--workers", "-n", type=positive_int, default=2, help="worker processes")
    parser.add_argument("--servers", "-s", type=positive_int, default=1, help="server processes")
    parser.add_argument("--hostfile", metavar="FILE", help="hosts, one per line, reached by ssh (default: all local)")
    parser.add_argument("--scheduler-host", help="this machine's address as the hosts see it (with --hostfile); "
                                                 "default: its fully qualified name")
    parser.add_argument("--port", type=positive_int, default=None, help="the scheduler's port; default: a free one")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="stop everything after this many seconds; default: no limit")
    parser.add_argument("--grace", type=positive_float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the worker command, after --")
    arguments = parser.parse_args(argv)
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    if not command:
        parser.error("give the worker command after --, e.g. -- python examples/train_mnist.py --kvstore dist_sync")
    hosts = read_hostfile(arguments.hostfile) if arguments.hostfile else None
    return launch(command, arguments.workers, arguments.servers, hosts, arguments.timeout, arguments.grace,
                  arguments.port, arguments.scheduler_host, log=lambda text: print(text, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
