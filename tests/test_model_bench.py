"""bench/model_bench.py and its baseline: the port-style CapsNet computes what
``CapsNet(grad_through_routing=False)`` computes (a like-for-like comparison), the saved-bytes
accounting on layers whose saved tensors are known, and a tiny run on CPU that writes valid JSON
and plots. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _helpers import REPO, rel_err

import capstriton as ct

sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
from port_capsnet import PortCapsNet, port_loss  # noqa: E402

BENCH = REPO / "bench" / "model_bench.py"


def test_port_has_the_papers_parameter_count():
    assert sum(p.numel() for p in PortCapsNet().parameters()) == 8_215_568
    assert sum(p.numel() for p in ct.models.CapsNet().parameters()) == 8_215_568


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_port_computes_capsnet_without_gradient_through_routing(train):
    """With the same weights, in float64: the same capsules, reconstruction, loss and gradients
    of every parameter. The port's squash epsilon (1e-8 under the square root) changes a capsule
    by a relative 1e-8 / (2 |s|^2), up to 1e-4 for the small |s| of freshly initialised weights:
    compared without it here, so only float64 rounding separates the two (1e-10)."""
    torch.manual_seed(0)
    ours = ct.models.CapsNet(grad_through_routing=False, backend="torch").double()
    port = PortCapsNet(eps=0.0).double().load_from_capstriton(ours)
    ours.train(train)
    port.train(train)
    images = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    target = torch.tensor([3, 1, 4])
    v, rec = ours(images, target if train else None)
    pv, prec = port(images, target if train else None)
    assert rel_err(pv, v) < 1e-10 and rel_err(prec, rec) < 1e-10
    loss = ct.nn.CapsuleLoss()(ct.nn.capsule_lengths(v), target, rec, images)
    ploss = port_loss(pv, target, prec, images)
    assert abs(ploss.item() - loss.item()) <= 1e-10 * abs(loss.item())
    grads = torch.autograd.grad(loss, list(ours.parameters()))
    pgrads = dict(
        zip((n for n, _ in port.named_parameters()), torch.autograd.grad(ploss, list(port.parameters())), strict=True)
    )
    mapped = [
        pgrads["conv1.weight"],
        pgrads["conv1.bias"],
        pgrads["primary.weight"],
        pgrads["primary.bias"],
        pgrads["W"][0],
        *(pgrads[f"decoder.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")),
    ]
    assert len(mapped) == len(grads)
    for (name, _), g, pg in zip(ours.named_parameters(), grads, mapped, strict=True):
        assert rel_err(pg, g) < 1e-10, name


def test_port_differs_from_gradient_through_routing():
    """Guards the test above: the default CapsNet (gradient through every iteration) differs
    (with weights large enough for the routing to move away from uniform coupling)."""
    torch.manual_seed(0)
    ours = ct.models.CapsNet(backend="torch", init_std=0.5).double()
    port = PortCapsNet().double().load_from_capstriton(ours)
    images, target = torch.rand(2, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 7])
    g = torch.autograd.grad(ct.nn.capsule_lengths(ours(images, target)[0]).sum(), ours.digit.weight)[0]
    pg = torch.autograd.grad(port(images, target)[0].norm(dim=-1).sum(), port.W)[0][0]
    assert rel_err(pg, g) > 1e-3


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(7, 5, requires_grad=True)
    linear = torch.nn.Linear(5, 3)
    # linear saves its input and its weight (for the input's and the weight's gradients)
    assert harness.saved_tensor_bytes(lambda: linear(x)) == x.nbytes + linear.weight.nbytes
    # x * x saves x twice, a view of it too: one storage
    assert harness.saved_tensor_bytes(lambda: x * x) == x.nbytes
    assert harness.saved_tensor_bytes(lambda: x[:, :2] * x[:, 1:3]) == x.nbytes
    with torch.no_grad():
        assert harness.saved_tensor_bytes(lambda: linear(x)) == 0


def test_tiny_model_bench_writes_json_and_plots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MPLBACKEND"] = "Agg"
    args = [
        "--device",
        "cpu",
        "--batch-sizes",
        "1",
        "2",
        "--implementations",
        "port",
        "eager",
        "fused",
        "--modes",
        "train",
        "inference",
        "--out",
        str(tmp_path),
        "--quick",
        "--no-progress",
    ]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    env_ = data["environment"]
    assert env_["device_type"] == "cpu" and env_["config"]["model"] == "capsnet" and env_["torch"]
    rows = data["results"]
    assert {(r["implementation"], r["mode"], r["batch_size"]) for r in rows} == {
        (i, m, b) for i in ("port", "eager", "fused") for m in ("train", "inference") for b in (1, 2)
    }
    for r in rows:
        assert {
            "implementation",
            "mode",
            "dtype",
            "batch_size",
            "examples_per_s",
            "saved_bytes_per_example",
            "peak_memory_bytes",
            "status",
            "reason",
        } <= r.keys()
        if r["implementation"] == "fused":  # the Triton kernels need CUDA to be timed
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
            continue
        assert r["status"] == "ok" and r["examples_per_s"] > 0 and r["peak_memory_bytes"] is None
        assert (r["saved_bytes_per_example"] is not None) == (r["mode"] == "train")
        assert r["saved_bytes_per_example"] is None or r["saved_bytes_per_example"] > 0
    # the summary compares with the port at the same batch
    summary = {(e["implementation"], e["mode"], e["batch_size"]): e for e in data["summary"]}
    assert summary["port", "train", 2]["speedup_vs_port"] == 1.0
    assert summary["eager", "train", 2]["saved_bytes_fraction_of_port"] > 0
    for png in ("model_throughput.png", "model_memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Summary on" in proc.stdout


def test_model_bench_rejects_bad_batches():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--batch-sizes", "0"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2 and "argument --batch-sizes: must be >= 1" in proc.stderr


def test_max_batch_is_refused_off_cuda(tmp_path):
    """--max-batch searches with the CUDA allocator's peak: on CPU it is refused before any work,
    where it used to be skipped without a word."""
    import model_bench

    with pytest.raises(SystemExit, match=r"--max-batch needs a CUDA device \(--device cuda\); this run is on cpu"):
        model_bench.main(["--device", "cpu", "--max-batch", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_port_capsnet_refuses_no_iterations():
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        PortCapsNet(iterations=0)
