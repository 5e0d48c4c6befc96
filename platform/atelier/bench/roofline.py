"""How fast one Stable Diffusion UNet step can run on a GPU pool: the roofline (a physical lower
bound), and an estimate that adds what a roofline leaves out, calibrated on one published figure and
checked against the others.

- `unet_step_cost`: FLOPs, bytes and kernel launches of one UNet forward, counted on torch's meta
  device from a built-in architecture's config (nothing allocated, nothing downloaded).
- `roofline_s`: max(FLOPs / peak tensor throughput, bytes / memory bandwidth) on a GPU of gpus.yaml.
- `Estimate`: achieved compute (a fraction `efficiency` of peak) plus a per-step host overhead
  (kernels launched x host time per launch), which torch.compile's CUDA graphs remove.
- `table`: each published figure, its prediction, the error and the roofline bound.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import cast

from pydantic import BaseModel, ConfigDict, Field

from atelier import config_file
from atelier.bench import shipped
from atelier.errors import InvalidInput

# -- GPU specs (gpus.yaml) -------------------------------------------------------------------------


class Sourced(BaseModel):
    """One figure from a datasheet, with where and when it was read."""

    model_config = ConfigDict(extra="forbid")

    value: float = Field(gt=0)
    source: str = Field(min_length=1, description="Where the figure is published.")
    read: date = Field(description="When it was read.")
    note: str | None = Field(None, description="What exactly the source prints.")
    via: str | None = Field(None, description="The pages that quote the source, where it was read "
                            "through them.")


class GpuSpec(BaseModel):
    """Peak figures of one GPU, keyed in gpus.yaml by Ray's accelerator name."""

    model_config = ConfigDict(extra="forbid")

    name: str
    variant: str = Field(description="Which variant (memory, form factor) the figures are of.")
    peak_fp16_tensor_tflops: Sourced = Field(description="Dense FP16 tensor-core TFLOPS, no "
                                             "sparsity.")
    memory_bandwidth_gb_s: Sourced = Field(description="Peak DRAM bandwidth, GB/s.")
    memory_gb: Sourced

    @property
    def peak_flops(self) -> float:
        return self.peak_fp16_tensor_tflops.value * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.memory_bandwidth_gb_s.value * 1e9


def load_gpus(path: Path | None = None) -> dict[str, GpuSpec]:
    """The GPU specs at `path`, or the ones shipped in this package."""
    path = path or shipped("gpus.yaml")
    data = config_file.read_mapping(path, "GPU specs")
    return {str(name): config_file.validate(GpuSpec, spec, where=f"{path}: {name}")
            for name, spec in data.items()}


@functools.cache
def gpus() -> dict[str, GpuSpec]:
    """The shipped GPU specs, read once."""
    return load_gpus()


def gpu(name: str) -> GpuSpec:
    """The shipped spec of a GPU by Ray's accelerator name (a pool's ray_accelerator_type)."""
    found = gpus().get(name)
    if found is None:
        raise InvalidInput(f"no GPU spec for {name!r}: gpus.yaml has {', '.join(gpus())}",
                           where="gpu")
    return found


# -- What one UNet step costs ----------------------------------------------------------------------

FP16_BYTES = 2


@dataclass(frozen=True)
class StepCost:
    """One UNet forward, as counted on the meta device.

    flops: 2 x multiply-adds of the convolutions, matmuls and attention (torch's FlopCounterMode
      formulas); norms, activations and adds are not counted (they run on CUDA cores, not tensor
      cores, and are memory-bound).
    bytes: a lower bound on DRAM traffic: the fp16 weights read once, the inputs read once and the
      output written once. It leaves out every intermediate activation (each eager op reads its
      inputs from and writes its output to DRAM; even a fused graph spills the skip connections),
      so real traffic is several times this. The bound stays a bound, which is all a roofline needs.
    kernels: aten ops that launch GPU work, the unit of eager host overhead (views and other
      metadata-only ops excluded; attention counted as the one fused kernel the GPUs run).
    """

    flops: float
    bytes: float
    kernels: int
    params: int
    unet_batch: int


