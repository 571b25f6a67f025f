"""Prodigy over DeepSpeed ZeRO's shards: one step size for the whole model, as one process finds it.

Prodigy (prodigyopt) finds its step size d from two sums over every weight it steps: delta_numerator (the gradients
dotted with how far each weight moved from its start) and d_denom (the absolute sum of its running gradient sums `s`).
Under ZeRO each process's optimizer holds only its shard of the weights (a flat tensor per parameter group), so each
process summed its shard alone, found its own d, and parts of the model stepped at different sizes (measured: a LoRA,
2 processes under ZeRO-2, step 9: d 30% above and 20% below one process's). Here both sums are added over the
processes before d is found. Nothing else Prodigy computes needs the other shards: it takes no maximum or norm over
the weights; its moments, `s`, the weight decay and the update are element by element; d_max and the growth cap
follow d, which is then the same on every process.

prodigyopt has this reduction for FSDP (`fsdp_in_use`), but it builds its tensor with `.cuda()`, which fails on a
CPU process group (gloo), and turns itself on only for FSDP's flattened parameters, not DeepSpeed's; neither can be
changed from outside without patching torch. So this subclass is prodigyopt 1.1's `step` (with `slice_p` 1, as
finetune builds it) whose sums are all-reduced, on the device of the shard the process group talks to. Only ZeRO gets
it: under DDP (or one process) each process holds every weight with the gradients already averaged, and the unchanged
Prodigy finds the same d on each without talking.

The step below is adapted from prodigyopt (https://github.com/konstmish/prodigy, MIT License, Copyright (c) 2023
Konstantin Mishchenko); it reads prodigyopt's parameter-group keys, so pyproject.toml keeps prodigyopt below 2.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from prodigyopt import Prodigy

from finetune.errors import FinetuneError


class ShardedProdigy(Prodigy):
    """Prodigy whose parameters are one process's shard of the trained weights (DeepSpeed ZeRO): its step size d comes
    from the sums over every process's shard. Every process must call `step` together (ZeRO's optimizer does)."""

    def step(self, closure=None):
        self._check_stepped_whole()
        loss = closure() if closure is not None else None
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k, d, d_max, d_coef = first["k"], first["d"], first["d_max"], first["d_coef"]
        lr = max(group["lr"] for group in self.param_groups)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1
        dlr = d * lr * bias_correction
        d_numerator = first["d_numerator"] * beta3
        delta_numerator, d_denom = 0.0, 0.0
        for group in self.param_groups:
            if group["lr"] not in (lr, 0.0):
                raise RuntimeError("Setting different lr values in different parameter groups is only supported for values of 0")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                if group["weight_decay"] != 0 and not group["decouple"]:
                    grad.add_(p.data, alpha=group["weight_decay"])
                state = self.state[p]
                if "step" not in state:
                    self._start_state(state, p, beta1)
                if group["lr"] > 0.0:
                    scale = d / group["d0"]  # d / d0, not d: Prodigy's guard against sums too small
                    flat_grad = grad.flatten()
                    delta_numerator += scale * dlr * torch.dot(flat_grad, state["p0"].data - p.data.flatten()).item()
                    if beta1 > 0:
                        state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
                    state["s"].mul_(beta3).add_(flat_grad, alpha=scale * (d if group["safeguard_warmup"] else dlr))
                    d_denom += state["s"].abs().sum().item()

        delta_numerator, d_denom = self._summed_over_processes(delta_numerator, d_denom)
        if d_denom == 0:  # no gradient on any process yet (or a learning rate of 0): Prodigy waits, every process alike
            return loss
        global_d_numerator = d_numerator + delta_numerator
        d_hat = d_coef * global_d_numerator / d_denom
        if d == first["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])

        for group in self.param_groups:
            group.update(d_numerator=global_d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)
            decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
                if decay != 0 and group["decouple"]:
                    p.data.add_(p.data, alpha=-decay * dlr)
                if beta1 > 0:
                    p.data.addcdiv_(state["exp_avg"], denom, value=-dlr)
                else:
                    p.data.addcdiv_(p.grad.data, denom, value=-dlr * d)
            group["k"] = group["k"] + 1
        return loss

    def _check_stepped_whole(self) -> None:
        """DeepSpeed steps its optimizer once per part where it splits the weights: ZeRO-3 each process's shard into
        sub-groups of zero_optimization.sub_group_size weights, ZeRO-1/2 by parameter group (finetune gives Prodigy one). A
        weight with a state that this step leaves out was stepped in another part: Prodigy would find a step size from
        each part, and count a step for each."""
        stepped = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) not in stepped for p in self.state):
            raise FinetuneError(
                "optimizer.name prodigy: DeepSpeed steps this model's weights in parts (ZeRO-3's sub-groups of "
                "zero_optimization.sub_group_size weights per process, 1e9 unless the config says otherwise), and Prodigy finds "
                "one step size from all of them: set sub_group_size in the DeepSpeed config above the trained weights each process "
                "holds, or use ZeRO-2"
            )

    @staticmethod
    def _start_state(state: dict, p: torch.Tensor, beta1: float) -> None:
        """Prodigy's state of a weight at its first step (its names and shapes, so its checkpoints read alike)."""
        state["step"] = 0
        state["s"] = torch.zeros_like(p.data.flatten()).detach()
        # A weight of zeros starts from a zero scalar (prodigyopt's memory saving; the same differences).
        state["p0"] = p.flatten().detach().clone() if p.any() else torch.tensor(0, device=p.device, dtype=p.dtype)
        if beta1 > 0:
            state["exp_avg"] = torch.zeros_like(p.data).detach()
        state["exp_avg_sq"] = torch.zeros_like(p.data).detach()

    def _summed_over_processes(self, *sums: float) -> list[float]:
        """`sums` added over every process, in float64 as one process adds them. On the shard's device: ZeRO keeps it
        where the process group talks (CUDA for NCCL, the CPU for gloo); its optimizer offload, which would keep it on the
        CPU beside NCCL, runs DeepSpeed's own Adam and is refused with Prodigy (finetune.distributed.deepspeed_checks)."""
        device = next(p.device for group in self.param_groups for p in group["params"])
        total = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()
