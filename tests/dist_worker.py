"""One rank of a multi-process test run (started by tests/test_distributed.py, one process per rank).

``python tests/dist_worker.py SCENARIO OUT_DIR [EPOCHS]`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, as ``torchrun`` sets them (no variables: one plain
process).  Writes ``OUT_DIR/rank<r>.json``: what the rank saw (the error it raised, the files it
opened for writing, the history), and rank 0 (or the single process) leaves its checkpoints in
``OUT_DIR/ckpt``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

from course_utils import distributed
from course_utils.profiles import Section, get_config


def _detector(out: Path, epochs: int, fail_rank: int | None = None, kill_at_step: int | None = None):
    from course_utils.detector import detector_step
    from course_utils.recipes import detection
    from course_utils.shapes import build_shapes

    cfg = get_config("smoke")
    cfg["detector"] = Section({**cfg.detector, "epochs": epochs, "batch_size": 8})
    splits = build_shapes(cfg.shapes, seed=0, cache=False)
    if fail_rank is not None:  # a rank whose step raises at its second step
        calls = {"n": 0}

        def failing_step(model, batch):
            calls["n"] += 1
            if distributed.rank() == fail_rank and calls["n"] == 2:
                raise RuntimeError(f"rank {fail_rank}: simulated failure in step_fn")
            return detector_step(model, batch)

        detection.detector_step = failing_step  # the recipe's step, for this run only
    if kill_at_step is not None:  # every rank killed at the same step, as a preempted job is
        seen = {"n": 0}

        def killed_step(model, batch):
            seen["n"] += 1
            if seen["n"] == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return detector_step(model, batch)

        detection.detector_step = killed_step
    model, hist = detection.train_detector(cfg, splits, ckpt_dir=out / "ckpt", device="cpu",
                                           progress=False, seed=0)
    return hist


def _clip(out: Path, epochs: int):
    from course_utils.clip.data import load_svt_data
    from course_utils.clip.finetune import finetune, pair_dataset
    from course_utils.clip.loading import load_clip

    cfg = get_config("smoke")
    svt_cfg = Section({**cfg.svt, "ft_epochs": epochs, "ft_batch_size": 8, "ft_checkpoints": tuple(range(1, epochs + 1))})
    data = load_svt_data(svt_cfg, verbose=False)
    bundle = load_clip("small", device="cpu", verbose=False)
    train_set = pair_dataset(data.train, bundle, pads=svt_cfg["ft_crop_pads"])
    return finetune(bundle.model, train_set, svt_cfg, out / "ckpt", seed=0, progress=False)


def _tiny(out: Path, epochs: int):
    """A linear model on one example per rank too few: the launch must be refused."""
    from course_utils.train import fit

    model = torch.nn.Linear(2, 1)
    data = torch.utils.data.TensorDataset(torch.ones(1, 2), torch.ones(1, 1))
    return fit(model, lambda m, b: {"loss": ((m(b[0]) - b[1]) ** 2).mean()}, data, epochs=epochs,
               batch_size=2, optimizer=torch.optim.SGD(model.parameters(), 0.1), progress=False)


SCENARIOS = {"detector": _detector, "clip": _clip, "tiny": _tiny,
             "detector_fail": lambda out, e: _detector(out, e, fail_rank=1),
             # smoke: 32 training scenes, global batch 8, so step 6 is the second of epoch 2
             "detector_killed": lambda out, e: _detector(out, e, kill_at_step=6)}


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(1)
    written: list[str] = []

    def audit(event, args):  # every file this process opens for writing
        if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            written.append(str(args[0]))

    sys.addaudithook(audit)
    report: dict = {"rank": int(os.environ.get("RANK", 0)), "error": None}
    code = 0
    try:
        distributed.init_from_env("cpu")
        hist = SCENARIOS[scenario](out, epochs)
        report["history"] = hist.numbers()
    except Exception as e:  # noqa: BLE001 - reported to the test
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        code = 1
    finally:
        report["written"] = [w for w in written if str(out) in w]
        (out / f"rank{report['rank']}.json").write_text(json.dumps(report))
        distributed.shutdown(wait_for_peers=True) if code == 0 else None
    return code


if __name__ == "__main__":
    sys.exit(main())
