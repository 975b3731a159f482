"""The ``fullpath`` profile is ``full`` with small counts, and its estimates are computed right."""

from __future__ import annotations

import json
import math

import nbformat
import pytest
import torch

from course_tools import footprint, fullpath
from course_utils.profiles import get_config

#: The knobs fullpath may change: counts, epochs, batch sizes, what runs without weights.
SIZES = {"n_train", "n_val", "n_test", "epochs", "batch_size", "backbone_epochs", "warmup_epochs",
         "eval_shard", "loop_images", "loop_captions", "qa_epochs", "speed_gallery_sizes", "mm_epochs",
         "mm_batch_size", "n_random_cases", "eval_batch_size", "ft_epochs", "ft_batch_size",
         "ft_checkpoints", "weights_when_unavailable"}


def test_fullpath_is_full_but_for_sizes() -> None:
    full, fp = get_config("full"), get_config("fullpath")
    differ = {k for s in full if s != "name" for k in full[s] if full[s][k] != fp[s][k]}
    assert differ <= SIZES, differ - SIZES
    # the architectures the issue names stay
    assert fp.rpn.backbone == "mobilenet_v2" and fp.shapes.image_size == 512
    assert fp.svt.clip_kind == "full" and fp.odits.mask_source == "sam" and fp.svt.download_svt
    assert (fp.retrieval.k_fine, fp.retrieval.embed_dim) == (36, 1024)
    assert fp.runtime.weights_when_unavailable == "random" and full.runtime.weights_when_unavailable == "fallback"


def test_step_cost_counts_a_linear_layer() -> None:
    lin = torch.nn.Linear(8, 4)
    flops, saved = footprint.step_cost(lin, lambda: lin(torch.ones(5, 8)).sum(), train=True)
    assert flops == 3 * 2 * 5 * 8 * 4  # forward 2·b·in·out, training = three forwards
    assert saved > 0
    flops, saved = footprint.step_cost(lin, lambda: lin(torch.ones(5, 8)), train=False)
    assert flops == 2 * 5 * 8 * 4 and saved == 0


def test_quadratic_probe_is_exact_on_a_quadratic() -> None:
    def cost(b: int) -> tuple[float, float]:
        return 3.0 * b + 0.5 * b * b, 7.0 * b

    flops, saved = footprint.quadratic_probe(cost, 4, 8, 128)
    assert math.isclose(flops, 3 * 128 + 0.5 * 128 ** 2) and math.isclose(saved, 7 * 128)


def test_phase_time_and_limits() -> None:
    p = footprint.Phase("x", steps=10, flops_per_step=footprint.T4_FP32_FLOPS * footprint.T4_UTILISATION,
                        host_s=5.0)
    assert p.seconds == pytest.approx(15.0)
    s = footprint.Estimate("01", [p], disk_bytes=2e9).summary()
    assert s["t4_minutes"] == 0.25 and s["disk_gb"] == 2.0 and "estimated" in s["basis"]
    assert set(footprint.LIMITS) == {"t4_minutes", "gpu_gib", "host_gb", "disk_gb"}


def test_headers_take_their_numbers_from_the_results(tmp_path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(
        "# 02\n\n| profile | images | run time |\n|---|---|---|\n| `cpu` | 128 px | 72 s |\n| `full` | 512 px | typed |"))
    nbformat.write(nb, tmp_path / "02_x.ipynb")
    row = {"seconds": 51.2, "full_estimate": {"t4_minutes": 5.25, "gpu_gib": 13.72, "host_gb": 1.0, "disk_gb": 0.24}}
    changed = fullpath.write_headers({"metrics": {"notebooks": {"02_x": row}}}, tmp_path)
    text = nbformat.read(tmp_path / "02_x.ipynb", as_version=4).cells[0].source
    assert changed == ["02_x.ipynb"]
    assert "| `full` | 512 px | **estimated** for a Colab T4 (no GPU measured): ≈ 5 min, 13.7 GiB GPU, " \
           "0.2 GB disk; its code path runs on 2 CPU cores in `fullpath` in 51 s" in text
    assert "| `cpu` | 128 px | 72 s |" in text  # other rows untouched
    assert json.loads(json.dumps(row))  # the row is plain JSON


def test_a_notebook_stopped_for_time_names_its_cell_and_where_it_hung(tmp_path) -> None:
    from course_tools.nbrun import run_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("import time\n\ndef stuck_here():\n    time.sleep(120)\n\nstuck_here()")]
    path = tmp_path / "hangs.ipynb"
    nbformat.write(nb, path)
    res = run_notebook(path, timeout_cell=None, timeout_total=10, dump_stacks=True)
    assert not res.ok and res.timed_out
    assert res.error.startswith("notebook ran longer than 10 s and was stopped in cell 1 ")
    assert "stuck_here" in res.stacks and "Thread" in res.stacks
    quiet = run_notebook(path, timeout_cell=None, timeout_total=10)  # the default dumps nothing
    assert not quiet.ok and quiet.stacks == ""
