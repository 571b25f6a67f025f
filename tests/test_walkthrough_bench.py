"""`finetune bench`'s arithmetic: the FLOPs it counts for a step, against a count by hand."""

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from finetune.bench.measure import flop_counter


class Attention(nn.Module):
    """Self-attention with q, k and v projections (no output projection): the part of a UNet's attention
    that LoRA trains, small enough to count by hand."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width, bias=False) for _ in range(3))

    def forward(self, x):
        batch, tokens, width = x.shape
        split = lambda t: t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))


def test_a_lora_attention_steps_flops_are_the_hand_count():
    """Forward and backward of a LoRA (rank 4 on to_q) attention on a CPU, as the bench's FLOP step counts it.

    Frozen projections compute no weight gradient, only the gradient of their input (which requires one,
    as a UNet's inner activations do); LoRA's two small matmuls add theirs; attention is counted as torch
    counts it on a GPU (forward: two matmuls; backward: the scores recomputed and four matmuls)."""
    batch, tokens, width, heads, rank = 2, 8, 16, 2, 4
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q"], init_lora_weights="gaussian"), Attention(width, heads))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    x = torch.randn(batch, tokens, width, requires_grad=True)

    with flop_counter() as counter:
        model(x).sum().backward()

    rows = batch * tokens
    projection, lora_half = 2 * rows * width * width, 2 * rows * width * rank  # one matmul's FLOPs (2 per multiply-add)
    attention_matmul = 2 * batch * heads * tokens * tokens * (width // heads)  # q k^T, or scores v
    forward = 3 * projection + 2 * lora_half + 2 * attention_matmul
    backward = (
        3 * projection  # frozen q, k, v: the input's gradient only
        + 4 * lora_half  # LoRA B: weight and input gradients; LoRA A: weight and input gradients
        + 4 * attention_matmul  # gradients of the values, the scores, the queries and the keys
    )
    assert counter.get_total_flops() == forward + backward == 86016
    assert x.grad is not None and all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    # The GPU's attention kernels (flash, memory-efficient, cuDNN) are counted the same way.
    registry, q = counter.flop_registry, torch.empty(batch, heads, tokens, width // heads, device="meta")
    for kernel in ("flash", "efficient", "cudnn"):
        assert registry[getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_attention")](q, q, q, out_val=None) == 2 * attention_matmul
        assert registry[getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_attention_backward")](q, q, q, q, out_val=None) == 4 * attention_matmul


def test_a_variant_stopped_by_a_deadline_says_how_far_it_got(tmp_path, monkeypatch):
    """`timeout` stops a GPU check's bench in the middle of a variant (a compile outlasting its stage): the report
    keeps a row for it saying which untimed steps ended when, instead of nothing; the stop is raised again as the
    signal it was (a SIGTERM was said as Ctrl-C, exit 130). (The variant's process is stood in for: it ends its first
    step, then the stop comes.)"""
    import json

    import pytest

    from finetune.bench import runner
    from finetune.stop_signals import Terminated

    real_run = runner.subprocess.run

    def process(argv, **kwargs):
        if "--worker" not in argv:
            return real_run(argv, **kwargs)
        spec = json.loads(open(argv[4]).read())
        with open(spec["progress"], "a") as progress:
            progress.write("1 95.2\n")
        raise Terminated  # `timeout`'s SIGTERM

    monkeypatch.setattr(runner.subprocess, "run", process)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt) as stop:
        runner.run_benchmark(preset="tiny", steps=2, warmup=3, batch=2, num_images=2, variants=["lora_cached_compiled"],
                             count_flops=False, workdir=tmp_path / "work", out=out, log=lambda line: None)  # fmt: skip
    assert type(stop.value) is Terminated  # the bench's stop line says SIGTERM and it exits 143, not Ctrl-C's 130
    (row,) = json.loads(out.read_text())["results"]
    assert row["variant"] == "lora_cached_compiled" and row["environment"] == {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}
    assert row["error"].startswith("stopped after ") and "1 of 3 untimed steps done (step 1 at 95.2 s, from the process's start)" in row["error"]


def test_gpu_wheels_refuses_more_than_a_device_call_carries(tmp_path):
    """.ci/gpu-wheels says what a GPU check will carry (working tree and wheels) and fails above the device
    call's 64 MiB, here rather than when the call is refused. pip is stood in for: it 'downloads' one wheel."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / ".ci" / "gpu-wheels", repo / ".ci" / "gpu-wheels")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    pip = tmp_path / "python"
    pip.write_text('#!/bin/sh\nmkdir -p .whl && truncate -s "$WHEEL_BYTES" .whl/big.whl\n')
    pip.chmod(0o755)
    for mib, fits in ((60, True), (66, False)):
        env = {**os.environ, "PYTHON": str(pip), "WHEEL_BYTES": str(mib << 20)}
        done = subprocess.run([str(repo / ".ci" / "gpu-wheels")], env=env, capture_output=True, text=True)
        assert (done.returncode == 0) == fits, done.stdout + done.stderr
        assert f"to carry: {mib} MiB of 64 (working tree 0 MiB, .whl {mib} MiB)" in done.stdout
        assert fits or "over the device call's 64 MiB" in done.stderr
