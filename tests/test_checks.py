"""Exercise checks: pass the reference, catch wrong answers, fall back, hide hidden values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from course_utils import boxes, checks, detector, matchmap, query_agnostic, rpn, scan
from course_utils.checks import nb01, nb02, nb03, nb04, nb05


def own(fn):
    """The reference wrapped in a function of this module, as a student's correct answer."""
    def student(*args, **kwargs):
        return fn(*args, **kwargs)
    return student


def test_correct_answers_pass_every_check(capsys):
    iou, grid, label, sample = own(boxes.box_iou), own(boxes.anchor_grid), own(boxes.label_anchors), own(boxes.sample_anchors)
    enc, dec = own(boxes.encode_boxes), own(boxes.decode_boxes)
    assert nb01.check_box_iou(iou) is iou
    assert nb01.check_anchor_grid(grid) is grid
    assert nb01.check_label_anchors(label) is label
    assert nb01.check_sample_anchors(sample) is sample
    assert nb01.check_box_coding(enc, dec) == (enc, dec)
    out = capsys.readouterr().out
    assert out.count("cases passed") == 5
    assert [checks.RESULTS[e].passed for e in nb01.EXERCISES] == [True] * 5


def test_handing_in_the_reference_earns_nothing(capsys):
    assert nb01.check_box_iou(boxes.box_iou) is boxes.box_iou
    assert not checks.RESULTS["1.1 box_iou"].passed
    assert nb01.check_box_coding(own(boxes.encode_boxes), boxes.decode_boxes) == (boxes.encode_boxes, boxes.decode_boxes)
    assert not checks.RESULTS[nb01.EXERCISES[4]].passed
    assert "reference implementation, not your own code" in capsys.readouterr().out


def test_unfinished_exercise_falls_back_and_says_so(capsys):
    def box_iou(a, b):
        raise NotImplementedError

    assert nb01.check_box_iou(box_iou) is boxes.box_iou
    out = capsys.readouterr().out
    assert "not implemented yet" in out and "reference implementation of 1.1" in out
    assert "course_utils." not in out  # no internal names in what a student reads
    r = checks.RESULTS["1.1 box_iou"]
    assert not r.implemented and not r.passed


def test_wrong_answer_names_case_and_shape(capsys):
    def transposed(a, b):
        return boxes.box_iou(a, b).T

    assert nb01.check_box_iou(transposed) is boxes.box_iou
    out = capsys.readouterr().out
    assert "case '7 x 5 random boxes': output: expected shape (7, 5), got (5, 7)" in out


def test_hidden_cases_catch_hard_coding_without_showing_values(capsys):
    printed = {}

    def memoriser(a, b):
        # Pretend to have copied the printed expectations: right on printed cases only.
        key = (tuple(a.shape), tuple(b.shape))
        if key in printed:
            return printed[key]
        return torch.zeros(a.shape[0], b.shape[0]) + 0.5

    g = torch.Generator().manual_seed(101)
    for a, b in [(torch.rand(7, 4, generator=g), torch.rand(5, 4, generator=g))]:
        printed[(tuple(a.shape), tuple(b.shape))] = None
    assert nb01.check_box_iou(memoriser) is boxes.box_iou
    out = capsys.readouterr().out
    hidden_lines = [line for line in out.splitlines() if "a hidden case" in line]
    assert hidden_lines and all("expected" not in line.split(":", 2)[-1] or "shape" in line
                                for line in hidden_lines)
    assert all("got 0.5" not in line for line in hidden_lines)


def test_student_exception_is_reported_not_raised(capsys):
    def broken(a, b):
        return a @ b  # wrong shapes -> RuntimeError

    assert nb01.check_box_iou(broken) is boxes.box_iou
    assert "raised RuntimeError" in capsys.readouterr().out


