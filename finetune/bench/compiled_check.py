"""A compiled variant checks itself: its compiled module's gradients against the same module run eagerly, on the inputs of
the run's first training step, with the compile the run already paid for (SD1.5's takes minutes on a GPU).

Why: on a CPU, torch 2.13's inductor computes diffusers' UNet's weight gradients wrong with the loss right to 7 digits
(docs/compiled-training.md), and the bench timed that wrong computation as if it were a speed-up. A compiled row's MFU means
something only where its gradients are the eager step's.

How: `CompiledCheck.installed()` wraps `torch.compile` for the variant's process (accelerate's `prepare` calls it), and the
compiled module records its first call with gradients: its inputs, the autocast state it was called under, and the gradient
its outputs got back from the loss (the step's own: the loss's target, noise and timesteps are in it). `run()` then, after that
step, does one backward through each module: `_orig_mod` eagerly (accelerate's autocast wrapper of the forward included, as
compiled) and the compiled module (refused, not compiled again, should its guards fail), and compares each trained tensor's
gradient: the relative difference |compiled - eager| / max(|compiled|, |eager|) (0 where equal, 1 where one is zero).
A few seconds on a GPU: one eager and one compiled forward and backward, next to a compile of minutes.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

# The largest relative difference of a trained tensor's gradient that still counts as the same gradient, by the precision
# the matmuls run in. Compiling reorders sums and, in bf16/fp16, keeps fused intermediates in fp32 where eager rounds each
# op's output, so the two differ by the rounding of many ops: inductor against eager on the tiny model's cached LoRA in
# bf16 (a CPU, Dec 2 2026), median 0.015 and largest 0.037 over its 64 LoRA tensors; aot_eager 0. TF32 keeps 3 more bits
# than bf16. A compile that loses a gradient (the CPU bug: whole blocks' gradients zero) differs by 1.
TOLERANCES = {"bf16": 0.1, "fp16": 0.1, "tf32": 0.02, "fp32": 1e-3}


def matmul_precision(mixed_precision: str) -> str:
    if mixed_precision != "no":
        return mixed_precision
    return "tf32" if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def relative_difference(compiled: torch.Tensor | None, eager: torch.Tensor | None) -> float:
    """|compiled - eager| / max(|compiled|, |eager|) in norm: 0 where equal, 1 where one is zero (or missing)."""
    if compiled is None and eager is None:
        return 0.0
    compiled = torch.zeros_like(eager) if compiled is None else compiled.double()
    eager = torch.zeros_like(compiled) if eager is None else eager.double()
    scale = max(compiled.norm().item(), eager.norm().item())
    return (compiled - eager).norm().item() / scale if scale > 0 else 0.0


@dataclass
class RecordedCall:
    args: tuple
    kwargs: dict
    autocast: dict[str, tuple[bool, torch.dtype]]  # device type -> (enabled, dtype) when it was called
    output_gradients: dict[int, torch.Tensor] = field(default_factory=dict)  # position among the flattened outputs -> gradient


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in devices}


def as_called(state: dict[str, tuple[bool, torch.dtype]]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device, (enabled, dtype) in state.items():
        stack.enter_context(torch.autocast(device_type=device, dtype=dtype, enabled=enabled))
    return stack


def kept(value: Any) -> Any:
    """A copy of an input as it was (the caller may change it in place), its requires_grad kept: dynamo guards on it."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


