"""python -m course_utils.cli: every recipe trains one smoke epoch from the command line, with one
process and with two under torchrun, and the notebook's own call then finds and loads the run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils import cli
from course_utils.cache import run_dir
from course_utils.profiles import Section, get_config

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(recipe: str, cache: Path, nproc: int = 2, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COURSE_CACHE": str(cache), "COURSE_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "COURSE_DIST_TIMEOUT": "120", "PYTHONFAULTHANDLER": "1"}  # an abort shows its Python stacks
    env.pop("COURSE_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "course_utils.cli", recipe, "--profile", "smoke", *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


def _in_process(recipe: str, capsys, *extra: str) -> str:
    assert cli.main([recipe, "--profile", "smoke", *extra]) == 0
    return capsys.readouterr().out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    return tmp_path / "cache"


def test_help_lists_every_recipe_with_its_knobs(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, recipe in cli.RECIPES.items():
        assert re.search(rf"^  {re.escape(name)}\s+notebook {recipe.notebook}:", out, re.M), name
        for knob in recipe.knobs:
            assert knob in out, knob
    cpu, full = get_config("cpu").detector.epochs, get_config("full").detector.epochs
    assert f"detector.epochs (cpu {cpu}, full {full})" in " ".join(out.split())
    assert "torchrun" in out


def test_each_recipe_names_the_checkpoint_folder_its_notebook_uses():
    """The stage of every run_dir the command line writes is the one its notebook reads."""
    src = (ROOT / "course_utils" / "cli.py").read_text()
    for notebook, stage in (("03", '"03_detector_'), ("04", '"04_scan_grid"'), ("05", '"05_query_agnostic"'),
                            ("07", '"07_clip_svt_'), ("08", '"08_odits"')):
        nb = next((ROOT / "solutions").glob(f"{notebook}_*.ipynb")).read_text()
        assert stage.replace('"', '\\"') in nb, f"notebook {notebook} does not use {stage}"
        assert stage in src, f"cli.py does not write {stage}"


def test_unknown_variant_is_refused_before_anything_runs(cache, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["scan", "--profile", "smoke", "--variant", "t-i MAX"])
    assert exit_.value.code == 2
    assert "--variant ['t-i MAX']: only for scan, one of ['t-i LSE'" in capsys.readouterr().err
    assert not cache.exists()


def test_detector_one_then_two_processes_and_the_notebook_loads_it(cache, capsys):
    from course_utils.recipes import detection
    from course_utils.shapes import build_shapes

    out = _in_process("detector", capsys)
    assert "[detector] epoch 1/1" in out
    two = _torchrun("detector", cache)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("[detector] epoch 1/1") == 1  # rank 0 alone prints
    assert "2 process(es)" in two.stdout
    cfg = get_config("smoke")
    ckpt = run_dir(f"03_detector_{cfg.name}", detection.detector_knobs(cfg, 0))
    detection.train_detector(cfg, build_shapes(cfg.shapes, seed=0), ckpt_dir=ckpt, device="cpu", progress=False)
    assert "[detector] already done: loaded" in capsys.readouterr().out


def test_clip_finetune_one_then_two_processes_and_the_notebook_loads_it(cache, capsys):
    from course_utils.clip.data import load_svt_data
    from course_utils.clip.finetune import finetune, pair_dataset
    from course_utils.clip.loading import load_clip
    from course_utils.recipes.clip_finetune import best_checkpoint_path, finetune_knobs

    out = _in_process("clip-finetune", capsys)
    assert "[fine-tune CLIP] epoch 1/1" in out and "best checkpoint by precision: +1" in out
    best = best_checkpoint_path("smoke")
    assert best.is_file()  # notebook 08 and the odits recipe start from it
    best.unlink()
    two = _torchrun("clip-finetune", cache)
    assert two.returncode == 0, two.stdout + two.stderr
    assert best.is_file()
    S = get_config("smoke").svt
    data = load_svt_data(S, verbose=False)
    bundle = load_clip(S.clip_kind, device="cpu", verbose=False)
    ckpt = run_dir("07_clip_svt_smoke", finetune_knobs(bundle, S, data.train))
    finetune(bundle.model, pair_dataset(data.train, bundle, pads=S.ft_crop_pads), S, ckpt, progress=False)
    assert "[fine-tune CLIP] already done: loaded" in capsys.readouterr().out


def test_scan_and_query_agnostic_one_then_two_processes_and_the_notebooks_load_them(cache, capsys):
    from course_utils.recipes import retrieval
    from course_utils.recipes.retrieval_data import load_retrieval_inputs

    assert "t2i R@1" in _in_process("scan", capsys, "--level", "fine", "--variant", "i-t AVG")
    assert "query-agnostic (fine)" in _in_process("query-agnostic", capsys, "--level", "fine")
    for recipe, extra in (("scan", ("--level", "fine", "--variant", "i-t AVG")), ("query-agnostic", ("--level", "fine"))):
        two = _torchrun(recipe, cache, 2, *extra)
        assert two.returncode == 0, two.stdout + two.stderr
    R = get_config("smoke").retrieval
    data, source = load_retrieval_inputs(R, seed=0, progress=False)
    root = run_dir("04_scan_grid", retrieval.scan_grid_knobs(R, 0, source.knobs))
    retrieval.run_variant(data, "fine", "i-t AVG", R, seed=0, ckpt_root=root, progress=False)
    qa_root = run_dir("05_query_agnostic", retrieval.query_agnostic_knobs(R, 0, source.knobs))
    retrieval.run_query_agnostic(data, R, text_level="fine", seed=0, ckpt_dir=qa_root, progress=False)
    out = capsys.readouterr().out
    assert "[fine i-t AVG] already done: loaded" in out and "[query-agnostic] already done: loaded" in out


def test_odits_one_then_two_processes_and_the_notebook_loads_it(cache, capsys):
    from course_utils.clip.data import load_svt_data
    from course_utils.recipes.odits import (
        load_start_clip,
        odits_knobs,
        profile_mask_source,
        split_features,
        train_odits,
    )
    from course_utils.svt import word_spotting_vocabulary

    out = _in_process("odits", capsys)
    assert "[ODITS] epoch 2/2" in out and "[ODITS without objects] epoch 2/2" in out
    assert "[ODITS, seed's weighted loss] epoch 2/2" in out
    assert "notebook 07's checkpoint is missing" in out  # no clip-finetune run in this cache
    two = _torchrun("odits", cache)
    assert two.returncode == 0, two.stdout + two.stderr
    cfg = get_config("smoke")
    S, OC = cfg.svt, Section({**cfg.odits, "seed": 0})
    data = load_svt_data(S, verbose=False)
    words = word_spotting_vocabulary([data.train, data.test])
    bundle = load_start_clip(S.clip_kind, "smoke")
    source, _ = profile_mask_source(OC)
    feats = split_features(bundle, {"train": data.train}, source, words, OC)["train"]
    train_odits(bundle.model, feats, words, bundle.encode_texts(words), OC,
                ckpt_dir=run_dir("08_odits", odits_knobs(bundle.model, feats, words, OC, True)))
    assert "[ODITS] already done: loaded" in capsys.readouterr().out


def test_a_failing_recipe_says_which_rank_and_why(cache):
    bad = _torchrun("detector", cache, 2, "--device", "cuda:7")
    assert bad.returncode != 0
    assert re.search(r"\[rank [01]\] detector failed: ", bad.stderr), bad.stderr[-2000:]


def test_tracker_log_of_a_command_line_run_opens_in_tensorboards_reader(cache, tmp_path, capsys):
    from course_utils.tracking import read_log

    _in_process("detector", capsys, "--track", str(tmp_path / "tb"))
    log = read_log(tmp_path / "tb" / "detector")
    assert len(log["text"]["run/init_weights_sha256"].strip()) == 64
    assert json.loads(log["text"]["run/info"])["batch_size"] == get_config("smoke").detector.batch_size
    assert [s for s, _ in log["scalars"]["train/loss"]] == [1]
    assert log["scalars"]["resources/rss_gb"]