def unet_step_cost(model: str = "sd15", batch: int = 1, height: int | None = None,
                   width: int | None = None, *, cfg: bool) -> StepCost:
    """One UNet step generating `batch` images of height x width (the model's native size when
    unset). With classifier-free guidance (`cfg`) the UNet runs the prompt and the empty prompt in
    one batch, so it sees 2 x batch. Counting takes about a second; results are cached."""
    from atelier.models.builtin import BUILTIN

    spec = BUILTIN.get(model)
    if spec is None:
        raise InvalidInput(f"unknown built-in model {model!r}; built-in models: "
                           f"{', '.join(BUILTIN)}", where="model")
    if batch < 1:
        raise InvalidInput(f"batch must be at least 1, not {batch}", where="batch")
    height, width = height or spec.resolution, width or spec.resolution
    # The VAE halves the side at each block but the last; the UNet halves the latent likewise.
    vae_factor = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    multiple = vae_factor * 2 ** (len(spec.unet["block_out_channels"]) - 1)
    for side, value in (("height", height), ("width", width)):
        if value % multiple:
            raise InvalidInput(f"{model} needs sides that are multiples of {multiple}, not "
                               f"{value}", where=side)
    return _count(model, batch * (2 if cfg else 1), height // vae_factor, width // vae_factor)


@functools.cache
def _count(model: str, unet_batch: int, latent_h: int, latent_w: int) -> StepCost:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from atelier.models.builtin import BUILTIN
    from atelier.models.libraries import quiet_libraries

    quiet_libraries()
    FusedAttention, KernelCounter = _modes()
    spec = BUILTIN[model]
    with torch.device("meta"):  # shapes only: 3.4 GB of fp32 weights never allocated
        # An nn.Module, which diffusers' partial types hide from mypy.
        unet = cast(torch.nn.Module, UNet2DConditionModel(**spec.unet))
    unet = unet.to(torch.float16).eval()
    half = torch.float16
    sample = torch.empty(unet_batch, spec.unet["in_channels"], latent_h, latent_w, device="meta",
                         dtype=half)
    text = torch.empty(unet_batch, spec.text["max_position_embeddings"],
                       spec.unet["cross_attention_dim"], device="meta", dtype=half)
    timestep = torch.empty(unet_batch, device="meta", dtype=torch.int64)
    with torch.no_grad(), FusedAttention(), FlopCounterMode(display=False) as flops, \
            KernelCounter() as kernels:
        out = unet(sample, timestep, encoder_hidden_states=text).sample
    params = sum(p.numel() for p in unet.parameters())
    io = sum(t.numel() * t.element_size() for t in (sample, text, timestep, out))
    return StepCost(flops=float(flops.get_total_flops()), bytes=float(params * FP16_BYTES + io),
                    kernels=kernels.count, params=params, unet_batch=unet_batch)


@functools.cache
def _modes() -> tuple[type, type]:
    """The two torch modes of the count (defined here: torch is imported only when counting)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class FusedAttention(TorchFunctionMode):
        """Runs scaled_dot_product_attention as the one fused kernel a T4 or an A100 runs
        (memory-efficient attention; flash on the A100 is one kernel of the same FLOPs too). On the
        meta device torch would take its CPU math path instead: upcasts, copies, two bmm and a
        softmax, 13 ops where a GPU launches one."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                query, key, value = args[:3]
                bias = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                return aten._scaled_dot_product_efficient_attention(
                    query, key, value, bias, False, 0.0, bool(kwargs.get("is_causal", False)),
                    scale=kwargs.get("scale"))[0]
            return func(*args, **kwargs)

    class KernelCounter(TorchDispatchMode):
        """Counts the aten ops that reach the backend and launch GPU work. Views (and
        _unsafe_view, a reshape without a copy) only rewrite shape and strides: no kernel."""

        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not (func.is_view or func.overloadpacket in (aten._unsafe_view, aten.empty,
                                                             aten.empty_strided)):
                self.count += 1
            return func(*args, **(kwargs or {}))

    return FusedAttention, KernelCounter


def roofline_s(cost: StepCost, gpu: GpuSpec) -> float:
    """The physical lower bound on one step: no GPU computes faster than its peak or reads its
    weights faster than its bandwidth."""
    return max(cost.flops / gpu.peak_flops, cost.bytes / gpu.bandwidth)


# -- The estimate: what a roofline leaves out -------------------------------------------------------

# Host time per kernel in eager PyTorch, which the GPU waits for whenever kernels finish faster than
# the host issues them (SD at batch 1-2 on an A100). Two parts, each from a published figure:
DISPATCH_S = 2e-6
"""Python binding and ATen dispatch of one torch call: "Overhead for torch functions when run on
torch.Tensor objects is on the order of 2 microseconds" (PyTorch's own benchmark,
https://github.com/pytorch/pytorch/tree/v1.11.0/benchmarks/overrides_benchmark, README; read
2026-11-30)."""
LAUNCH_S = 12.5e-6
"""cudaLaunchKernel on the host: "Usually, the launch time on the CPU side is between 5-20
microseconds" (Holistic Trace Analysis, kernel launch statistics,
https://github.com/facebookresearch/HolisticTraceAnalysis/blob/main/docs/source/features/cuda_kernel_launch_stats.rst
and PyTorch's HTA tutorial; read 2026-11-30): the middle of that range, taken before any fit."""
HOST_S_PER_KERNEL = DISPATCH_S + LAUNCH_S
COMPILED_OVERHEAD_S = 0.0
"""torch.compile(mode="reduce-overhead") replays the whole UNet as one CUDA graph: one launch of a
few microseconds per step instead of one per kernel, so nothing worth modelling is left."""


@dataclass(frozen=True)
class Estimate:
    """One step = achieved device time + host overhead.

    efficiency: the fraction of peak tensor throughput SD's convolutions and attention reach, with
      everything a roofline ignores folded in (memory-bound norms and activations, tile
      quantisation, kernels too small to fill the GPU). Calibrated, not assumed.
    host_s_per_kernel: host time per launched kernel in eager mode (DISPATCH_S + LAUNCH_S).
    compiled_overhead_s: what is left of the host overhead under torch.compile's CUDA graphs.

    The two are added, not overlapped: a simplification that holds where many kernels are shorter
    than their launch (the GPU idles through them), and overstates the overhead where long kernels
    would hide it. On a T4 the overhead is a small part of the step either way.
    """

    efficiency: float
    host_s_per_kernel: float = HOST_S_PER_KERNEL
    compiled_overhead_s: float = COMPILED_OVERHEAD_S

    def overhead_s(self, cost: StepCost, *, compiled: bool) -> float:
        return self.compiled_overhead_s if compiled else cost.kernels * self.host_s_per_kernel

    def device_s(self, cost: StepCost, gpu: GpuSpec) -> float:
        return max(cost.flops / (self.efficiency * gpu.peak_flops), cost.bytes / gpu.bandwidth)

    def step_s(self, cost: StepCost, gpu: GpuSpec, *, compiled: bool) -> float:
        return self.device_s(cost, gpu) + self.overhead_s(cost, compiled=compiled)

    @classmethod
    def calibrate(cls, step_s: float, cost: StepCost, gpu: GpuSpec, *, compiled: bool,
                  host_s_per_kernel: float = HOST_S_PER_KERNEL,
                  compiled_overhead_s: float = COMPILED_OVERHEAD_S) -> Estimate:
        """The efficiency at which this estimate gives exactly the measured `step_s`."""
        partial = cls(1.0, host_s_per_kernel, compiled_overhead_s)
        device_s = step_s - partial.overhead_s(cost, compiled=compiled)
        if device_s <= cost.bytes / gpu.bandwidth:
            raise InvalidInput(f"a step of {step_s * 1e3:.1f} ms leaves {device_s * 1e3:.1f} ms "
                               "after the host overhead, less than reading the weights takes",
                               where="step_s")
        return cls(cost.flops / (gpu.peak_flops * device_s), host_s_per_kernel,
                   compiled_overhead_s)


# -- Published figures: calibration and predictions ------------------------------------------------

DIFFUSERS_BENCHMARK = (
    "https://github.com/huggingface/diffusers/blob/2c529b75bbd25e4c69348bbabd0a1a842d540193/docs/"
    "source/en/optimization/torch2.0.md (also https://huggingface.co/docs/diffusers/v0.17.0/en/"
    "optimization/torch2.0), Benchmark, tables 'T4 (batch size: 1)' and 'A100 (batch size: 1)', "
    "row 'SD - txt2img', columns 'torch 2.0 - no compile' / 'torch 2.0 - compile'")


@dataclass(frozen=True)
class Published:
    """A published it/s figure of the SD 1.5 text-to-image denoising loop.

    The diffusers benchmark: runwayml/stable-diffusion-v1-5 in fp16, 512x512, the pipeline's defaults
    (50 steps, guidance 7.5: classifier-free guidance, so the UNet sees batch 2), the UNet in
    channels_last; "compile" is torch.compile(unet, mode="reduce-overhead", fullgraph=True), CUDA
    graphs included. PyTorch 2.0, diffusers 0.17.0.dev0. The A100's variant is not stated.
    """

    name: str
    gpu: str
    compiled: bool
    it_s: float
    model: str = "sd15"
    batch: int = 1
    cfg: bool = True
    source: str = DIFFUSERS_BENCHMARK
    read: date = date(2026, 11, 30)

    @property
    def step_s(self) -> float:
        return 1 / self.it_s

    def cost(self) -> StepCost:
        return unet_step_cost(self.model, self.batch, cfg=self.cfg)


FIGURES: tuple[Published, ...] = (
    Published("T4 eager", "T4", compiled=False, it_s=6.9),
    Published("A100 eager", "A100", compiled=False, it_s=21.66),
    Published("A100 torch.compile", "A100", compiled=True, it_s=44.03),
    Published("T4 torch.compile", "T4", compiled=True, it_s=7.3),
)
CALIBRATION = "T4 eager"
"""Calibrate on the T4 eager figure: the most compute-bound of the four (the host overhead is under a
tenth of its step for any host cost in the cited 5-20 us range), so the efficiency it yields depends
least on the one parameter taken from the literature rather than measured here."""
TOLERANCE = 0.25
"""The error allowed on each prediction, in it/s."""


def figure(name: str) -> Published:
    for f in FIGURES:
        if f.name == name:
            return f
    raise InvalidInput(f"no published figure {name!r}: {', '.join(f.name for f in FIGURES)}",
                       where="figure")


def calibrated(calibration: str = CALIBRATION, *,
               host_s_per_kernel: float = HOST_S_PER_KERNEL) -> Estimate:
    """The estimate whose efficiency reproduces the `calibration` figure exactly."""
    f = figure(calibration)
    return Estimate.calibrate(f.step_s, f.cost(), gpu(f.gpu), compiled=f.compiled,
                              host_s_per_kernel=host_s_per_kernel)


@dataclass(frozen=True)
class Row:
    figure: str
    measured_it_s: float
    predicted_it_s: float
    error_pct: float  # (predicted - measured) / measured, in %
    roofline_it_s: float  # the bound: no GPU of this kind can do more
    calibration: bool  # this row fixed the efficiency (its error is 0 by construction)


def table(estimate: Estimate | None = None, figures: Sequence[Published] = FIGURES,
          calibration: str = CALIBRATION) -> list[Row]:
    """Every figure, its prediction by `estimate` (the calibrated one by default), the error and
    the roofline bound."""
    estimate = estimate or calibrated(calibration)
    rows = []
    for f in figures:
        cost, spec = f.cost(), gpu(f.gpu)
        predicted = 1 / estimate.step_s(cost, spec, compiled=f.compiled)
        rows.append(Row(f.name, f.it_s, predicted, (predicted - f.it_s) / f.it_s * 100,
                        1 / roofline_s(cost, spec), f.name == calibration))
    return rows


def best_single_efficiency(figures: Sequence[Published], host_s_per_kernel: float) -> \
        tuple[float, float]:
    """The efficiency that minimises the worst relative error over `figures`, and that error: how
    well any one efficiency can fit them with this host cost per kernel."""
    def worst(efficiency: float) -> float:
        estimate = Estimate(efficiency, host_s_per_kernel)
        return max(abs(1 / estimate.step_s(f.cost(), gpu(f.gpu), compiled=f.compiled) / f.it_s - 1)
                   for f in figures)
    # Predictions rise with efficiency, so the worst error is unimodal in it: a fine scan suffices.
    grid = [i / 10_000 for i in range(10, 10_001)]
    best = min(grid, key=worst)
    return best, worst(best)


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'figure':<20} {'measured':>9} {'predicted':>10} {'error':>8} {'roofline':>9}",
             f"{'':<20} {'it/s':>9} {'it/s':>10} {'%':>8} {'it/s':>9}"]
    for r in rows:
        note = "  (calibration)" if r.calibration else ""
        lines.append(f"{r.figure:<20} {r.measured_it_s:>9.2f} {r.predicted_it_s:>10.2f} "
                     f"{r.error_pct:>+8.1f} {r.roofline_it_s:>9.1f}{note}")
    return "\n".join(lines)


