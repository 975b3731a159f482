"""Registry of the data and pretrained weights the course can download, on top of ``pooch``.

Every external file the course may use is an :class:`Entry` here: where it comes from (URLs
tried in order), its sha256, where it lands in the cache, and what the course uses instead when
it cannot be downloaded.  Notebooks call::

    path_or_model, source = fetch_or_fallback("sam_vit_b", fallback=load_course_sam)
    print(source)        # says which weights were really used: nothing pretends

Without a network this prints exactly one line, e.g.::

    [offline] could not download sam_vit_b (no network connection); using the course's small
    mask generator trained by scripts in this repository instead.

Environment variables:

* ``COURSE_CACHE``: cache folder (default ``~/.cache/anchors-to-clip``); files go to
  ``<cache>/<kind>/<filename>``, ``kind`` being ``weights`` or ``dataset``.
* ``COURSE_OFFLINE=1``: never touch the network (CI and the tests set it); cached files whose
  checksum matches are still used.

The open_clip CLIP weights are the exception: open_clip downloads and caches them itself, so their
entry only documents them, and :func:`open_clip_pretrained_available` tells, without any network
access, whether ``open_clip.create_model_and_transforms(model, pretrained=tag)`` would find them.
"""

from __future__ import annotations

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

from .cache import cache_root

__all__ = [
    "ChecksumError",
    "Entry",
    "OfflineError",
    "RegistryError",
    "fetch",
    "fetch_or_fallback",
    "get_entry",
    "list_entries",
    "offline_mode",
    "open_clip_pretrained_available",
    "register",
    "report_fallback",
    "zip_contains",
]

T = TypeVar("T")

#: ``downloader(url, output_file, pooch)``: pooch's downloader protocol.  Tests pass one that
#: copies a local file, so no test ever needs a network.
Downloader = Callable[[str, str, Any], None]

_SHA256_HEX = frozenset("0123456789abcdef")


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
        urls: mirrors, tried in order; empty only for entries that ``managed_by`` another library.
        sha256: lowercase hex digest of the file, or ``None``; ``None`` requires ``sha256_note``
            saying why, and then ``verify`` (or ``size_bytes``) should check what it can.
        filename: name of the file in the cache (``<cache>/<kind>/<filename>``).
        kind: ``"weights"`` or ``"dataset"``.
        description: what the file is and where the facts about it come from.
        fallback: what the course uses when the file cannot be had (printed in the offline line).
        size_bytes: expected size, when known; a smaller file is reported as truncated.
        sha256_note: why ``sha256`` is ``None`` (required then).
        verify: called with the downloaded path after the checksum passed; raises
            :class:`ChecksumError` when the file's structure is wrong (e.g. an archive lacks a
            member the loaders need).
        managed_by: the library that downloads this file itself (then :func:`fetch` refuses and
            says how to get it through that library).
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
    verify: Callable[[Path], None] | None = field(default=None, compare=False)
    managed_by: str | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise through object.__setattr__.
        object.__setattr__(self, "urls", tuple(self.urls))
        if self.kind not in ("weights", "dataset"):
            raise ValueError(f"entry {self.name!r}: kind must be 'weights' or 'dataset', got {self.kind!r}")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
                raise ValueError(f"entry {self.name!r}: sha256 must be 64 hex digits, got {self.sha256!r}")
            object.__setattr__(self, "sha256", digest)
        elif not self.sha256_note:
            raise ValueError(f"entry {self.name!r}: sha256 is None, so sha256_note must say why")
        if not self.urls and not self.managed_by:
            raise ValueError(f"entry {self.name!r}: needs at least one URL (or managed_by)")
        if "/" in self.filename or "\\" in self.filename or not self.filename:
            raise ValueError(f"entry {self.name!r}: filename must be a bare file name, got {self.filename!r}")

    @property
    def known_hash(self) -> str | None:
        """The hash in pooch's ``"sha256:<hex>"`` form (``None`` = not checked by pooch)."""
        return f"sha256:{self.sha256}" if self.sha256 else None

    def cached_path(self) -> Path:
        """Where :func:`fetch` puts (or finds) the file."""
        return cache_root() / self.kind / self.filename


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry, *, overwrite: bool = False) -> Entry:
    """Add ``entry`` so that ``fetch(entry.name)`` works; other modules register their files.

    Raises:
        ValueError: an entry with that name exists (pass ``overwrite=True`` to replace it).
    """
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


# --------------------------------------------------------------------------------------------
# Cache and environment
# --------------------------------------------------------------------------------------------


