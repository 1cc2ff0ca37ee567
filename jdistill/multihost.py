"""More than one process: joining the multi-controller runtime, and host values every process
must agree on.

A multi-host run (a TPU pod slice, several GPU nodes, or several CPU processes in the tests) is
one program per process; each feeds its own devices and all of them run every collective. Host
values that decide what runs next (an evaluation's metrics, a stop request, the data position)
are therefore exchanged explicitly, as JSON, through the runtime's collectives.
"""

import errno
import json
import logging as pylogging
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jdistill import exits

# Environment variables that stand for the multi-host flags of `jdistill.main`.
ENV = {
    "multihost": "JDISTILL_MULTIHOST",
    "coordinator_address": "JDISTILL_COORDINATOR_ADDRESS",
    "num_processes": "JDISTILL_NUM_PROCESSES",
    "process_id": "JDISTILL_PROCESS_ID",
}
# Extra seconds JAX's own join timeout gets over --distributed_timeout. When JAX's runs out,
# its runtime aborts the process (LOG(FATAL), a C++ stack and no cause); the watchdog, which
# fires at --distributed_timeout, must always come first, even on a busy host.
_RUNTIME_GRACE_S = 60
_EXAMPLE = "give host:port, e.g. localhost:1234"


class JoinError(Exception):
    """The processes of a multi-host run could not all join the runtime in time."""


