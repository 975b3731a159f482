"""Execute notebooks in a fresh kernel with a per-cell and a per-notebook time limit.

Used by ``make reproduce`` (every solution notebook, saved back with its outputs) and by the
grader (:mod:`course_tools.grade`, one student submission at a time).  Each notebook runs in its
own ``python3`` kernel started by nbclient.  The per-notebook limit is enforced from outside the
kernel: a watchdog thread kills the kernel's whole process group when the limit is reached, so an
endless loop, even one that ignores ``KeyboardInterrupt``, never blocks the caller.

Usage::

    python -m course_tools.nbrun solutions/*.ipynb --profile auto --inplace
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

KERNEL_NAME = "python3"
# ename used for a cell that ran past its limit (nbclient interrupts the kernel and goes on).
CELL_TIMEOUT_ENAME = "CellTimeoutError"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CellError:
    """One cell that raised: its index in the notebook, the exception name and message."""

    cell_index: int
    ename: str
    evalue: str

    def __str__(self) -> str:
        return f"cell {self.cell_index}: {self.ename}: {self.evalue}"


@dataclass
class RunResult:
    """What happened when one notebook ran.

    ``ok`` is true when every cell ran without error within the limits.  ``error`` is a one-line
    cause otherwise.  ``timed_out`` says that a cell or the whole notebook ran past its limit.
    """

    path: Path
    ok: bool
    error: str | None
    seconds: float
    profile: str
    timed_out: bool = False
    cell_errors: list[CellError] = field(default_factory=list)
    cells_executed: int = 0
    saved_to: Path | None = None
    notebook: nbformat.NotebookNode | None = field(default=None, repr=False)
    #: the Python stacks of the kernel and its children when the notebook's time ran out
    #: (``dump_stacks=True``), else ``""``
    stacks: str = ""


class WrappedKernelManager(AsyncKernelManager):
    """A kernel started through ``wrap(command)`` (the grader's sandbox), talking over Unix
    sockets in ``folder`` rather than TCP, so that it needs no network namespace of ours."""

    def __init__(self, wrap: Callable[[list[str]], list[str]], folder: Path,
                 prepare: Callable[[Path], None] | None = None, **kwargs: Any) -> None:
        super().__init__(transport="ipc", ip=str(Path(folder) / "kernel"), **kwargs)
        self.connection_file = str(Path(folder) / "kernel.json")
        self._wrap, self._prepare, self._folder = wrap, prepare, Path(folder)

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        # a signal would reach the wrapper, not the kernel: interrupt over the control channel
        self.kernel_spec.interrupt_mode = "message"
        # fd-level output straight to the kernel's log: a crash's last words must not wait for
        # ipykernel's capture thread, which dies with the process
        extra = [*(extra_arguments or []), "--IPKernelApp.capture_fd_output=False"]
        cmd = super().format_kernel_cmd(extra)
        if self._prepare is not None:
            self._prepare(self._folder)  # e.g. hand the connection file to the sandbox's user
        return self._wrap(cmd)


class _Watchdog:
    """Kills the kernel's process group when the notebook's total time is up."""

    def __init__(self, client: NotebookClient, limit_s: float | None, dump_stacks: bool = False) -> None:
        self.client = client
        self.limit_s = limit_s
        self.dump_stacks = dump_stacks
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watchdog:
        if self.limit_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self._stop.wait(self.limit_s):
            return
        self.fired = True
        # The kernel may still be starting: keep trying until it is gone or the run has ended.
        while not self._stop.is_set():
            if self._kill_kernel():
                return
            self._stop.wait(0.2)

    def _kill_kernel(self) -> bool:
        km = getattr(self.client, "km", None)
        provisioner = getattr(km, "provisioner", None) if km is not None else None
        pid = getattr(provisioner, "pid", None)
        if pid is None:
            return False
        # jupyter_client starts the kernel in its own session, so its process group holds the
        # kernel and whatever it spawned (DataLoader workers, subprocesses) and nothing of ours.
        try:
            pgid = os.getpgid(pid)
            own_group = pgid != os.getpgid(0)
            if self.dump_stacks:
                # every process of the kernel's group writes its threads' stacks (STACK_DUMP_LINE),
                # so that a run that hangs says where
                os.killpg(pgid, signal.SIGUSR1) if own_group else os.kill(pid, signal.SIGUSR1)
                time.sleep(1.0)
            if own_group:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return True


def stack_dump_line(path: Path) -> str:
    """The kernel start-up line after which ``SIGUSR1`` makes the kernel, and every process it
    forks, append all its threads' Python stacks to ``path`` (:mod:`faulthandler`).  Written
    without assignments, so that the notebook's namespace is untouched."""
    return (f"__import__('faulthandler').register(__import__('signal').SIGUSR1, "
            f"file=open({str(path)!r}, 'a'), all_threads=True)")


def kernel_env(profile: str, env_extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The kernel's environment: ours, the profile, this checkout on ``PYTHONPATH``, extras.

    ``PYTHONPATH`` gets this checkout first so that the notebook imports the same
    ``course_utils`` (and checks) as the runner, wherever the notebook's copy lies.
    """
    env = dict(os.environ)
    env["COURSE_PROFILE"] = profile
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # A kernel draws into its outputs: an inherited MPLBACKEND=Agg (right for scripts) would
    # leave the executed notebook without its figures.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.update(env_extra or {})
    return env


def run_notebook(path: str | Path, *, profile: str = "smoke", timeout_cell: float | None = 600,
                 timeout_total: float | None = 1800, cwd: str | Path | None = None,
                 env_extra: Mapping[str, str] | None = None, save_to: str | Path | None = None,
                 allow_errors: bool = False, kernel_name: str = KERNEL_NAME,
                 notebook: nbformat.NotebookNode | None = None,
                 kernel_log: str | Path | None = None,
                 kernel_manager: AsyncKernelManager | None = None,
                 env: Mapping[str, str] | None = None, dump_stacks: bool = False) -> RunResult:
    """Execute the notebook at ``path`` in a fresh kernel and report what happened.

    Args:
        path: the notebook file (read unless ``notebook`` is given; never written unless it is
            also ``save_to``).
        profile: ``COURSE_PROFILE`` for the kernel (``smoke``, ``cpu``, ``full`` or ``auto``).
        timeout_cell: seconds one cell may run; the kernel is then interrupted and the cell
            counts as failed.  ``None``: no limit.
        timeout_total: seconds the whole notebook may run; the kernel is then killed.
        cwd: the kernel's working directory (default: the notebook's folder, as in Jupyter).
        env_extra: more environment variables for the kernel.
        save_to: where to write the executed notebook (only when the run is ``ok``, so that a
            failed run never replaces good committed outputs).
        allow_errors: go on after a cell raises (the grader does; ``make reproduce`` does not).
        kernel_name: the Jupyter kernel to start.
        notebook: an already-read notebook to run instead of reading ``path``.
        kernel_log: file for the kernel process's own stderr (start-up warnings, crashes);
            default: inherited.  What the notebook prints goes to its outputs either way.
        kernel_manager: start the kernel with this manager (the grader's sandboxed one).
        env: the kernel's whole environment instead of ours plus the profile (``env_extra`` and
            ``COURSE_PROFILE`` are still added).
        dump_stacks: when the notebook's time runs out, record the Python stacks of the kernel
            and of every process it started (DataLoader workers) in ``RunResult.stacks`` before
            killing them (not with ``kernel_manager``: a sandboxed kernel cannot write our files).
    """
    path = Path(path)
    nb = notebook if notebook is not None else nbformat.read(path, as_version=4)
    cwd = Path(cwd) if cwd is not None else path.resolve().parent
    cell_errors: list[CellError] = []
    timed_out_cells: list[int] = []

    current: dict[str, int | None] = {"cell": None, "exited": None}

    def on_cell_execute(cell: Any, cell_index: int) -> None:
        current["cell"] = cell_index

    def on_cell_executed(cell: Any, cell_index: int, execute_reply: dict) -> None:
        # exit() replies normally, then the kernel goes: name the cell that asked
        payload = (execute_reply or {}).get("content", {}).get("payload", [])
        if current["exited"] is None and any(p.get("source") == "ask_exit" for p in payload):
            current["exited"] = cell_index

    def on_cell_error(cell: Any, cell_index: int, execute_reply: dict) -> None:
        content = execute_reply.get("content", {})
        ename = str(content.get("ename", "Error"))
        if ename == CELL_TIMEOUT_ENAME:
            timed_out_cells.append(cell_index)
        cell_errors.append(CellError(cell_index, ename, _first_line(content.get("evalue", ""))))

    client = NotebookClient(
        nb,
        timeout=None if timeout_cell is None else int(max(1, timeout_cell)),
        kernel_name=kernel_name,
        allow_errors=allow_errors,
        # On a cell timeout: interrupt and record an error instead of tearing everything down,
        # so that with allow_errors the cells after an endless loop still run.
        interrupt_on_timeout=True,
        error_on_timeout={"ename": CELL_TIMEOUT_ENAME,
                          "evalue": f"cell ran longer than {_secs(timeout_cell)} s and was interrupted",
                          "traceback": []},
        record_timing=False,  # timing metadata would change the saved notebook on every run
        resources={"metadata": {"path": str(cwd)}},
        on_cell_error=on_cell_error,
        on_cell_execute=on_cell_execute,
        on_cell_executed=on_cell_executed,
        **({"km": kernel_manager} if kernel_manager is not None else {}),
    )
    start = time.monotonic()
    error: str | None = None
    kenv = kernel_env(profile, env_extra) if env is None else {
        **env, "COURSE_PROFILE": profile, **(env_extra or {})}
    launch: dict[str, Any] = {"env": kenv, "cwd": str(cwd)}
    log = open(kernel_log, "ab") if kernel_log is not None else None  # noqa: SIM115
    if log is not None:
        launch["stderr"] = launch["stdout"] = log  # handed to Popen by jupyter_client
    dump_stacks = dump_stacks and kernel_manager is None
    stack_file = None
    if dump_stacks:
        fd, name = tempfile.mkstemp(prefix="course-stacks-", suffix=".txt")
        os.close(fd)
        stack_file = Path(name)
        client.extra_arguments = [*client.extra_arguments,
                                  f"--IPKernelApp.exec_lines={stack_dump_line(stack_file)}"]
    with _Watchdog(client, timeout_total, dump_stacks=dump_stacks) as watchdog:
        try:
            client.execute(**launch)
        except DeadKernelError:
            error = f"the kernel died while running cell {current['cell']} (a crash, out of memory or an exit)"

        except (CellTimeoutError, CellExecutionError, RuntimeError,
                TimeoutError) as exc:
            error = _first_line(str(exc)) or type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - a runner must report, not crash, on any failure
            error = f"{type(exc).__name__}: {_first_line(str(exc))}"
        finally:
            if log is not None:
                log.close()
    seconds = time.monotonic() - start
    if current["exited"] is not None:
        error = (f"cell {current['exited']} called exit(), which stops the kernel: the cells "
                 "after it did not run")
    timed_out = watchdog.fired or bool(timed_out_cells)
    stacks = ""
    if stack_file is not None:
        stacks = stack_file.read_text(errors="replace") if watchdog.fired else ""
        stack_file.unlink(missing_ok=True)
    if watchdog.fired:
        running = current["cell"]
        where = "" if running is None else f" in cell {running} ({_first_line(nb.cells[running].source)[:80]!r})"
        error = f"notebook ran longer than {_secs(timeout_total)} s and was stopped{where}"
    elif timed_out_cells:
        error = f"cell {timed_out_cells[0]} ran longer than {_secs(timeout_cell)} s and was interrupted"
    elif error is None and cell_errors:
        error = str(cell_errors[0])
    elif error is not None and not allow_errors and cell_errors:
        error = str(cell_errors[0])  # nbclient's message is a long traceback; keep one line
    ok = error is None
    result = RunResult(path=path, ok=ok, error=error, seconds=seconds, profile=profile,
                       timed_out=timed_out, cell_errors=cell_errors,
                       cells_executed=client.code_cells_executed, notebook=nb, stacks=stacks)
    if ok and save_to is not None:
        save_to = Path(save_to)
        nbformat.write(nb, save_to)
        result.saved_to = save_to
    return result


def _secs(limit: float | None) -> str:
    return "no limit" if limit is None else f"{limit:g}"


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:500]
    return ""


def _resolve(profile: str) -> str:
    from course_utils.profiles import resolve_profile_name

    return resolve_profile_name(profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_tools.nbrun",
        description="Execute notebooks, each in a fresh kernel with time limits, and print the "
                    "time each one took.")
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebook files to execute")
    parser.add_argument("--profile", default="auto",
                        help="COURSE_PROFILE for the kernels: smoke, cpu, full or auto (default; "
                             "full with CUDA, else cpu)")
    parser.add_argument("--inplace", action="store_true",
                        help="write each notebook back with its outputs (only when it ran cleanly)")
    parser.add_argument("--timeout-cell", type=float, default=1200, help="seconds per cell (1200)")
    parser.add_argument("--timeout-total", type=float, default=3600,
                        help="seconds per notebook (3600)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="folder for figures ($COURSE_FIGURES, default: <repo>/figures)")
    args = parser.parse_args(argv)

    profile = _resolve(args.profile)
    # Absolute, because each kernel runs in its notebook's folder.
    figures = (args.figures or Path(os.environ.get("COURSE_FIGURES", REPO_ROOT / "figures"))).resolve()
    figures.mkdir(parents=True, exist_ok=True)
    failures = 0
    print(f"profile {profile}, figures in {figures}")
    for path in args.notebooks:
        result = run_notebook(path, profile=profile, timeout_cell=args.timeout_cell,
                              timeout_total=args.timeout_total,
                              env_extra={"COURSE_FIGURES": str(figures)},
                              save_to=path if args.inplace else None)
        status = "ok" if result.ok else "FAILED"
        print(f"{status:6s} {result.seconds:8.1f} s  {path}" + ("" if result.ok else f"  ({result.error})"),
              flush=True)
        failures += not result.ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
