"""More than one process: joining the multi-controller runtime, and host values every process
must agree on.

A multi-host run (a TPU pod slice, several GPU nodes, or several CPU processes in the tests) is
one program per process; each feeds its own devices and all of them run every collective. Host
values that decide what runs next (an evaluation's metrics, a stop request, the data position)
are therefore exchanged explicitly, as JSON, through the runtime's collectives.
"""

import json
import logging as pylogging
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# Environment variables that stand for the multi-host flags of `jdistill.main`.
ENV = {
    "multihost": "JDISTILL_MULTIHOST",
    "coordinator_address": "JDISTILL_COORDINATOR_ADDRESS",
    "num_processes": "JDISTILL_NUM_PROCESSES",
    "process_id": "JDISTILL_PROCESS_ID",
}


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

    Returns:
      whether the runtime was initialised (False: a single-process run).
    Raises:
      ValueError: coordinator flags without `multihost`, or an incomplete set of them.
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
    jax.distributed.initialize(
        coordinator_address or None,
        int(num_processes) if named else None,
        int(process_id) if named else None,
        initialization_timeout=int(timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_s),
    )
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


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