def initialize_distributed(
    multihost=False,
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    *,
    timeout_s=300,
    heartbeat_s=100,
):
    """Joins the multi-controller runtime; call before any other JAX call. No-op unless asked.

    With no coordinator, JAX finds the cluster itself (Cloud TPU metadata, Slurm variables);
    with one (plain GPU clusters, the CPU tests), `num_processes` and `process_id` name this
    process. `timeout_s` bounds the wait for every process to join; `heartbeat_s` is how long
    the others wait for a process that stopped answering before they fail (a dead process that
    closed its sockets fails them at once, in their next collective).

    A process other than 0 first waits for the coordinator's port to accept connections, so
    that nobody listening there is reported as such. If the processes have not all joined
    after `timeout_s`, a watchdog prints `error: <who waited where, for what>` to stderr and
    ends the process with `exits.EXIT_ERROR`: JAX's runtime would otherwise abort it a little later
    with a C++ stack and no cause, and the wait cannot be interrupted from Python.

    Returns:
      whether the runtime was initialised (False: a single-process run).
    Raises:
      ValueError: coordinator flags without `multihost`, an incomplete or malformed set of
        them, or `multihost` alone where JAX finds no cluster.
      JoinError: nothing accepted connections at the coordinator's address within `timeout_s`,
        or (process 0) another program holds the coordinator's port.
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    named = [k for k, v in given.items() if v not in (None, "")]
    if not multihost:
        if named:
            raise ValueError(f"--{named[0]} is given without --multihost ({ENV['multihost']}=1)")
        return False
    if named and len(named) != len(given):
        missing = [f"--{k}" for k in given if k not in named]
        raise ValueError(
            f"--multihost with --{named[0]} also needs {', '.join(missing)} "
            "(or none of them, to let JAX discover the cluster)"
        )
    if int(timeout_s) < 1:
        raise ValueError(f"--distributed_timeout={timeout_s}: must be at least 1 (seconds)")
    deadline = time.monotonic() + int(timeout_s)
    if named:
        host, port = parse_coordinator_address(coordinator_address)
        coordinator_address = coordinator_address.strip()
        num_processes, process_id = int(num_processes), int(process_id)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} --num_processes={num_processes}: "
                "need 0 <= process_id < num_processes"
            )
        if process_id > 0:
            _wait_for_coordinator(host, port, deadline, process_id, num_processes, timeout_s)
        else:
            _check_port_free(port, num_processes, coordinator_address)
    elif not _cluster_found():
        raise ValueError(_NO_CLUSTER)
    stuck = _stuck_message(process_id, num_processes, coordinator_address, timeout_s)
    try:
        _initialize_or_exit(
            deadline,
            stuck,
            coordinator_address=coordinator_address or None,
            num_processes=num_processes if named else None,
            process_id=process_id if named else None,
            initialization_timeout=int(timeout_s) + _RUNTIME_GRACE_S,
            heartbeat_timeout_seconds=int(heartbeat_s),
        )
    except ValueError as e:
        # The check above mirrors JAX's discovery; should they ever differ, JAX's own
        # complaint (`coordinator_address should be defined.`) still becomes ours.
        if not named and ("should be defined" in str(e) or "must be defined" in str(e)):
            raise ValueError(_NO_CLUSTER) from e
        raise
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


_NO_CLUSTER = (
    "--multihost alone lets JAX discover the cluster, and it found none (no Cloud TPU VM, "
    "Slurm job, Open MPI or Kubernetes environment); elsewhere give "
    "--coordinator_address=host:port --num_processes=N --process_id=I, or set "
    f"{ENV['coordinator_address']}, {ENV['num_processes']} and {ENV['process_id']}"
)


def parse_coordinator_address(address):
    """`(host, port)` of a `host:port` or `[ipv6]:port` coordinator address.

    Checked before JAX sees it: JAX splits it without checking and fails with an IndexError
    (no port), or its runtime retries an impossible address until the join timeout.

    Raises:
      ValueError: no host, no port, or a port that is not a number in 1..65535.
    """
    flag = f"--coordinator_address={address!r}"
    text = str(address).strip()
    if text.startswith("["):  # [::1]:1234: the host's own colons are inside the brackets
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{flag}: no closing ']' after the IPv6 host; {_EXAMPLE}")
        if not rest.startswith(":"):
            raise ValueError(f"{flag}: no port; give [host]:port, e.g. [::1]:1234")
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"{flag}: no port; {_EXAMPLE}")
    if not host:
        raise ValueError(f"{flag}: no host; {_EXAMPLE}")
    if not port:
        raise ValueError(f"{flag}: no port after the ':'; {_EXAMPLE}")
    if not port.isdigit():
        raise ValueError(f"{flag}: the port {port!r} is not a number; {_EXAMPLE}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{flag}: the port {int(port)} is out of range (1 to 65535)")
    return host, int(port)


def _cluster_found():
    """Whether JAX's cluster discovery would find this process's cluster.

    The same test `jax.distributed.initialize` makes, asked first so that `--multihost` alone
    outside a cluster names its cause instead of JAX's `coordinator_address should be defined`.
    """
    from jax._src import clusters  # noqa: PLC0415 (no public API lists the cluster types)

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:  # tried only when named (mpi4py), which we never do
            continue
        try:
            if env.is_env_present():
                return True
        except Exception:  # noqa: BLE001 (a broken probe: let JAX try and say what failed)
            return True
    return False


def _check_port_free(port, num_processes, coordinator_address):
    """Raises JoinError if another program listens on the port process 0's service binds.

    The runtime fails to bind it and then crashes the process (SIGSEGV, no cause). It binds
    `[::]:port` (JAX_COORDINATOR_BIND_ADDRESS, when set, names another address: not checked).
    """
    if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return
    for family, addr in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                # as the runtime binds: a connection of an earlier run in TIME_WAIT is no owner
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # no IPv6 here: try IPv4; else leave it to JAX
                continue
            raise JoinError(
                f"process 0 of {num_processes}: the port {port} of --coordinator_address="
                f"{coordinator_address!r} is taken on this host ({e.strerror}); choose a free "
                "port, the same for every process, or end what holds it"
            ) from None


def _wait_for_coordinator(host, port, deadline, process_id, num_processes, timeout_s):
    """Returns once something accepts connections at host:port; JoinError at `deadline`.

    JAX's runtime retries an unanswered coordinator until its timeout and then aborts the
    process with no cause; a plain TCP connect tells that nobody listens there.
    """
    last = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(left, 2.0)):
                return
        except OSError as e:  # refused (process 0 not up yet), unreachable, unresolved
            last = e
        time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
    where = f"{host}:{port}"
    if isinstance(last, socket.gaierror):
        raise JoinError(
            f"process {process_id} of {num_processes}: the coordinator's host {host!r} did not "
            f"resolve within {timeout_s} s ({last.strerror}); check --coordinator_address"
        )
    raise JoinError(
        f"process {process_id} of {num_processes}: nothing answered at {where} within "
        f"{timeout_s} s; start process 0 (it listens there), with the same "
        "--coordinator_address"
    )


def _stuck_message(process_id, num_processes, coordinator_address, timeout_s):
    """fn() -> the cause to print when the join outlives `timeout_s`.

    A function, because where JAX discovers the cluster the process's index, the count and the
    address are only known (in JAX's state) once the join has started.
    """
    check = "check that every process runs with the same --coordinator_address and --num_processes"

    def message():
        from jax._src import distributed  # noqa: PLC0415 (the discovered values live there)

        state = distributed.global_state
        if coordinator_address:
            i, n, where = process_id, num_processes, coordinator_address
        elif state.coordinator_address:
            i, n, where = state.process_id, state.num_processes, state.coordinator_address
        else:  # still asking the cluster (e.g. a TPU VM's metadata) for the coordinator
            return f"JAX did not find the cluster's coordinator within {timeout_s} s"
        if i == 0:
            # The runtime's only word on who is missing is its abort's bare DEADLINE_EXCEEDED;
            # the coordination service answers nothing to a process that has not joined.
            waited = f"process 0 of {n} waited {timeout_s} s at {where} and"
            if n == 2:
                return f"{waited} process 1 never joined ({check})"
            return (
                f"{waited} at least 1 of the other {n - 1} processes never joined "
                f"(the runtime does not say which; {check})"
            )
        return (
            f"process {i} of {n} reached the coordinator at {where}, but not all {n} "
            f"processes joined within {timeout_s} s ({check})"
        )

    return message


def _initialize_or_exit(deadline, stuck, **kwargs):
    """`jax.distributed.initialize(**kwargs)`, or `error: stuck()` and exit at `deadline`.

    The join blocks in C++ (with the GIL released), so a Python timeout cannot interrupt it;
    the watchdog thread ends the process instead, before the runtime's own abort.
    """
    done = threading.Event()

    def watch():
        if done.wait(max(deadline - time.monotonic(), 0)):
            return
        cause = stuck()
        logging.flush()
        sys.stdout.flush()
        print(f"error: {cause}", file=sys.stderr, flush=True)
        os._exit(exits.EXIT_ERROR)

    threading.Thread(target=watch, name="jdistill-join-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs)
    finally:
        done.set()


def process_log_prefix():
    """Prefixes every log line of a multi-process run with `[process i/n] `.

    Every process logs to stderr; the prefix says whose line it is where a launcher (Slurm,
    `gcloud ... --worker=all`) interleaves them. Only process 0 writes files.
    """
    if jax.process_count() == 1:
        return
    handler = logging.get_absl_handler().python_handler
    base = handler.formatter or logging.PythonFormatter()  # absl's `I1123 12:00:00 ...` header
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] "

    class Prefixed(pylogging.Formatter):
        def format(self, record):
            return prefix + base.format(record)

    handler.setFormatter(Prefixed())


def allgather_json(obj):
    """Every process's JSON-able `obj`, in process order, on every process (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes, strict=True)]


def broadcast_json(obj):
    """Process 0's JSON-able `obj` on every process (a collective; the others' `obj` is unused).

    Values that steer control flow (evaluation metrics, a stop decision) must be the same on
    every process, or they would leave the collective program at different steps.
    """
    if jax.process_count() == 1:
        return obj
    data = json.dumps(obj if jax.process_index() == 0 else None).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        buf[:] = np.frombuffer(data, np.uint8)
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())


def lost_processes(timeout_s):
    """The indices of the processes the runtime no longer hears from, or None if unknown.

    Asks the coordination service which processes are alive; it answers once each process has
    either asked too or missed its heartbeats, so the answer comes within about the heartbeat
    timeout. Bounded by `timeout_s` (None after it, or when the service cannot be reached: the
    coordinator itself may be the process that died).
    """
    from jax._src import distributed  # noqa: PLC0415 (no public API names the live processes)

    client = distributed.global_state.client
    if client is None:
        return None
    everyone = list(range(jax.process_count()))
    answer = []

    def ask():
        try:
            answer.append(client.get_live_nodes(everyone))
        except Exception:  # noqa: BLE001 (the coordinator is gone too: unknown)
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not answer:
        return None
    return sorted(set(everyone) - set(answer[0]))


def is_runtime_failure(e):
    """Whether `e` is the runtime's failure of a collective or of the coordination service
    (what a lost process causes in the others), rather than an error of this process's own."""
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and jax.process_count() > 1
