"""Registry of the data and pretrained weights the course can download, on top of ``pooch``.

Every external file the course may use is an :class:`Entry` here: where it comes from (URLs
tried in order), its sha256, where it lands in the cache, and what the course uses instead when
it cannot be downloaded.  :func:`fetch` is the course's one download path; loaders call::

    got, source = fetch_or_fallback("sam_vit_b", fallback=lambda: BoxMaskSource())

``got`` is the file's path, or what ``fallback()`` returned; ``source`` says in one line which was
used (notebooks print it next to results: nothing pretends).  When falling back,
:func:`fetch_or_fallback` prints exactly one line; with ``COURSE_OFFLINE=1`` and nothing cached::

    [offline] could not download sam_vit_b (COURSE_OFFLINE=1 is set); using box masks from the SVT word rectangles instead.

The reason in parentheses is e.g. ``COURSE_OFFLINE=1 is set``, ``HTTP 404`` (any status),
``connection refused``, ``no network connection``, ``the server did not answer within 10 s``
(:data:`HTTP_TIMEOUT_S`), ``the connection closed after 1024 of 4096 bytes``, ``sha256 mismatch``,
or what an entry's ``verify`` hook found.  A cached copy that fails its checks is downloaded again,
said in one line.

Files go to ``<cache>/<kind>/<filename>`` (``kind``: ``weights`` or ``dataset``; the cache is
``$COURSE_CACHE``, see :mod:`course_utils.cache`).  ``COURSE_OFFLINE=1`` means never touch the
network (CI and the tests set it); cached files that pass their checks are still used.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pooch
import requests

from .cache import cache_root

__all__ = [
    "WHEN_UNAVAILABLE",
    "HTTP_TIMEOUT_S",
    "ChecksumError",
    "Entry",
    "OfflineError",
    "RegistryError",
    "cached_copy",
    "fetch",
    "fetch_or_fallback",
    "get_entry",
    "list_entries",
    "mobilenet_v2_state_dict",
    "offline_mode",
    "register",
    "report_fallback",
    "zip_contains",
]

#: A loader's choice when a file cannot be had (profile knob ``runtime.weights_when_unavailable``).
WHEN_UNAVAILABLE = ("fallback", "random")
T = TypeVar("T")

#: ``downloader(url, output_file, pooch)``: pooch's downloader protocol (tests copy local files)
Downloader = Callable[[str, str, Any], None]

#: seconds the HTTP downloader waits to connect and for each read: a server that hangs fails in
#: seconds, not after pooch's default 30 s per URL (a slow but live download never waits that long)
HTTP_TIMEOUT_S = 10.0

_HEX = frozenset("0123456789abcdef")


class RegistryError(RuntimeError):
    """A registered file could not be provided.  ``reason`` is a short, one-line cause."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class OfflineError(RegistryError):
    """The file is not cached and could not be downloaded (no network, or ``COURSE_OFFLINE=1``)."""


class ChecksumError(RegistryError):
    """A downloaded or cached file is truncated, corrupt, or not the file that was registered."""


