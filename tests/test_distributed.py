"""train.fit under torch.distributed: gloo on 127.0.0.1, one subprocess per rank.

Each rank runs tests/dist_worker.py with the variables torchrun sets.  Two processes must train
the weights one process trains with the same global batch, resume across world sizes, leave every
file to rank 0, and fail clearly (never hang) on a bad launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from course_utils import distributed
from course_utils.loaders import RankShares, shuffled_order
from course_utils.train import fit

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int, epochs: int = 1, ranks: list[int] | None = None,
           timeout: float = 240, extra_env: dict | None = None, killed: bool = False) -> list[dict]:
    """Start ``world`` ranks (or only ``ranks``) of ``scenario``; ``world=0``: one plain process
    without any torchrun variable.  Returns each started rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    base.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent), **(extra_env or {})})
    port = _free_port()
    started = ranks if ranks is not None else list(range(max(world, 1)))
    procs = []
    for r in started:
        env = dict(base)
        if world:
            env.update({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out), str(epochs)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: a rank was still running after {timeout} s (a hang)")
    if killed:  # the ranks were killed: no report, only the checkpoints they left
        assert all(p.returncode == -9 for p in procs), [p.returncode for p in procs]
        return []
    reports = []
    for r, log in zip(started, logs):
        f = out / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no report; its output:\n{log}"
        rep = json.loads(f.read_text())
        rep["log"] = log
        reports.append(rep)
    return reports


def _weights(out: Path, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "ckpt" / f"epoch_{epoch:03d}.pt", weights_only=True)["model"]


def _comparable(name: str, t: torch.Tensor) -> torch.Tensor:
    """The weights whose values matter.  The key block of an attention layer's ``in_proj_bias``
    adds the same number to every score of a query, which the softmax ignores: its true
    gradient is zero and its computed one is round-off, which Adam's normalised step turns into
    moves of either sign.  It changes no output
    (:func:`test_key_bias_changes_no_attention_output`), so it is left out of the comparison."""
    if name.endswith("self_attn.in_proj_bias"):
        e = t.numel() // 3
        return torch.cat([t[:e], t[2 * e:]])
    return t


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((_comparable(k, a[k]).double() - _comparable(k, b[k]).double()).abs().max())
               if a[k].numel() else 0.0 for k in a)


def test_key_bias_changes_no_attention_output():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 8)
    before = layer(x)
    with torch.no_grad():
        layer.self_attn.in_proj_bias[8:16] += torch.randn(8)  # the key block
    assert torch.allclose(layer(x), before, atol=1e-6)
    with torch.no_grad():
        layer.self_attn.in_proj_bias[:8] += torch.randn(8)  # the query block does matter
    assert not torch.allclose(layer(x), before, atol=1e-3)


def _ok(reports: list[dict]) -> None:
    for rep in reports:
        assert rep["error"] is None, f"rank {rep['rank']}: {rep['error']}\n{rep.get('traceback', '')}\n{rep['log']}"


# --------------------------------------------------------------------------------------------
# In one process: the pieces


def test_rank_shares_cut_the_one_process_batches():
    seen = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return 11

        def __getitem__(self, i):
            seen.append(i)
            return torch.ones(2)

    net = torch.nn.Linear(2, 1)
    fit(net, lambda m, b: {"loss": m(b).mean()}, Recording(), epochs=1, batch_size=4, seed=4,
        optimizer=torch.optim.SGD(net.parameters(), 0.1), progress=False)
    order = shuffled_order(11, 5)
    assert order == seen  # the order one process's fit visits (seed 4, epoch 1)
    shares = [list(RankShares(order, 4, r, 2)) for r in range(2)]
    # batches [0:4], [4:8] split in halves; the last batch of 3 is cut to 2 (one share each)
    assert [s0 + s1 for s0, s1 in zip(*shares)] == [order[0:4], order[4:8], order[8:10]]
    assert len(RankShares(order, 4, 0, 2)) == 3
    # a last batch smaller than the world size is dropped: 9 = 4 + 4 + 1
    assert len(list(RankShares(order[:9], 4, 0, 2))) == len(RankShares(order[:9], 4, 0, 2)) == 2


def test_single_process_helpers_are_the_identity():
    x = torch.randn(5, 3, requires_grad=True)
    assert distributed.all_gather_rows(x) is x
    m = x.mean()
    assert distributed.global_mean(m, 15) is m
    assert distributed.global_count(7) == 7.0
    assert distributed.all_reduce_mean({"loss": 2.0}, 3) == {"loss": 2.0}
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    assert distributed.sync_batch_norm(net, torch.device("cpu")) is net
    assert type(net[0]) is torch.nn.BatchNorm2d