class CompiledCheck:
    def __init__(self) -> None:
        self.compiled: list[tuple[torch.nn.Module, dict]] = []  # (compiled module, torch.compile's options)
        self.calls: dict[int, RecordedCall] = {}  # by position in self.compiled

    @contextlib.contextmanager
    def installed(self):
        """torch.compile wrapped, for the modules compiled inside (accelerate's `prepare`)."""
        real = torch.compile

        def compile_and_watch(model=None, *args, **kwargs):
            compiled = real(model, *args, **kwargs)
            if isinstance(compiled, torch.nn.Module) and hasattr(compiled, "_orig_mod"):
                self.watch(compiled, kwargs)
            return compiled

        torch.compile = compile_and_watch
        try:
            yield self
        finally:
            torch.compile = real

    def watch(self, compiled: torch.nn.Module, options: dict) -> None:
        """Record the compiled module's first call made with gradients. The hook runs outside the compiled graph (on the
        wrapper, not the module dynamo traces) and removes itself: the timed steps run without it."""
        index = len(self.compiled)
        self.compiled.append((compiled, {key: options.get(key) for key in ("backend", "mode")}))

        def record(module, args, kwargs, output) -> None:
            if not torch.is_grad_enabled():  # validation's forwards
                return
            handle.remove()
            call = self.calls[index] = RecordedCall(tree_map(kept, args), tree_map(kept, kwargs), autocast_state())
            for position, tensor in enumerate(tree_flatten(output)[0]):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(lambda gradient, position=position: call.output_gradients.__setitem__(position, gradient.detach()))

        handle = compiled.register_forward_hook(record, with_kwargs=True)

    def run(self, mixed_precision: str) -> dict:
        """The compiled modules' gradients against eager's, on the recorded step: the bench row's `compiled_check`."""
        started = time.perf_counter()
        precision = matmul_precision(mixed_precision)
        tolerance = TOLERANCES[precision]
        if not self.calls:
            return {"error": "no compiled module was called with gradients: nothing to check"}
        differences: dict[str, float] = {}
        outputs = []
        for index, call in self.calls.items():
            compiled, options = self.compiled[index]
            prefix = f"{type(compiled._orig_mod).__name__}." if len(self.calls) > 1 else ""
            if not call.output_gradients:
                return {"error": f"no gradient reached {type(compiled._orig_mod).__name__}'s outputs in its first step"}
            named = [(name, p) for name, p in compiled._orig_mod.named_parameters() if p.requires_grad]
            eager_out, eager = self.gradients(compiled._orig_mod, call, named)
            try:
                if torch.cuda.is_available():
                    torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the training step's outputs are not this call's
                with torch.compiler.set_stance("fail_on_recompile"):  # a compile of minutes would eat the run's deadline
                    compiled_out, compiled_grads = self.gradients(compiled, call, named)
            except Exception as error:  # noqa: BLE001 - the row says why, and the variant's timing goes on
                return {"error": f"the compiled module could not be run again on its first step's inputs: {type(error).__name__}: {error}".splitlines()[0]}
            outputs += [relative_difference(c, e) for c, e in zip(compiled_out, eager_out)]
            for (name, _), c, e in zip(named, compiled_grads, eager):
                differences[prefix + name] = relative_difference(c, e)
            backend, mode = options["backend"], options["mode"]
        worst = max(differences, key=differences.get)
        off = sorted((name for name, value in differences.items() if value > tolerance), key=differences.get, reverse=True)
        return {
            "backend": backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__),
            "mode": mode,
            "precision": precision,
            "tolerance": tolerance,
            "tensors": len(differences),
            "tensors_off": len(off),
            "largest_relative_difference": differences[worst],
            "median_relative_difference": statistics.median(differences.values()),
            "worst_tensors": off[:5] if off else [worst],
            "output_relative_difference": max(outputs),
            "gradients_agree": not off,
            "seconds": round(time.perf_counter() - started, 2),
        }

    @staticmethod
    def gradients(module: torch.nn.Module, call: RecordedCall, named: list) -> tuple[list, list]:
        """(outputs that got a gradient, the trained tensors' gradients) of one forward and backward of `module` on the call,
        the backward fed the gradients the step's loss gave the outputs."""
        with as_called(call.autocast):
            flat = tree_flatten(module(*call.args, **call.kwargs))[0]
        pairs = [(flat[position], gradient) for position, gradient in sorted(call.output_gradients.items())]
        grads = torch.autograd.grad([o for o, _ in pairs], [p for _, p in named], [g for _, g in pairs], allow_unused=True)
        return [o.detach().float().clone() for o, _ in pairs], [None if g is None else g.detach().float().clone() for g in grads]