@dataclass(frozen=True)
class Entry:
    """One downloadable file.

    Attributes:
        name: registry key, e.g. ``"sam_vit_b"``.
        urls: mirrors, tried in order.
        sha256: lowercase hex digest of the file, or ``None``; ``None`` requires ``sha256_note``
            saying why, and then ``sha256_prefix``, ``verify`` or ``size_bytes`` check what they can.
        filename: name of the file in the cache (``<cache>/<kind>/<filename>``).
        kind: ``"weights"`` or ``"dataset"``.
        description: what the file is and where the facts about it come from.
        fallback: what the course uses when the file cannot be had (printed in the fallback line).
        size_bytes: expected size, when known; a smaller file is reported as truncated.
        sha256_note: why ``sha256`` is ``None`` (required then).
        sha256_prefix: the first hex digits of the sha256 when only they are published (torchvision
            puts 8 in its file names); checked when ``sha256`` is ``None``.
        verify: called with the file's path after the hash passed; raises :class:`ChecksumError`
            when the file's structure is wrong (e.g. an archive lacks a member the loaders need).
    """

    name: str
    urls: tuple[str, ...] | list[str]
    sha256: str | None
    filename: str
    kind: Literal["weights", "dataset"]
    description: str
    fallback: str
    size_bytes: int | None = None
    sha256_note: str | None = None
    sha256_prefix: str | None = None
    verify: Callable[[Path], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__.
        object.__setattr__(self, "urls", tuple(self.urls))
        for attr, sizes, said in (("sha256", (64,), "64"), ("sha256_prefix", range(4, 64), "4 to 63")):
            value = (getattr(self, attr) or "").lower()
            if getattr(self, attr) is not None and (len(value) not in sizes or not set(value) <= _HEX):
                raise ValueError(f"entry {self.name!r}: {attr} must be {said} hex digits, got {getattr(self, attr)!r}")
            object.__setattr__(self, attr, value or None)
        problems = [
            self.kind not in ("weights", "dataset") and f"kind must be 'weights' or 'dataset', got {self.kind!r}",
            self.sha256 is None and not self.sha256_note and "sha256 is None, so sha256_note must say why",
            self.sha256 and not self.sha256.startswith(self.sha256_prefix or "")
            and f"sha256 does not start with sha256_prefix {self.sha256_prefix}",
            not self.urls and "needs at least one URL",
            ("/" in self.filename or "\\" in self.filename or not self.filename)
            and f"filename must be a bare file name, got {self.filename!r}",
        ]
        if any(problems):
            raise ValueError(f"entry {self.name!r}: " + "; ".join(p for p in problems if p))

    @property
    def known_hash(self) -> str | None:
        """The hash in pooch's ``"sha256:<hex>"`` form (``None`` = not checked by pooch)."""
        return f"sha256:{self.sha256}" if self.sha256 else None

    def cached_path(self) -> Path:
        """Where :func:`fetch` puts (or finds) the file."""
        return cache_root() / self.kind / self.filename


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry, *, overwrite: bool = False) -> Entry:
    """Add ``entry`` so that ``fetch(entry.name)`` works (tests replace an entry's URLs with
    ``dataclasses.replace`` and ``overwrite=True``); ValueError when the name is taken."""
    if entry.name in _REGISTRY and not overwrite and _REGISTRY[entry.name] != entry:
        raise ValueError(f"registry already has an entry named {entry.name!r}")
    _REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> Entry:
    """The entry called ``name``; a KeyError lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no registry entry {name!r}; known entries: {sorted(_REGISTRY)}") from None


def list_entries() -> list[Entry]:
    """All registered entries, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def offline_mode(probe_host: str | None = None, timeout: float = 3.0) -> bool:
    """The course's one decision whether to stay off the network.

    True when ``$COURSE_OFFLINE`` is set to something other than ``0``/``false``/``no``/empty;
    then no socket is opened at all.  Otherwise, given ``probe_host``, True when that host does
    not answer on port 443 within ``timeout`` seconds (for a library that downloads by itself and
    would otherwise retry for a minute before failing).
    """
    if os.environ.get("COURSE_OFFLINE", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    if probe_host is None:
        return False
    try:
        with socket.create_connection((probe_host, 443), timeout=timeout):
            return False
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# Checks of a file on disk
# --------------------------------------------------------------------------------------------


def _verify(entry: Entry, path: Path, *, full_hash: bool = True) -> None:
    """Size, sha256 (or its prefix), then the entry's own check: cheap and clear first, so an
    interrupted download reads "truncated".  ``full_hash=False``: pooch just compared the sha256."""
    if entry.size_bytes is not None and (size := path.stat().st_size) != entry.size_bytes:
        what = "truncated" if size < entry.size_bytes else "larger than expected"
        raise ChecksumError(f"{path} is {what}: {size} bytes instead of {entry.size_bytes}.",
                            reason=f"{what} file")
    expected = (entry.sha256 if full_hash else None) if entry.sha256 else entry.sha256_prefix
    if expected:
        digest = pooch.file_hash(str(path))
        if not digest.startswith(expected):
            raise ChecksumError(f"{path} has sha256 {digest[:16]}..., expected {expected[:16]}...",
                                reason="sha256 mismatch")
    if entry.verify is not None:
        entry.verify(path)


def _cache_problem(entry: Entry, path: Path) -> str | None:
    """``None`` when ``path`` is a good copy of ``entry``, else why not, in a few words."""
    if not path.is_file():
        return "not cached"
    try:
        _verify(entry, path)
    except ChecksumError as e:
        return e.reason
    return None


def cached_copy(name: str) -> Path | None:
    """The cached file of entry ``name`` when it passes its checks, else ``None``; never downloads."""
    entry = get_entry(name)
    return entry.cached_path() if _cache_problem(entry, entry.cached_path()) is None else None


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Silence pooch's INFO lines ("Downloading data from ...") so that a failed download
    prints exactly one line of ours; the download's progress bar still shows."""
    logger, level = pooch.get_logger(), pooch.get_logger().level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (requests and urllib3 nest the real cause in ``__cause__``,
    ``__context__``, ``args`` or ``.reason``, several levels deep)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 12:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                 if isinstance(x, BaseException)]
    return seen