def offline_mode(probe_host: str | None = None, timeout: float = 3.0) -> bool:
    """The course's one decision whether to stay off the network.

    True when ``$COURSE_OFFLINE`` is set to something other than ``0``/``false``/``no``/empty;
    then no socket is opened at all.  Otherwise, given ``probe_host``, True when that host does
    not answer on port 443 within ``timeout`` seconds: a library that downloads by itself
    (open_clip through the Hugging Face hub) would otherwise retry for a minute before failing.
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
# Fetching
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Silence pooch's INFO lines ("Downloading data from ...") so that a failed download
    prints exactly one line of ours; the download's progress bar still shows."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _short_reason(exc: BaseException) -> str:
    """A few words for the one-line offline message, not a traceback."""
    try:
        import requests

        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            return f"HTTP {exc.response.status_code}"
        if isinstance(exc, requests.exceptions.Timeout):
            return "the server did not answer in time"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return "no network connection"
    except ImportError:  # pragma: no cover - requests comes with pooch's HTTP downloader
        pass
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_size(entry: Entry, path: Path) -> None:
    """Raise ChecksumError when the file is smaller/larger than registered (cheap, and gives a
    clearer message than a hash mismatch for the common case of an interrupted download)."""
    if entry.size_bytes is None:
        return
    size = path.stat().st_size
    if size != entry.size_bytes:
        what = "truncated" if size < entry.size_bytes else "larger than expected"
        raise ChecksumError(
            f"{path} is {what}: {size} bytes instead of {entry.size_bytes}. Delete it and rerun.",
            reason=f"{what} file",
        )


def _verify(entry: Entry, path: Path) -> None:
    """Size check plus the entry's own structural check."""
    _check_size(entry, path)
    if entry.verify is not None:
        entry.verify(path)


def _cached_copy_ok(entry: Entry, path: Path) -> bool:
    """Whether an existing cached file can be used without downloading."""
    if not path.is_file():
        return False
    try:
        _verify(entry, path)
    except ChecksumError:
        return False
    return pooch.file_hash(str(path)) == entry.sha256 if entry.sha256 else True


def fetch(name: str, *, downloader: Downloader | None = None, progressbar: bool = True) -> Path:
    """Return the local path of registered file ``name``, downloading it if needed.

    The file is looked up in ``<cache>/<kind>/<filename>``; a cached copy whose sha256 does not
    match (a truncated or corrupt earlier download) is downloaded again.  Each URL is tried in
    turn; after the checksum, the entry's ``verify`` hook checks the file's structure.

    Args:
        name: registry key.
        downloader: pooch downloader ``(url, output_file, pooch)``; default HTTP with a progress
            bar.  Tests pass one that copies a local file.
        progressbar: show a download progress bar (default downloader only).

    Raises:
        OfflineError: ``COURSE_OFFLINE=1`` and no valid cached copy, or every URL failed to
            download (``.reason`` says why in a few words).
        ChecksumError: a file was downloaded but is not the registered one (hash, size or
            structure), from every URL; the message names the file.
    """
    entry = get_entry(name)
    if entry.managed_by:
        raise RegistryError(
            f"{name} is downloaded by {entry.managed_by} itself, not by course_utils: "
            f"{entry.description}",
            reason=f"managed by {entry.managed_by}",
        )
    target = entry.cached_path()
    if offline_mode():
        if _cached_copy_ok(entry, target):
            return target
        state = "its cached copy is corrupt" if target.exists() else "it is not cached"
        raise OfflineError(
            f"COURSE_OFFLINE=1 and {state} ({target}); unset COURSE_OFFLINE to download {name}.",
            reason="COURSE_OFFLINE=1 is set",
        )

    failures: list[tuple[str, BaseException]] = []
    for url in entry.urls:
        try:
            path = _download(entry, url, target, downloader, progressbar)
        except (ValueError, ChecksumError) as e:  # pooch raises ValueError on a hash mismatch
            failures.append((url, e if isinstance(e, ChecksumError) else ChecksumError(str(e), "sha256 mismatch")))
        except Exception as e:  # network errors: requests, urllib, OSError, ...
            failures.append((url, e))
        else:
            return path
    raise _combine_failures(entry, target, failures)


