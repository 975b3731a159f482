"""The SVT splits a word-spotting notebook (06-08) works on: real SVT when it can be had, else SynthSVT.

:func:`load_svt_data` is the one place that decides: the real archive when it is in the course
cache (or, with ``allow_download``, when :func:`course_utils.registry.fetch` can download it),
else SynthSVT (:mod:`course_utils.synthsvt`, same XML schema) generated once into a
:func:`course_utils.cache.run_dir` named by its settings.  Either way one line says which.
"""

from __future__ import annotations

import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .. import registry
from ..cache import run_dir
from ..svt import SVTSplit, load_svt
from ..synthsvt import make_synthsvt_for_profile

__all__ = ["SYNTHSVT_KNOBS", "SVTData", "load_svt_data"]

#: the ``svt`` settings SynthSVT is generated from (its folder is named by them)
SYNTHSVT_KNOBS = ("n_train", "n_test", "image_size", "seed", "lexicon_size", "max_words")


@dataclass
class SVTData:
    """Both splits and a line saying where they came from.

    Attributes:
        train, test: the splits (cut to the profile's ``n_train`` / ``n_test`` images).
        root: the folder with ``train.xml``, ``test.xml`` and ``img/``.
        real: True for the real SVT, False for SynthSVT.
        source: one human-readable line (printed by :func:`load_svt_data`).
    """

    train: SVTSplit
    test: SVTSplit
    root: Path
    real: bool
    source: str


def _extract_svt(zip_path: Path) -> Path:
    """Unpack the real SVT archive next to itself; return the folder holding ``train.xml``.

    The marker file records which archive (name, size, modification time) was unpacked, so a
    re-downloaded archive is unpacked afresh instead of reusing an older extraction.

    Raises:
        registry.ChecksumError: the archive cannot be unpacked (truncated, or a member's data
            is corrupt: its CRC is checked while unpacking); the message names the archive.
    """
    out = zip_path.parent / "svt"
    marker = out / ".extracted"
    stat = zip_path.stat()
    stamp = f"{zip_path.name} {stat.st_size} {stat.st_mtime_ns}"
    if not marker.is_file() or marker.read_text() != stamp:
        shutil.rmtree(out, ignore_errors=True)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(out)
        except (zipfile.BadZipFile, EOFError, zlib.error) as err:
            shutil.rmtree(out, ignore_errors=True)  # half an extraction must never be read
            raise registry.ChecksumError(
                f"{zip_path}: the SVT archive cannot be unpacked ({type(err).__name__}: {err}); it is "
                "probably truncated or corrupt. Delete it so that it is downloaded again.",
                reason=f"the archive {zip_path} cannot be unpacked ({type(err).__name__}: {err})",
            ) from None
        marker.write_text(stamp)
    hits = sorted(out.rglob("train.xml"))
    if not hits:
        raise FileNotFoundError(f"{zip_path}: no train.xml inside the archive (expected svt1/train.xml)")
    return hits[0].parent


def load_svt_data(svt_cfg: dict, *, allow_download: bool = False, verbose: bool = True) -> SVTData:
    """The SVT splits a notebook works on: real SVT if available, SynthSVT otherwise.

    Args:
        svt_cfg: the profile's ``svt`` section (``n_train``, ``n_test``, ``image_size``, ``seed``,
            ``lexicon_size``, ``max_words``).
        allow_download: try to download the real archive (``full`` on Colab); otherwise only a
            copy already in the course cache that passes the entry's checks is used, so an
            offline machine never waits.
        verbose: print the source line and each split's counts.

    Returns:
        an :class:`SVTData`; the first ``n_train`` / ``n_test`` images of each split are kept.
        An archive that passes the registry's checks but cannot be unpacked falls back to
        SynthSVT too, the reason printed.
    """
    zip_path: Path | None = None
    reason = ""
    if allow_download:
        try:
            zip_path = registry.fetch("svt")
        except registry.RegistryError as err:
            reason = err.reason
    else:
        # only a copy that passes the entry's checks: a truncated archive must not be unpacked
        zip_path = registry.cached_copy("svt")
        cached = registry.get_entry("svt").cached_path()
        reason = "" if zip_path else (f"the cached copy at {cached} is corrupt" if cached.is_file()
                                      else f"not in the cache at {cached}")
    if zip_path is not None:
        try:
            root, real = _extract_svt(zip_path), True
            source = f"data: real SVT from {zip_path}"
        except registry.ChecksumError as err:
            zip_path, reason = None, err.reason
            print(f"[svt] {err} Using SynthSVT instead.")
    if zip_path is None:
        root = run_dir("synthsvt", {k: svt_cfg[k] for k in SYNTHSVT_KNOBS})
        make_synthsvt_for_profile(root, svt_cfg)
        real = False
        source = (f"data: SynthSVT (real SVT unavailable: {reason}), {svt_cfg['n_train']} train / "
                  f"{svt_cfg['n_test']} test synthetic street images, seed {svt_cfg['seed']}, in {root}")
    train, test = load_svt(root, "train"), load_svt(root, "test")
    train.images = train.images[: svt_cfg["n_train"]]
    test.images = test.images[: svt_cfg["n_test"]]
    if verbose:
        print(source)
        train.summary()
        test.summary()
    return SVTData(train, test, root, real, source)