def _short_reason(exc: BaseException) -> str:
    """A few words for the one-line fallback message, not a traceback."""
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    causes = _causes(exc)
    if any(isinstance(e, (TimeoutError, requests.exceptions.Timeout)) for e in causes):
        return f"the server did not answer within {HTTP_TIMEOUT_S:g} s"
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return "connection refused"
    for e in causes:
        if isinstance(e, http.client.IncompleteRead):  # urllib3 counts bytes, http.client keeps them
            got = e.partial if isinstance(e.partial, int) else len(e.partial)
            return f"the connection closed after {got} of {got + (e.expected or 0)} bytes"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off during the download"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "no network connection"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch(name: str, *, downloader: Downloader | None = None, progressbar: bool = True) -> Path:
    """Return the local path of registered file ``name``, downloading it if needed.

    The file is looked up in ``<cache>/<kind>/<filename>``; a cached copy that fails its checks
    (a truncated or corrupt earlier download) is deleted and downloaded again, said in one line.
    Each URL is tried in turn; the download is checked like a cached copy.

    Args:
        name: registry key.
        downloader: pooch downloader ``(url, output_file, pooch)``; default HTTP with a progress
            bar (``progressbar``) and :data:`HTTP_TIMEOUT_S`.
        progressbar: show a download progress bar (default downloader only).

    Raises:
        OfflineError: ``COURSE_OFFLINE=1`` and no good cached copy, or no URL could be
            downloaded (``.reason`` says why in a few words).
        ChecksumError: every URL gave a file that is not the registered one (hash, size or
            structure); the message names the file.
    """
    entry = get_entry(name)
    target = entry.cached_path()
    problem = _cache_problem(entry, target)
    if problem is None:
        return target
    if offline_mode():
        cached = problem == "not cached"
        raise OfflineError(
            f"COURSE_OFFLINE=1 and {'it is not cached' if cached else f'its cached copy is corrupt ({problem})'} "
            f"({target}); unset COURSE_OFFLINE to download {name}.",
            reason="COURSE_OFFLINE=1 is set" + ("" if cached else " and the cached copy is corrupt"))
    if problem != "not cached":
        print(f"[download] the cached {target.name} is corrupt ({problem}); downloading {name} again.")
        target.unlink()

    failures: list[tuple[str, BaseException]] = []
    for url in entry.urls:
        try:
            return _download(entry, url, target, downloader, progressbar)
        except (ValueError, ChecksumError) as e:  # pooch raises ValueError on a hash mismatch
            failures.append((url, e if isinstance(e, ChecksumError) else ChecksumError(str(e), "sha256 mismatch")))
        except Exception as e:  # network errors: requests, urllib, OSError, ...
            failures.append((url, e))
    raise _combine_failures(entry, target, failures)


def _download(
    entry: Entry, url: str, target: Path, downloader: Downloader | None, progressbar: bool
) -> Path:
    """One pooch.retrieve from ``url`` into ``target``'s folder, then the remaining checks (pooch
    moves the file into place only when its hash matches: no truncated file under the real name)."""
    if downloader is None and url.startswith(("http://", "https://")):
        # 1 MiB chunks: pooch's default of 1 kB writes and flushes 375 000 times for SAM ViT-B
        downloader = pooch.HTTPDownloader(progressbar=progressbar, timeout=HTTP_TIMEOUT_S,
                                          chunk_size=1 << 20)
    with _quiet_pooch():
        path = Path(pooch.retrieve(url, known_hash=entry.known_hash, fname=entry.filename,
                                   path=target.parent, downloader=downloader))
    try:
        _verify(entry, path, full_hash=False)
    except ChecksumError:
        # Without this the bad file would be "fetched" from the cache next time.
        path.unlink(missing_ok=True)
        raise
    return path


