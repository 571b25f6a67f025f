"""The training loop's host-device synchronisations: on a GPU, every read of a device tensor's value on the host
(`.item()`, `float(t)`, `.tolist()`, `if t:`) waits for all the work queued before it, so the CPU stops queueing
the next step's kernels. Counted here on the CPU (the same calls, no GPU needed): they happen at log steps only."""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from accelerate import Accelerator

from finetune.training.trainer import train

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")
# Tensors that live on the host by design (no device to wait for): the sampler's CPU permutation.
HOST_ONLY_CALLERS = ("finetune/data/batches.py",)


@pytest.fixture
def reads_by_step(monkeypatch):
    """Counts host reads of tensor values per optimizer step; `.tracking(max_steps)` is train's on_step. A read
    is counted for the step whose `on_step` came last (the reads at a log step come after it), up to the last
    step, whose reads are the final save's too."""

    class Reads(Counter):
        step = 0

        def tracking(self, max_steps: int):
            def track(step: int) -> None:
                self.step = step if step < max_steps else 0

            return track

    reads = Reads()

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            stack = "".join(traceback.format_stack(limit=12))
            if reads.step and not any(caller in stack for caller in HOST_ONLY_CALLERS):
                reads[reads.step] += 1
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    return reads


@pytest.mark.parametrize("settings", [
    {},
    {"train__max_grad_norm": 1.0, "train__ema_decay": 0.9},
    {"lora__max_norm": 0.5},
    {"train__cache_latents": True, "train__cache_text_embeddings": True, "train__gradient_accumulation_steps": 2},
], ids=["plain", "clipped-ema", "max-norm", "cached-accumulated"])
def test_no_host_reads_between_log_steps(make_recipe, reads_by_step, settings):
    train(make_recipe(train__max_steps=7, logging__every_n_steps=3, **settings), on_step=reads_by_step.tracking(7))
    assert set(reads_by_step) <= {3, 6}, f"host reads at steps other than the log steps (3 and 6): {dict(reads_by_step)}"
    # At a log step: the steps' losses, the logged means and the method's values (a few reads, not one per step).
    assert all(count <= 6 for count in reads_by_step.values()), dict(reads_by_step)


# A fixed run (seed 3, 7 steps of 2 micro-batches, logged every 3 steps, with lora.max_norm shrinking some layers),
# pinned from the loop that read every step's loss at once: reading them at log steps must not change them.
PINNED_LOSSES = [1.135353922843933, 1.0612729787826538, 1.0379712581634521, 0.9887140989303589, 1.0125243663787842, 0.9729059934616089, 0.8983556032180786]
PINNED_LOGS = {
    3: {"train/loss": 1.0781993865966797, "train/lora/layers_scaled": 17.0, "train/lora/mean_norm": 0.5812488794326782, "train/lora/max_norm": 0.6000000238418579},
    6: {"train/loss": 0.9913814067840576, "train/lora/layers_scaled": 24.0, "train/lora/mean_norm": 0.6000000238418579, "train/lora/max_norm": 0.6000000238418579},
    7: {"train/loss": 0.8983556032180786, "train/lora/layers_scaled": 24.0, "train/lora/mean_norm": 0.6000000238418579, "train/lora/max_norm": 0.6000000238418579},
}


def test_logged_losses_are_those_of_every_step(make_recipe, monkeypatch):
    logged = {}
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.setdefault(step, {}).update(values))
    recipe = make_recipe(train__max_steps=7, train__gradient_accumulation_steps=2, logging__every_n_steps=3, optimizer__lr=3e-2,
                         lora__max_norm=0.6, lora__target_modules=["to_q", "to_v", "conv1"])  # fmt: skip
    result = train(recipe)
    assert result.losses == pytest.approx(PINNED_LOSSES, rel=1e-5)  # thread counts change the last bits on a CPU
    assert set(logged) == set(PINNED_LOGS)
    for step, values in PINNED_LOGS.items():
        assert all(isinstance(logged[step][name], float) for name in values), logged[step]  # numbers, as TensorBoard takes them
        assert {name: logged[step][name] for name in values} == pytest.approx(values, rel=1e-5)
        assert logged[step]["train/lr"] == 3e-2 and logged[step]["train/epoch"] == step


def _device_argument(args, kwargs):
    """The device a `Tensor.to(...)` call names, if any (not a dtype alone)."""
    for value in (*args[:1], kwargs.get("device")):
        if isinstance(value, (torch.device, str)):
            return value
    return None


@pytest.mark.parametrize("settings", [
    {},
    {"train__cache_latents": True, "train__cache_text_embeddings": True},
], ids=["plain", "cached"])
def test_copies_to_the_device_in_a_step_are_queued_without_waiting(make_recipe, monkeypatch, settings):
    """On a GPU, `.to(device)` from pageable host memory waits for the stream's queued kernels (a sync in the
    middle of each step); the loop's copies (pixels, noise, timesteps, cached latents, tokens) go through
    finetune.training.device_copy, which stages them in pinned memory and copies with non_blocking=True. On the CPU the
    staging is skipped; what is checked is that no copy from the training code asks for a blocking one."""
    blocking, step = [], [0]
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0].filename
        if step[0] and "/finetune/" in caller and _device_argument(args, kwargs) is not None and not kwargs.get("non_blocking"):
            blocking.append(traceback.format_stack(limit=2)[0].strip())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    train(make_recipe(train__max_steps=4, **settings), on_step=lambda s: step.__setitem__(0, s if s < 4 else 0))
    assert blocking == [], "blocking copies to the device in a step:\n" + "\n".join(sorted(set(blocking)))