def _download(
    entry: Entry, url: str, target: Path, downloader: Downloader | None, progressbar: bool
) -> Path:
    """One pooch.retrieve from ``url`` into ``target``'s folder, then the structural checks.

    pooch downloads to a temporary file and moves it into place only when the hash matches, so
    an interrupted download never leaves a truncated file under the real name.
    """
    if downloader is None and url.startswith(("http://", "https://")):
        downloader = pooch.HTTPDownloader(progressbar=progressbar)
    with _quiet_pooch():
        path = Path(pooch.retrieve(url, known_hash=entry.known_hash, fname=entry.filename,
                                   path=target.parent, downloader=downloader))
    try:
        _verify(entry, path)
    except ChecksumError:
        # Without this the bad file would be "fetched" from the cache next time when no sha256
        # is registered; with one, pooch would re-download it anyway.
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
    first = failures[0][1] if failures else RuntimeError("no URL registered")
    return OfflineError(f"could not download {entry.name} to {target} ({details})",
                        reason=_short_reason(first))


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

    Returns:
        ``(path, source)`` on success, ``(fallback(), source)`` otherwise, where ``source`` is a
        one-line description of what is really used (notebooks print it next to results).

    When falling back, exactly one line is printed (see :func:`report_fallback`); the text after
    "using" is ``fallback_text`` or the entry's ``fallback``.  Errors raised by ``fallback``
    itself propagate.
    """
    entry = get_entry(name)
    text = fallback_text or entry.fallback
    try:
        path = fetch(name, downloader=downloader)
    except RegistryError as e:
        report_fallback(name, e.reason, text)
        return fallback(), f"{text} (fallback: {name} unavailable, {e.reason})"
    check = "sha256 verified" if entry.sha256 else f"not hash-checked: {entry.sha256_note}"
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
                f"{path} is not a readable zip archive ({e}); it is probably truncated. "
                "Delete it and rerun.",
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


# --------------------------------------------------------------------------------------------
# open_clip's own cache
# --------------------------------------------------------------------------------------------


def open_clip_pretrained_available(
    model: str = "ViT-B-32", tag: str = "openai", cache_dir: str | Path | None = None
) -> bool:
    """Whether open_clip can load ``pretrained=tag`` for ``model`` from its cache, offline.

    Mirrors the choice ``open_clip.pretrained.download_pretrained`` makes: the Hugging Face hub
    copy when the config has one and ``huggingface_hub`` is installed (checked with
    ``huggingface_hub.try_to_load_from_cache``, which never touches the network), else the file
    of the config's URL in ``cache_dir`` or ``~/.cache/clip``.  Pass the same ``cache_dir`` you
    pass to ``open_clip.create_model_and_transforms``.  Never downloads anything.
    """
    try:
        from open_clip.pretrained import get_pretrained_cfg
    except ImportError:
        return False
    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        return False
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub and _has_hf_hub():
        return _hf_cached(hf_hub, cache_dir)
    url = cfg.get("url", "")
    if url:
        root = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        return (root / os.path.basename(url)).is_file()
    return False


def _has_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_cached(hf_hub: str, cache_dir: str | Path | None) -> bool:
    """open_clip's ``hf_hub`` is ``"org/repo/filename"`` or ``"org/repo/"`` (default filename);
    it prefers a ``.safetensors`` twin of the weights when one exists."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if hf_hub.endswith("/"):
        repo_id, filename = hf_hub.rstrip("/"), HF_WEIGHTS_NAME
    else:
        repo_id, filename = os.path.split(hf_hub)
    candidates = [filename]
    if filename == HF_WEIGHTS_NAME:
        candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    for fname in candidates:
        found = try_to_load_from_cache(repo_id, fname, cache_dir=str(cache_dir) if cache_dir else None)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


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
        "facebookresearch/segment-anything release; load with "
        "segment_anything.sam_model_registry['vit_b'](checkpoint=path). Used by notebook 08 "
        "(ODITS) to turn images into object masks."
    ),
    fallback="the course's small mask generator shipped in data/ (see notebook 08)",
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
    name="clip_vit_b32_openai",
    # open_clip's own pretrained config; the OpenAI URL's path segment is the file's sha256,
    # which open_clip checks itself when it downloads from that URL.
    urls=["https://openaipublic.azureedge.net/clip/models/"
          "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"],
    sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    filename="ViT-B-32.pt",
    kind="weights",
    description=(
        "OpenAI CLIP ViT-B/32 weights. open_clip downloads and caches them itself (from the "
        "Hugging Face hub copy timm/vit_base_patch32_clip_224.openai when huggingface_hub is "
        "installed, else from this URL into ~/.cache/clip): use "
        "open_clip.create_model_and_transforms('ViT-B-32', pretrained='openai') and check "
        "registry.open_clip_pretrained_available('ViT-B-32', 'openai') first when offline."
    ),
    fallback="the course's small CLIP trained on synthetic scenes, shipped in data/",
    managed_by="open_clip",
))
