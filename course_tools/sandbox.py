"""Run a submission's code where it can harm nothing: bubblewrap namespaces and resource limits.

Every process the grader starts for a submission (its notebook's kernel, and each child that loads
its definitions) goes through :func:`command`::

    bwrap  --ro-bind / /            the whole file system, read-only
           --tmpfs /tmp, $HOME, …   emptied: other students' work, the grader's files
           --tmpfs <hidden folder>  the submissions folder, the CSV's folder, the feedback folder
           --bind <work> <work>     the submission's own temporary folder: the only writable place
           --unshare-net/-pid/-ipc  no network; sees only its own processes
           --die-with-parent        every process it started dies with it (a PID namespace ends
                                    when its first process does)
      [setpriv → uid nobody]        when the grader runs as root, the code does not
      prlimit --as --cpu --fsize --nproc

The sandbox comes from Debian's ``bubblewrap`` package (``make`` installs it where it can).
Without it, :func:`detect` says so and the grader refuses to run unless told ``--no-sandbox``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534  # the uid and gid a root grader runs submissions as
BWRAP = "bwrap"


class SandboxError(RuntimeError):
    """No isolation can be had on this machine (and ``--no-sandbox`` was not given)."""


@dataclass(frozen=True)
class Limits:
    """Per-process resource limits (``prlimit``).  ``nproc`` counts the threads of every process
    of the sandbox's user, so it leaves room for torch's and ZeroMQ's threads."""

    memory_bytes: int = 8 << 30
    cpu_seconds: int = 600
    file_bytes: int = 256 << 20
    nproc: int = 512

    def args(self) -> list[str]:
        return ["prlimit", f"--as={self.memory_bytes}", f"--cpu={self.cpu_seconds}",
                f"--fsize={self.file_bytes}", f"--nproc={self.nproc}", "--"]


@lru_cache(maxsize=1)
def detect() -> str:
    """``"bwrap"`` when a bubblewrap sandbox works here (tried once), else ``"none"``."""
    if shutil.which(BWRAP) is None or shutil.which("prlimit") is None:
        return "none"
    probe = _bwrap_args(Path("/"), hide=()) + ["true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return "bwrap" if ok else "none"


def require(isolation: str) -> str:
    """Check that ``isolation`` (``"bwrap"`` or ``"none"``, the latter only when asked for) can run."""
    if isolation == "none":
        return isolation
    if isolation != "bwrap":
        raise SandboxError(f"unknown isolation {isolation!r}: expected 'bwrap' or 'none'")
    if detect() != "bwrap":
        raise SandboxError(
            "no sandbox on this machine: bubblewrap ('bwrap', Debian package bubblewrap) is missing "
            "or cannot create namespaces here. Install it (apt-get install bubblewrap), or grade "
            "without isolation with --no-sandbox (only for submissions you trust).")
    return isolation


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _readable_roots() -> list[Path]:
    """Folders the sandboxed Python needs that may lie under a hidden folder (``$HOME``, /root):
    the interpreter, the virtual environment and this checkout."""
    from .nbrun import REPO_ROOT

    roots = [Path(sys.base_prefix), Path(sys.prefix), REPO_ROOT]
    return [Path(os.path.realpath(r)) for r in roots]


def _open_parents(path: Path, emptied: Sequence[Path]) -> list[str]:
    """bwrap makes missing mount points private (0700): create the folders between an emptied
    folder and ``path`` readable first, so that the sandbox's user can reach ``path``."""
    above = [h for h in emptied if h in path.parents]
    if not above:
        return []
    top = max(above, key=lambda h: len(h.parts))
    return [a for parent in reversed(path.parents) if top in parent.parents
            for a in ("--perms", "0755", "--dir", str(parent))]


def _bwrap_args(work: Path, hide: Sequence[Path]) -> list[str]:
    root = _running_as_root()
    args = [BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    homes = {Path("/root"), Path(os.path.expanduser("~")), Path("/tmp"), Path("/var/tmp"),
             Path("/dev/shm")}
    homes = sorted((h for h in homes if h.is_dir() and h != Path("/")), key=lambda p: len(p.parts))
    for folder in homes:
        # a private /dev/shm stays writable: Python's multiprocessing locks live there
        args += (["--perms", "1777"] if folder == Path("/dev/shm") else []) + ["--tmpfs", str(folder)]
    for keep in _readable_roots():
        # what Python needs back, read-only, where it sat under an emptied folder
        if any(h in keep.parents for h in homes):
            args += _open_parents(keep, homes) + ["--ro-bind", str(keep), str(keep)]
    # then the grader's folders, even where they lie inside what was just bound back
    for path in sorted({Path(os.path.realpath(h)) for h in hide}, key=lambda p: len(p.parts)):
        if path.is_dir() and path != Path("/"):
            args += ["--tmpfs", str(path)]
        elif path.is_file():
            args += ["--ro-bind", "/dev/null", str(path)]  # a file: shown empty
    if work != Path("/"):
        args += _open_parents(work, homes) + ["--bind", str(work), str(work), "--chdir", str(work)]
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if root:
        # keep only what setpriv needs to become nobody; it drops them again
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user"]
    args.append("--")
    if root:
        args += ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return args


def hidden(folders: Sequence[Path], files: Sequence[Path] = ()) -> tuple[str, ...]:
    """What to hide: each folder, or, where a folder holds the Python or the checkout that the
    sandbox needs (a CSV written into the checkout), the given files inside it instead."""
    roots = _readable_roots()
    out: list[str] = []
    for folder in folders:
        folder = Path(os.path.realpath(folder))
        if any(r == folder or folder in r.parents for r in roots):
            out += [str(f) for f in files if folder in Path(os.path.realpath(f)).parents]
        else:
            out.append(str(folder))
    return tuple(dict.fromkeys(out))


def prepare_work(work: Path) -> None:
    """Make ``work`` writable by the sandboxed user (nobody, when the grader is root)."""
    if _running_as_root():
        for path in [work, *work.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def command(cmd: Sequence[str], *, isolation: str, work: Path, hide: Sequence[Path] = (),
            limits: Limits | None = None) -> list[str]:
    """``cmd`` wrapped for ``isolation`` (``"bwrap"``: the sandbox above; ``"none"``: limits only).

    ``work`` is the only writable folder and the working directory; ``hide`` are emptied.
    """
    limits = limits or Limits()
    prefix = _bwrap_args(Path(work), hide) if isolation == "bwrap" else []
    # jupyter_client tells the kernel its parent's pid, which a PID namespace cannot see (the
    # kernel would take itself for orphaned and quit); --die-with-parent does that job instead
    return [*prefix, *limits.args(), "env", "-u", "JPY_PARENT_PID", *cmd]


def minimal_env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a submission sees: none of the grader's own variables (tokens, paths)."""
    from .nbrun import REPO_ROOT

    keep = ("PATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "COURSE_OFFLINE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"HOME": str(work), "TMPDIR": str(work), "PYTHONPATH": str(REPO_ROOT),
                "MPLCONFIGDIR": str(work / ".matplotlib"), "IPYTHONDIR": str(work / ".ipython"),
                "JUPYTER_RUNTIME_DIR": str(work / ".jupyter"),
                "COURSE_CACHE": str(work / "cache"), "COURSE_FIGURES": str(work / "figures"),
                "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra or {})
    return env