def _combine_failures(
    entry: Entry, target: Path, failures: list[tuple[str, BaseException]]
) -> RegistryError:
    """One error for all URLs: a checksum failure wins (it is the surprising one)."""
    details = "; ".join(f"{url}: {_short_reason(e) if not isinstance(e, RegistryError) else e}"
                        for url, e in failures)
    bad = [e for _, e in failures if isinstance(e, ChecksumError)]
    if bad:
        return ChecksumError(
            f"downloaded {target.name} for {entry.name!r} but it is not the registered file "
            f"({details}). It was deleted; rerun to try again, and if it keeps failing the "
            f"mirror has changed: update the entry's URL/sha256 in course_utils.registry.",
            reason=bad[0].reason,
        )
    return OfflineError(f"could not download {entry.name} to {target} ({details})",
                        reason=_short_reason(failures[0][1]))


def report_fallback(name: str, reason: str, fallback_text: str) -> None:
    """Print the course's one standard line about using a fallback instead of ``name``."""
    print(f"[offline] could not download {name} ({reason}); using {fallback_text} instead.")


def fetch_or_fallback(
    name: str,
    fallback: Callable[[], T],
    *,
    downloader: Downloader | None = None,
    fallback_text: str | None = None,
) -> tuple[Path | T, str]:
    """:func:`fetch` ``name``, or call ``fallback()`` when it cannot be had.

    Returns ``(path, source)``, or ``(fallback(), source)`` after printing exactly one line
    (:func:`report_fallback`, the text after "using" being ``fallback_text`` or the entry's
    ``fallback``); ``source`` says in one line what is really used.  Errors raised by
    ``fallback`` itself propagate.
    """
    entry = get_entry(name)
    text = fallback_text or entry.fallback
    try:
        path = fetch(name, downloader=downloader)
    except RegistryError as e:
        report_fallback(name, e.reason, text)
        return fallback(), f"{text} (fallback: {name} unavailable, {e.reason})"
    check = ("sha256 verified" if entry.sha256 else
             f"sha256 prefix {entry.sha256_prefix} verified; {entry.sha256_note}" if entry.sha256_prefix
             else f"not hash-checked: {entry.sha256_note}")
    return path, f"{name} from {path} ({check})"


# --------------------------------------------------------------------------------------------
# Verify hooks
# --------------------------------------------------------------------------------------------


def zip_contains(*members: str) -> Callable[[Path], None]:
    """A verify hook: the file is a zip archive holding each of ``members``.

    A member matches when an archive path ends with it (so ``svt1/train.xml`` also matches
    ``svt/svt1/train.xml`` in a re-packed archive).
    """

    def check(path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ChecksumError(
                f"{path} is not a readable zip archive ({e}); it is probably truncated.",
                reason="not a readable zip archive",
            ) from None
        missing = [m for m in members if not any(n == m or n.endswith("/" + m) for n in names)]
        if missing:
            raise ChecksumError(
                f"{path} lacks {missing} (it has {len(names)} members, e.g. {names[:3]}); "
                "it is not the expected archive.",
                reason=f"archive lacks {', '.join(missing)}",
            )

    check.__doc__ = f"zip archive containing {', '.join(members)}"
    return check


def mobilenet_v2_state_dict(path: Path) -> None:
    """A verify hook: ``path`` is a state dict with the keys and shapes of torchvision's
    ``mobilenet_v2()`` (what ``load_state_dict`` needs; BatchNorm's ``num_batches_tracked``
    counters are left out of the comparison because older checkpoints lack them)."""
    # torch and torchvision only when such a file is checked: the registry itself stays light
    import torch
    from torchvision.models import mobilenet_v2

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same failure
        raise ChecksumError(f"{path} is not a readable PyTorch file ({_short_reason(e)}).",
                            reason="not a readable PyTorch file") from None

    def shapes(sd: Any) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in (sd.items() if isinstance(sd, dict) else ())
                if not k.endswith("num_batches_tracked") and hasattr(v, "shape")}

    got, expected = shapes(state), shapes(mobilenet_v2(weights=None).state_dict())
    if got != expected:
        wrong = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ChecksumError(f"{path} is not a MobileNetV2 state dict ({len(wrong)} keys missing, "
                            f"extra or of another shape, e.g. {wrong[:3]}).",
                            reason="not a MobileNetV2 state dict")


