"""How much each micro-batch's loss weighs in its optimizer step (`micro_batch_shares`), and what the run reports of its
loss: each optimizer step's loss (progress bar, TrainResult), and for
TensorBoard each term's mean over the steps since the last log (logging.every_n_steps), over all of their
micro-batches (gradient accumulation) and processes, weighted by rows as the gradients are; and all a log step
writes there (`train_logs`: those means, the method's values, the learning rates and the epoch).

The loss and its terms (DreamBooth's instance and class losses, the VAE's l1, l2, kl) cover the same images:
a term taken from the last micro-batch alone would not add up to the loss logged beside it. And a diffusion
loss swings with each batch's timesteps: the last step alone of every tenth would be a noisy sample of the curve.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune.optim.optimizers import step_size

MOST_UNREAD = 100  # steps whose losses wait on the device: one host read per 100 steps costs next to nothing


class StepLosses:
    """Each step's loss, and each term's sum since the last log, kept on the device between log steps: reading a loss on
    the host (`.item()`) waits for the GPU to finish all the work queued before it, so a read every step would stop the
    CPU from queueing the next step's kernels while the GPU runs this one's. `read_steps` reads them at once, at log steps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # since the last log
        self.steps = 0  # optimizer steps in those sums
        self.step_sum: torch.Tensor | None = None  # this step's loss so far (None before its first micro-batch)
        self.unread: list[torch.Tensor] = []  # each finished step's loss on this process, not read on the host yet
        self.losses: list[float] = []  # each step's loss read so far, in order

    def add(self, losses: dict[str, torch.Tensor], weight: float) -> None:
        """One micro-batch's terms, each weighted by `weight` (its share of the step's rows on this process). A sum's
        first term is kept as it is, not added to 0 (the same bits), and the loss is weighted once for both of its sums:
        on a GPU each add or multiply is a kernel launch."""
        terms = {name: weighted(value.detach().float(), weight) for name, value in losses.items()}
        for name, term in terms.items():
            self.sums[name] = self.sums[name] + term if name in self.sums else term
        self.step_sum = terms["loss"] if self.step_sum is None else self.step_sum + terms["loss"]

    def end_step(self, accelerator: Accelerator) -> None:
        """Collective: the step's loss is complete; it stays on the device until `read_steps`, or until
        MOST_UNREAD steps wait (a log interval of thousands of steps would keep thousands of tensors)."""
        self.unread.append(self.step_sum)
        self.step_sum, self.steps = None, self.steps + 1
        if len(self.unread) >= MOST_UNREAD:
            self.read_steps(accelerator)

    def read_steps(self, accelerator: Accelerator) -> list[float]:
        """Collective: every step's loss so far in this run, averaged over the processes; the steps since the
        last call are read now (one reduction and one host read for all of them)."""
        if self.unread:
            self.losses += accelerator.reduce(torch.stack(self.unread), reduction="mean").tolist()
            self.unread = []
        return self.losses

    def shown(self) -> dict[str, str]:
        """The progress bar's loss: the last step read, at the last log step (none before the first)."""
        return {"loss": f"{self.losses[-1]:.4f}"} if self.losses else {}

    def since_last_log_state(self, accelerator: Accelerator) -> dict:
        """Collective: the sums since the last log (averaged over the processes) and their step count, for a
        checkpoint: a run resumed from it then logs at its next log step the mean of the same steps as a run
        never stopped, not of the resumed steps alone."""
        names = list(self.sums)
        values = accelerator.reduce(torch.stack([self.sums[name] for name in names]), reduction="mean").tolist() if names else []
        return {"steps": self.steps, "sums": dict(zip(names, values))}

    def resume_since_last_log(self, state: dict | None, device: torch.device) -> None:
        """What `since_last_log_state` kept (None: a checkpoint from before it was kept; the first log then
        covers the resumed steps only)."""
        if state and state.get("steps"):
            self.sums = {name: torch.tensor(value, dtype=torch.float32, device=device) for name, value in state["sums"].items()}
            self.steps = state["steps"]

    def since_last_log(self, accelerator: Accelerator) -> dict[str, float]:
        """Collective: each term's mean over the steps since the last call and over the processes (the steps'
        own losses are read with them)."""
        self.read_steps(accelerator)
        names = list(self.sums)
        values = accelerator.reduce(torch.stack([self.sums[name] for name in names]), reduction="mean") / self.steps
        self.sums, self.steps = {}, 0
        return dict(zip(names, values.tolist()))


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """`accelerator.backward(loss)` without its division of the loss by `gradient_accumulation_steps` where that is 1:
    dividing by 1 changes no bit, but on a GPU it is a kernel launch, and another for its gradient. Where accelerate does
    more (DeepSpeed's engine scales and accumulates itself, Megatron) or the division divides, it is accelerate's own."""
    if accelerator.gradient_accumulation_steps != 1 or accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        accelerator.backward(loss)
    elif accelerator.scaler is not None:  # fp16's loss scaling, as accelerate scales it
        accelerator.scaler.scale(loss).backward()
    else:
        loss.backward()


