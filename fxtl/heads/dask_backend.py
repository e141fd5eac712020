"""Where a head search's candidate fits run: joblib's process pool, threads, or a Dask cluster.

``"dask"`` needs ``pip install "fxtl[dask]"``; ``scheduler`` is an address such as
``tcp://host:8786``, else ``$DASK_SCHEDULER_ADDRESS``, else a ``LocalCluster`` started for the
call and closed after it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any, Callable

from ..errors import FxtlError, ParameterError

__all__ = ["BACKENDS", "DASK_CONNECT_TIMEOUT", "SearchBackend", "import_distributed",
           "probe_scheduler"]

# Where the search's candidate fits run; the first is the default.
BACKENDS = ("loky", "threading", "dask")
# Seconds to wait for a Dask scheduler: a wrong address should fail fast, not hang.
DASK_CONNECT_TIMEOUT = 10.0


_DASK_MISSING = ('backend="dask" needs dask.distributed, which is not installed; '
                 'pip install "fxtl[dask]"')


def import_distributed():
    """The ``distributed`` package, or a one-line FxtlError naming the install command."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError:
        raise FxtlError(_DASK_MISSING) from None
    return distributed


class SearchBackend:
    """Where GridSearchCV's candidate fits run; one per :func:`fit_heads` call.

    ``"dask"`` connects (or starts a ``LocalCluster``) on the first search and keeps the client
    for the next heads; :meth:`close` shuts down what it started. A ``distributed.Client``
    passed as ``scheduler`` is used as it is and left open.
    """

    def __init__(self, name: str, scheduler: Any = None, *, log: Callable[[str], None]):
        if name not in BACKENDS:
            raise ParameterError("backend", f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
        if scheduler is not None and name != "dask":
            raise ParameterError("scheduler", f"a scheduler ({scheduler}) is only used with backend "
                                 f"'dask', not {name!r}; pass backend='dask'")
        if name == "dask":
            import_distributed()  # fail before any work when it is missing
        self.name, self.scheduler, self.log = name, scheduler, log
        self.client = None
        self.info: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def parallel(self, small: bool) -> tuple[contextlib.AbstractContextManager, str]:
        """``(joblib context for the search, the backend that runs it)``."""
        from joblib import parallel_config

        if self.name == "dask":
            self._connect()
            return parallel_config(backend="dask", client=self.client), "dask"
        if self.name == "threading" or small:
            return parallel_config(backend="threading"), "threading"
        return contextlib.nullcontext(), "loky"

    def _connect(self) -> None:
        if self.client is not None:
            return
        distributed = import_distributed()
        sched = self.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        if isinstance(sched, distributed.Client):
            self.client = sched
            origin = "client given"
        elif sched is None:
            from ..distributed import available_cores

            cores = available_cores()
            self.log(f"fxtl: starting a Dask LocalCluster ({cores} workers x 1 thread)")
            import dask

            # Dask's workers set MALLOC_TRIM_THRESHOLD_ low, which stops glibc raising its mmap
            # threshold, so every large numpy temporary is mmapped and faulted in again; this
            # cluster lives for one call, so keep glibc's default.
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                       "MALLOC_TRIM_THRESHOLD_": None}
            try:
                with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                    cluster = self._stack.enter_context(distributed.LocalCluster(
                        n_workers=cores, threads_per_worker=1, dashboard_address=":0",
                        silence_logs=logging.ERROR))
            except (OSError, RuntimeError) as exc:
                raise FxtlError(f"could not start a local Dask cluster ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); start "
                                "`dask scheduler` and `dask worker` and pass its address as scheduler") from None
            self.client = self._stack.enter_context(distributed.Client(cluster, set_as_default=False))
            origin = "LocalCluster started by fxtl"
        else:
            address = str(sched)
            probe_scheduler(address)
            try:
                client = distributed.Client(address, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
            except (OSError, ValueError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise FxtlError(f"cannot connect to the Dask scheduler {address}: {first}; check "
                                "the scheduler address (or DASK_SCHEDULER_ADDRESS)") from None
            self.client = self._stack.enter_context(client)
            origin = "scheduler given" if self.scheduler else "DASK_SCHEDULER_ADDRESS"
        threads = dict(self.client.nthreads())
        if not threads:
            self.log(f"fxtl: the Dask scheduler {self.client.scheduler.address} has no workers "
                     "yet; the search waits for them")
        self.info = {"scheduler": self.client.scheduler.address, "origin": origin,
                     "workers": len(threads), "threads": int(sum(threads.values()))}
        self.log(f"fxtl: search on Dask: {self.info['scheduler']} ({self.info['workers']} workers, "
                 f"{self.info['threads']} threads)")

    def close(self) -> None:
        self._stack.close()
        self.client = None


def probe_scheduler(address: str) -> None:
    """One line naming ``address`` when nothing listens there (before a Client, whose failed
    start would wait out its timeout and print a traceback at exit)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import get_address_host_port

    try:
        scheme, _ = parse_address(address)
    except (ValueError, TypeError) as exc:
        raise FxtlError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. "
                        "tcp://host:8786") from None
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = get_address_host_port(address)
    except ValueError as exc:
        raise FxtlError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. "
                        "tcp://host:8786") from None
    try:
        socket.create_connection((host, port), timeout=DASK_CONNECT_TIMEOUT).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise FxtlError(f"cannot reach the Dask scheduler at {address} ({why}, within "
                        f"{DASK_CONNECT_TIMEOUT:g} s); start `dask scheduler` there or fix "
                        "the scheduler address (or DASK_SCHEDULER_ADDRESS)") from None