def test_the_benchmark_waits_for_the_gpu_at_the_ends_of_its_window_only(make_recipe, monkeypatch):
    """A torch.cuda.synchronize() at every step (as the benchmark's step hook did) is itself a host sync per step:
    it measured a loop whose CPU could never queue a step while the GPU ran the last. Here on a pretend GPU."""
    from types import SimpleNamespace

    from finetune.bench.measure import measure
    import finetune.training.trainer

    synchronized_at, current = [], [0]
    for name, fake in {"is_available": lambda: True, "synchronize": lambda: synchronized_at.append(current[0]), "memory_allocated": lambda: 0,
                       "reset_peak_memory_stats": lambda: None, "max_memory_allocated": lambda: 0, "get_device_name": lambda: "pretend GPU",
                       "set_sync_debug_mode": lambda mode: None}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)

    def fake_train(recipe, on_step, overwrite):
        for step in range(1, 9):
            current[0] = step
            on_step(step)
        return SimpleNamespace(losses=[1.0] * 8)

    monkeypatch.setattr(finetune.training.trainer, "train", fake_train)
    recipe = make_recipe().model_dump(mode="json")
    row = measure({"name": "lora", "recipe": recipe, "warmup": 2, "steps": 5, "count_flops": False, "images_per_step": 2})
    assert synchronized_at == [2, 7]  # the window: after step 2, after step 7
    assert len(row["step_seconds"]) == 5


def test_the_weight_average_moves_every_parameter_in_one_foreach_call():
    """train.ema_decay: a lerp_ per parameter was a kernel launch each, hundreds per step for a UNet or a LoRA;
    one foreach lerp does them all (a few fused kernels on a GPU), to the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune.training.ema import WeightAverage

    class CountLerps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "lerp" in func.__name__:
                self.calls[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    generator = torch.Generator().manual_seed(0)
    parameters = {f"layer{i}.weight": torch.nn.Parameter(torch.randn(3, 5, generator=generator)) for i in range(20)}
    average = WeightAverage(parameters, decay=0.9)
    expected = {name: p.detach().clone() for name, p in parameters.items()}
    with torch.no_grad():
        for p in parameters.values():
            p.add_(torch.randn(p.shape, generator=generator))
    weight = 1.0 - average.current_decay()
    for name, p in parameters.items():
        expected[name].lerp_(p.detach(), weight)
    with CountLerps() as counted:
        average.update()
    assert sum(counted.calls.values()) == 1, counted.calls
    assert all(torch.equal(average.averages[name], expected[name]) for name in parameters)


# Operators that make the host wait for a GPU beyond the reads above: a scalar read from C++ (`_local_scalar_dense`,
# which .item(), float() and `if t:` also reach), outputs whose size depends on the values (nonzero, boolean-mask
# indexing, masked_select, unique, repeat_interleave without output_size), and whole-tensor comparisons (torch.equal).
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "_unique2", "unique_consecutive", "unique_dim",
               "repeat_interleave", "bincount"}  # fmt: skip
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}  # with a boolean mask: a nonzero inside
# Host-only tensors by design: the sampler's permutation, a draw from BatchRandomness's CPU generator (multires noise).
HOST_ONLY_FUNCTIONS = {("finetune/data/batches.py", None), ("finetune/training/diffusion.py", "uniform")}


def _syncing(func, args) -> bool:
    name = func._overloadpacket.__name__
    if name in SYNCING_OPS:
        return not (name == "repeat_interleave" and len(args) > 2 and args[2] is not None)  # output_size given: no sync
    indices = args[1] if name in INDEXING_OPS and len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


@pytest.mark.parametrize("settings", [
    {"train__snr_gamma": 5.0, "train__debiased_estimation": True, "train__noise_offset": 0.05, "train__multires_noise_iterations": 3,
     "train__input_perturbation": 0.1, "train__min_timestep": 10},
    {"train__loss": "huber", "train__ema_decay": 0.9, "lora__max_norm": 0.5},
    {"train__cache_latents": True, "train__cache_text_embeddings": True, "train__gradient_accumulation_steps": 2},
], ids=["objective-options", "huber-ema-max-norm", "cached-accumulated"])  # fmt: skip
def test_no_syncing_operators_between_log_steps(make_recipe, settings):
    """What the attribute patches above cannot see: operators that wait for the GPU inside a kernel call (a boolean
    mask's nonzero, torch.equal, an .item() made in C++). Seen here as the dispatcher runs them, on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen, step = Counter(), [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if step[0] and _syncing(func, args):
                frames = [(frame.filename.replace("\\", "/"), frame.name) for frame in traceback.extract_stack()[:-1]]
                if not any(path.endswith(file) and name in (None, function) for path, function in frames for file, name in HOST_ONLY_FUNCTIONS):
                    inner = next((f"{path.split('/site-packages/')[-1]}:{function}" for path, function in reversed(frames) if "/torch/" not in path), "?")
                    seen[f"{func} from {inner}"] += 1
            return func(*args, **(kwargs or {}))

    def track(at: int) -> None:
        step[0] = at if at < 7 and at % 3 else 0  # steps 3 and 6 log; the last saves

    with Watch():
        train(make_recipe(train__max_steps=7, logging__every_n_steps=3, **settings), on_step=track)
    assert not seen, f"operators that wait for the GPU in a step: {dict(seen)}"