# --------------------------------------------------------------------------------------------
# The course's entries.  Only facts found in public sources are recorded; see each description.
# --------------------------------------------------------------------------------------------

register(Entry(
    name="sam_vit_b",
    urls=["https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"],
    # Full sha256 and size as recorded independently by several public projects that pin this
    # exact URL.  Note: the "01ec64" in the file name is the start of the file's *MD5*
    # (01ec64d29a2fca3f0661936605ae66f8, also widely pinned), not of its sha256.
    sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    size_bytes=375_042_383,
    filename="sam_vit_b_01ec64.pth",
    kind="weights",
    description=(
        "Segment Anything (Kirillov et al. 2023) ViT-B checkpoint from the official "
        "facebookresearch/segment-anything release, a state dict; load with "
        "segment_anything.sam_model_registry['vit_b'](checkpoint=path). Used by notebook 08 "
        "(ODITS) to turn images into object masks."
    ),
    fallback="box masks from the SVT word rectangles",
))

register(Entry(
    name="svt",
    urls=[
        # The dataset's home page at UCSD (Wang, Babenko & Belongie, ICCV 2011) ...
        "http://vision.ucsd.edu/~kai/svt/svt.zip",
        # ... and the IAPR TC11 dataset mirror, as used by MMOCR's dataset zoo.
        "http://www.iapr-tc11.org/dataset/SVT/svt.zip",
    ],
    # sha256 as pinned for the UCSD URL by the docTR library's SVT dataset class.
    sha256="63b3d55e6b6d1e036e2a844a20c034fe3af3c32e4d914d6e0c4a3cd43df3bebf",
    filename="svt.zip",
    kind="dataset",
    description=(
        "The Street View Text dataset: svt1/img/*.jpg with word boxes and 50-word lexicons in "
        "svt1/train.xml and svt1/test.xml. Used by notebooks 06-08."
    ),
    fallback="SynthSVT, the course's synthetic street-sign words in the same XML format",
    verify=zip_contains("svt1/train.xml", "svt1/test.xml"),
))

register(Entry(
    name="mobilenet_v2_imagenet",
    # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1.url (torchvision/models/mobilenetv2.py)
    urls=["https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"],
    sha256=None,
    sha256_prefix="b0353104",
    sha256_note=("torchvision publishes only the first 8 hex digits of the sha256, in the file "
                 "name (what torch.hub's check_hash compares); keys and shapes are checked too"),
    filename="mobilenet_v2-b0353104.pth",
    kind="weights",
    description=(
        "torchvision's MobileNetV2 ImageNet-1K weights (IMAGENET1K_V1, acc@1 71.878 per "
        "torchvision), a state dict for torchvision.models.mobilenet_v2(weights=None). The RPN "
        "backbone of notebooks 02-03 in the full profile (seed 000 §4.2)."
    ),
    fallback="MobileNetV2 from random initialisation",
    verify=mobilenet_v2_state_dict,
))

register(Entry(
    name="clip_vit_b32_openai",
    # open_clip's pretrained config of ('ViT-B-32-quickgelu', 'openai'): OpenAI's URL, whose path
    # segment is the file's sha256 (open_clip and OpenAI's clip package check it the same way).
    urls=["https://openaipublic.azureedge.net/clip/models/"
          "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"],
    sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    filename="ViT-B-32.pt",
    kind="weights",
    description=(
        "OpenAI CLIP ViT-B/32 weights, OpenAI's TorchScript archive. They were trained with "
        "QuickGELU: load them with open_clip.create_model_and_transforms('ViT-B-32-quickgelu', "
        "pretrained=path, weights_only=False) (torch refuses a TorchScript archive with "
        "weights_only=True); plain 'ViT-B-32' would run them with GELU and lose accuracy. "
        "course_utils.clip.loading.load_clip('full') uses open_clip's own cache when it holds "
        "these weights and this file otherwise. Used by notebooks 06-08 in the full profile."
    ),
    fallback="the course's small CLIP",
))