def weighted(value: torch.Tensor, weight: float) -> torch.Tensor:
    """`value * weight`; `value` itself at a weight of exactly 1 (one process, no accumulation, full batches), the same
    bits without the multiply: on a GPU a kernel launch, and another for its gradient when `value` is a loss."""
    return value if weight == 1 else value * weight


def micro_batch_shares(sampler, micro_batches: range, num_processes: int) -> list[float]:
    """The factor on each micro-batch's loss (a mean over this process's rows) in an optimizer step, so that every image of
    the step counts the same in its gradient, as in one batch of them all on one process.

    The processes' gradients are averaged (DDP, DeepSpeed) and the micro-batches' summed and divided by their number: a
    micro-batch weighs its own rows x processes x micro-batches over the step's own images. Else each image of a smaller
    part would count more: rows split unevenly over the processes (2 + 1), or a bucket's last batch in a step of full ones
    (a lone image as much as a pair, as diffusers' and sd-scripts' trainers weigh it). A bucket's last batch of fewer
    images than processes borrows images so that every process has a row to join the gradients' reduction: a process
    holding a borrowed image weighs its loss by 0 (its backward still runs, with zero gradients), else the borrowed ones
    would train twice and the batch's own at a share of 1/processes. Full batches split evenly: a factor of 1.

    `sampler`: a `finetune.data.order.DealtOrder` (`rows_of`: a global batch's size and this process's rows;
    `own_images`: how many of its images are its own)."""
    parts = [(*sampler.rows_of(micro_batch), sampler.own_images(micro_batch)) for micro_batch in micro_batches]
    images = sum(own for _, _, own in parts)
    # A padded batch has one row per process, so this process's rows of it are its own or borrowed, never both: the mean
    # over them is a mean over own rows, or weighs nothing.
    return [max(0, min(rows.stop, own) - rows.start) * num_processes * len(parts) / images for _, rows, own in parts]


def train_logs(losses: dict, step_logs: dict, lr: float, optimizer, group_names: list[str], epochs: float) -> dict:
    """A log step's TensorBoard values: the loss and its terms since the last log step (`losses`), what the method reported
    after the step (`step_logs`: lora.max_norm's, read on the host here, not at each step), the rates and the epoch."""
    logs = {f"train/{k}": v for k, v in losses.items()}  # train/loss among them
    logs.update({f"train/{k}": float(v) for k, v in step_logs.items()})
    if len(group_names) > 1:  # each group's rate (text encoder, LoRA+ up weights); train/lr is the first's
        logs.update({f"train/lr/{name}": step_size(optimizer, i) for i, name in enumerate(group_names)})
    logs["train/epoch"] = epochs
    return {"train/lr": lr, **logs}