def test_a_replay_of_collected_outcomes_gives_the_live_verdict(monkeypatch):
    """The grader's two runs: the child collects what the student's code returned, the grader
    replays it without the code; the verdict and messages equal a live check's."""
    def off_by_one(a, b):
        return boxes.box_iou(a, b) + (a[:, :1] > 100).float()

    wrong = own(off_by_one)
    for fn in (own(boxes.box_iou), wrong, lambda a, b: (_ for _ in ()).throw(NotImplementedError())):
        nb01.check_box_iou(fn)
        live = checks.RESULTS["1.1 box_iou"]
        with checks.collecting() as record:
            nb01.check_box_iou(fn)
        assert checks.RESULTS["1.1 box_iou"] == live
        checks.RESULTS.clear()

        def never(*a, **k):
            raise AssertionError("replay must not call the student's code")

        with checks.replaying(record):
            chosen = nb01.check_box_iou(never)
        assert checks.RESULTS["1.1 box_iou"] == live
        assert (chosen is never) == live.passed
    assert not checks.RESULTS["1.1 box_iou"].implemented


def test_hidden_cases_never_show_what_the_exception_said():
    def leaky(a, b):
        raise ValueError(f"inputs were {a.tolist()}")

    nb01.check_box_iou(own(leaky))
    messages = checks.RESULTS["1.1 box_iou"].messages
    assert any("case 'identical boxes': raised ValueError: inputs were" in m for m in messages)
    hidden = [m for m in messages if m.startswith("a hidden case")]
    assert hidden and all("inputs were" not in m and "ValueError" in m for m in hidden)


def test_compare_messages():
    assert checks.compare(torch.ones(2), torch.ones(2)) is None
    assert "expected a torch.Tensor" in checks.compare([1, 1], torch.ones(2))
    assert "dtype" in checks.compare(torch.ones(2, dtype=torch.int64), torch.ones(2))
    assert "NaN" in checks.compare(torch.tensor([float("nan")]), torch.tensor([1.0]))
    assert "expected 3" in checks.compare(2.0, 3.0)
    assert checks.compare((torch.ones(1), 2.0), (torch.ones(1), 2.0)) is None


def test_student_cannot_corrupt_later_cases_in_place():
    def in_place(a, b):
        out = boxes.box_iou(a, b)
        a.zero_()
        return out

    assert nb01.check_box_iou(in_place) is in_place


SOLUTIONS = Path(__file__).resolve().parents[1] / "solutions"
#: Notebook -> (its checks, the modules holding the references of its exercises).
REFERENCES = {
    "01": (nb01, (boxes,)),
    "02": (nb02, (rpn,)),
    "03": (nb03, (detector,)),
    "04": (nb04, (scan, matchmap)),
    "05": (nb05, (query_agnostic,)),
}


@pytest.mark.parametrize("number", sorted(REFERENCES))
def test_exercise_ids_name_their_references_and_the_notebook_titles(number):
    """``"3.2 QueryEncoder"``: the student builds ``QueryEncoder``, the reference is
    ``detector.QueryEncoder`` and the notebook's title says so; ``"a / b"`` names two."""
    module, refs = REFERENCES[number]
    (path,) = SOLUTIONS.glob(f"{number}_*.ipynb")
    titles = {}
    for cell in json.loads(path.read_text())["cells"]:
        text = "".join(cell["source"])
        for line in text.splitlines():
            m = re.match(r"### Exercise (\d+\.\d+) — (.*)", line)
            if cell["cell_type"] == "markdown" and m:
                titles[m.group(1)] = m.group(2)
    assert module.EXERCISES and len(set(module.EXERCISES)) == len(module.EXERCISES)
    for exercise in module.EXERCISES:
        label, names = exercise.split(" ", 1)
        title = titles.get(label.rstrip("ab"))
        assert title is not None, f"{path.name}: no '### Exercise {label.rstrip('ab')}' title for {exercise!r}"
        for name in names.split(" / "):
            assert any(hasattr(ref, name) for ref in refs), f"{exercise!r}: no reference {name!r}"
            assert f"`{name}`" in title, f"{path.name}: title {title!r} does not name {name!r}"