# -- Fine-tuning: a training step from the same model ----------------------------------------------

FIELD_NOTES_DREAMBOOTH = (
    "shared/FIELD_NOTES.md, 'Published reference numbers': DreamBooth, batch 4, 512 px, 8-bit Adam, "
    "fp16, gradient checkpointing (a user report)")


@dataclass(frozen=True)
class PublishedTraining:
    """A published seconds-per-step figure of DreamBooth fine-tuning SD 1.5."""

    name: str
    gpu: str
    s_per_step: float
    batch: int = 4
    source: str = FIELD_NOTES_DREAMBOOTH

    def forward_cost(self) -> StepCost:
        """One UNet forward at the training batch: no classifier-free guidance in training."""
        return unet_step_cost("sd15", self.batch, cfg=False)


TRAINING_FIGURES: tuple[PublishedTraining, ...] = (
    PublishedTraining("T4 DreamBooth", "T4", 3.66),
    PublishedTraining("A100 DreamBooth", "A100", 1.03),
)
TRAINING_CALIBRATION = "T4 DreamBooth"


def training_factor(estimate: Estimate | None = None, calibration: str = TRAINING_CALIBRATION) -> float:
    """A training step over one eager UNet forward at the same batch, on the calibration figure.

    Not 3 (forward + a backward of twice its work): the published step also recomputes the forward
    under gradient checkpointing, encodes the batch with the VAE and the prompts with the text
    encoder, and runs the optimiser over 860 M parameters. None of those is measured apart here,
    so they are one named factor, fitted on one GPU and checked on the other."""
    estimate = estimate or calibrated()
    f = next((t for t in TRAINING_FIGURES if t.name == calibration), None)
    if f is None:
        raise InvalidInput(f"no published training figure {calibration!r}", where="calibration")
    return f.s_per_step / estimate.step_s(f.forward_cost(), gpu(f.gpu), compiled=False)


def train_step_s(gpu_name: str, batch: int = 1, estimate: Estimate | None = None) -> float:
    """ESTIMATE of one DreamBooth training step of SD 1.5 at 512 px on `gpu_name`."""
    estimate = estimate or calibrated()
    forward = estimate.step_s(unet_step_cost("sd15", batch, cfg=False), gpu(gpu_name), compiled=False)
    return training_factor(estimate) * forward


def training_table(estimate: Estimate | None = None) -> list[Row]:
    """Each published training figure and its prediction, in steps/s (the Row of `table`)."""
    estimate = estimate or calibrated()
    rows = []
    for f in TRAINING_FIGURES:
        predicted = 1 / train_step_s(f.gpu, f.batch, estimate)
        bound = 1 / (3 * roofline_s(f.forward_cost(), gpu(f.gpu)))  # forward + backward, at peak
        measured = 1 / f.s_per_step
        rows.append(Row(f.name, measured, predicted, (predicted - measured) / measured * 100,
                        bound, f.name == TRAINING_CALIBRATION))
    return rows
