"""The virtual GPU of :mod:`course_utils.device_guard` catches device bugs without a GPU.

``make test`` runs every solution notebook on it (the root ``conftest.py``); these tests pin what
it emulates, and bring back the two bugs a Colab GPU student met (notebook 03's ``search`` with a
CPU image, notebook 07's training step with a CPU batch) to show that it catches both.
"""

from __future__ import annotations

import pytest
import torch

from course_utils import detector, device_guard, env
from course_utils.device_guard import DeviceMismatchError, is_on_virtual_cuda, virtual_cuda
from course_utils.profiles import get_config


def test_moves_mark_and_propagate() -> None:
    with virtual_cuda() as dev:
        m = torch.nn.Linear(3, 2).to(dev)
        assert dev == torch.device("cuda") and m.weight.device == torch.device("cuda", 0)
        x = torch.ones(4, 3)
        y = m(x.to(dev))
        assert is_on_virtual_cuda(y) and not is_on_virtual_cuda(x)  # .to made a copy
        y.sum().backward()
        assert is_on_virtual_cuda(m.weight.grad)
        torch.optim.Adam(m.parameters()).step()  # optimizer state follows the parameters
        assert not is_on_virtual_cuda(y.cpu()) and is_on_virtual_cuda(y)
        assert is_on_virtual_cuda(torch.zeros(2, device=dev)) and is_on_virtual_cuda(torch.arange(3, device=y.device))
        # what PyTorch allows: a 0-d CPU tensor in a GPU op, CPU indices into a GPU tensor
        assert is_on_virtual_cuda(y * torch.tensor(2.0)) and is_on_virtual_cuda(y[torch.tensor([0, 1])])
    assert torch.ones(1).device.type == "cpu"


def test_mixing_devices_names_the_op_the_tensors_and_the_line() -> None:
    with virtual_cuda() as dev:
        m = torch.nn.Linear(3, 2).to(dev)
        with pytest.raises(DeviceMismatchError, match=r"linear got a cuda:0 torch.float32 tensor of shape "
                           r"\(2, 3\) and a cpu torch.float32 tensor of shape \(4, 3\).*test_device_guard.py"):
            m(torch.ones(4, 3))
        with pytest.raises(DeviceMismatchError, match=r"numpy\(\) of a cuda:0"):
            m.weight.detach().numpy()
        with pytest.raises(DeviceMismatchError, match="__setitem__ of a cpu"):
            torch.zeros(3)[torch.tensor([0], device=dev)] = 1.0
        with pytest.raises(DeviceMismatchError, match="CPU torch.Generator"):
            torch.randn(3, device=dev, generator=torch.Generator().manual_seed(0))
        with pytest.raises(DeviceMismatchError):  # a GPU scalar may not join a CPU op
            torch.ones(3) * torch.tensor(2.0, device=dev)


def test_numbers_are_the_cpus() -> None:
    torch.manual_seed(0)
    m, x = torch.nn.Conv2d(3, 4, 3), torch.rand(2, 3, 8, 8)
    ref = m(x)
    with virtual_cuda() as dev:
        got = m.to(dev)(x.to(dev)).cpu()
    assert torch.equal(got, ref)


def test_course_device_variable_switches_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSE_DEVICE", device_guard.VIRTUAL_DEVICE_NAME)
    try:
        assert env.get_device() == torch.device("cuda")
        assert is_on_virtual_cuda(torch.zeros(1, device="cuda"))
    finally:
        device_guard.deactivate()
    with pytest.raises(RuntimeError):  # off again: no CUDA on this machine
        torch.zeros(1, device="cuda")


def _smoke_detector() -> tuple[detector.SemanticDetector, torch.Tensor]:
    torch.manual_seed(0)
    return detector.build_detector(get_config("smoke")), torch.rand(3, 64, 64)


def test_search_takes_a_cpu_image_on_the_gpu() -> None:
    model, image = _smoke_detector()
    cpu_boxes, cpu_scores = model.search(image, "red circles", threshold=0.0)
    with virtual_cuda() as dev:
        boxes, scores = model.to(dev).search(image, "red circles", threshold=0.0)
    assert not is_on_virtual_cuda(boxes) and not is_on_virtual_cuda(scores)
    # eval-mode attention takes a fused kernel on the plain CPU only: equal up to rounding
    torch.testing.assert_close(boxes, cpu_boxes)
    torch.testing.assert_close(scores, cpu_scores)


def test_notebook_03_bug_comes_back_without_the_move(monkeypatch: pytest.MonkeyPatch) -> None:
    # search() used to hand the CPU image straight to a model on the GPU
    monkeypatch.setattr(detector, "module_device", lambda module: torch.device("cpu"))
    model, image = _smoke_detector()
    with virtual_cuda() as dev:
        model.to(dev)
        with pytest.raises(DeviceMismatchError, match=r"conv2d got a cuda:0 .* cpu torch.float32 tensor of shape "
                                                      r"\(1, 3, 64, 64\)"):
            model.search(image, "red circles")