def test_example_generators_follow_the_global_rng():
    torch.manual_seed(3)
    a = [torch.randperm(10, generator=g) for g in distributed.example_generators(3)]
    torch.manual_seed(3)
    b = [torch.randperm(10, generator=g) for g in distributed.example_generators(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="n must be >= 0"):
        distributed.example_generators(-1)


def test_global_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    net = torch.nn.Sequential(bn)
    g = distributed._convert_global_bn(net)
    assert isinstance(g[0], distributed.GlobalBatchNorm)
    assert g[0].weight is bn.weight and g[0].running_mean is bn.running_mean  # same objects
    x = torch.randn(3, 4, 5, 5)
    ref = torch.nn.BatchNorm2d(4)
    assert torch.equal(g[0](x), ref(x))


def test_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv("COURSE_DIST_TIMEOUT", "soon")
    with pytest.raises(distributed.DistributedError, match="COURSE_DIST_TIMEOUT"):
        distributed._timeout()
    monkeypatch.setenv("COURSE_DIST_TIMEOUT", "12")
    assert distributed._timeout().total_seconds() == 12


# --------------------------------------------------------------------------------------------
# Several processes


@pytest.fixture(scope="module")
def detector_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_detector")
    one = launch("detector", root / "one", world=0)
    two = launch("detector", root / "two", world=2)
    return root, one, two


def test_detector_two_processes_train_the_one_process_weights(detector_runs):
    root, one, two = detector_runs
    _ok(one + two)
    diff = _max_diff(_weights(root / "one", 1), _weights(root / "two", 1))
    assert diff < 1e-5, f"max |weights(2 processes) - weights(1 process)| = {diff:.2e}"
    h1, h2 = one[0]["history"], two[0]["history"]
    assert h1["train"]["loss"] == pytest.approx(h2["train"]["loss"], rel=1e-5)
    assert h1["val"]["loss"] == pytest.approx(h2["val"]["loss"], rel=1e-5)
    assert two[0]["history"] == two[1]["history"]  # every rank holds the averaged history


def test_only_rank_0_writes_and_prints(detector_runs):
    root, _, two = detector_runs
    rank0, rank1 = two
    assert rank1["written"] == [], rank1["written"]
    assert any(w.endswith(".pt") or ".pt" in w for w in rank0["written"])
    assert "[detector] epoch 1/1" in rank0["log"] and "[detector] epoch" not in rank1["log"]


def test_clip_finetuning_two_processes_train_the_one_process_weights(tmp_path):
    one = launch("clip", tmp_path / "one", world=0)
    two = launch("clip", tmp_path / "two", world=2)
    _ok(one + two)
    diff = _max_diff(_weights(tmp_path / "one", 1), _weights(tmp_path / "two", 1))
    assert diff < 1e-5, f"max |weights(2 processes) - weights(1 process)| = {diff:.2e}"


def test_a_killed_run_resumes_with_another_world_size(tmp_path):
    """Killed in epoch 2 by two processes, resumed by one, and the other way round: both end
    with the weights of a run that was never interrupted."""
    straight = launch("detector", tmp_path / "straight", world=0, epochs=2)
    launch("detector_killed", tmp_path / "a", world=2, epochs=2, killed=True)
    assert sorted(p.name for p in (tmp_path / "a" / "ckpt").glob("*.pt")) == ["epoch_001.pt"]
    a = launch("detector", tmp_path / "a", world=0, epochs=2)
    launch("detector_killed", tmp_path / "b", world=0, epochs=2, killed=True)
    b = launch("detector", tmp_path / "b", world=2, epochs=2)
    _ok(straight + a + b)
    assert "written by a run of 2 process(es); continuing with 1" in a[0]["log"]
    assert "written by a run of 1 process(es); continuing with 2" in b[0]["log"]
    assert "continuing at epoch 2/2" in a[0]["log"] and "continuing at epoch 2/2" in b[0]["log"]
    ref = _weights(tmp_path / "straight", 2)
    for run in ("a", "b"):
        diff = _max_diff(ref, _weights(tmp_path / run, 2))
        assert diff < 1e-5, f"{run}: resumed run differs from an uninterrupted one by {diff:.2e}"


def test_more_processes_than_examples_is_refused_on_every_rank(tmp_path):
    reports = launch("tiny", tmp_path, world=2, timeout=120)
    for rep in reports:
        assert rep["error"] and rep["error"].startswith("DistributedError")
        assert "has 1 examples but the run has 2 processes" in rep["error"]


def test_a_failing_rank_stops_the_others_with_a_clear_error(tmp_path):
    t0 = time.monotonic()
    rank0, rank1 = launch("detector_fail", tmp_path, world=2, extra_env={"COURSE_DIST_TIMEOUT": "30"},
                          timeout=180)
    assert "simulated failure in step_fn" in rank1["error"]
    assert rank0["error"].startswith("DistributedError"), rank0["error"]
    assert "another process of this run" in rank0["error"]
    assert time.monotonic() - t0 < 150


def test_a_missing_rank_times_out_instead_of_hanging(tmp_path):
    (rep,) = launch("tiny", tmp_path, world=2, ranks=[0], extra_env={"COURSE_DIST_TIMEOUT": "5"}, timeout=120)
    assert rep["error"].startswith("DistributedError") and "could not join the process group" in rep["error"]
