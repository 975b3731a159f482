"""The solution notebooks run in ``make test`` on a virtual GPU (:mod:`course_utils.device_guard`).

nbval starts one kernel per notebook, with this process's environment, when the notebook's first
cell is set up.  For a notebook under ``solutions/`` that environment holds
``COURSE_DEVICE=virtual-cuda``: the kernel's ``env.device`` is then ``cuda``, and any cell or
course function that mixes a GPU tensor with a CPU one fails with ``DeviceMismatchError``,
naming the operation and the line.  The student notebooks under ``notebooks/`` run on the plain
CPU, so both paths are exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_GUARDED = Path(__file__).resolve().parent / "solutions"
_BEFORE = os.environ.get("COURSE_DEVICE")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if Path(str(item.fspath)).resolve().parent == _GUARDED and str(item.fspath).endswith(".ipynb"):
        os.environ["COURSE_DEVICE"] = "virtual-cuda"
    elif _BEFORE is None:
        os.environ.pop("COURSE_DEVICE", None)
    else:
        os.environ["COURSE_DEVICE"] = _BEFORE
