"""Stable Diffusion on this machine's GPU: generation (UNet it/s and images/s) across dtypes,
attention kernels, batch sizes and torch.compile, and DreamBooth training steps/s with 8-bit AdamW
and gradient checkpointing. Writes one PipelineResult (atelier.bench.results) for `atelier report`.

What is timed:
- generate: the denoising loop of one request as the pipeline runs it: `--iters` steps (25, the
  API's default), each one UNet call on the doubled batch of classifier-free guidance (prompt and
  empty prompt), the guidance mix and one DDIM scheduler step. Latents and text embeddings are random
  tensors of the right shape; the text encoder and the VAE do not run. it/s is therefore the UNet
  loop's figure, the one published SD benchmarks quote, and images/s is `batch` images over the
  loop alone (VAE decoding would come on top).
- train: one DreamBooth step of the whole UNet (noise-prediction MSE loss on noised random
  latents, backward, gradient clipping, optimizer step) with float32 weights under autocast (fp16
  with a gradient scaler on CUDA, bf16 on CPU), batch 1, as the training job runs it.

The architecture is the real one, from the configs in atelier.models.builtin (those
atelier.bench.roofline counts FLOPs from), with random weights built directly on the device:
nothing is downloaded, and neither speed nor memory depends on the weights' values. Each
configuration runs `--warmup` untimed repeats (compilation, cuDNN autotuning, allocator growth)
and then `--repeats` timed ones; peak memory is torch.cuda.max_memory_allocated on a GPU and the
process's peak RSS on a CPU, both reset per configuration.

On a GPU machine (the full matrix: fp32/fp16/bf16 x SDPA/xformers x batch 1-16 x eager/compiled,
then training; compilation makes it an hour or more):

    python benchmarks/gpu_sd.py --out bench-results/pipeline-a100.json
    python benchmarks/gpu_sd.py --no-compile --dtypes fp16 --batches 1,4   # a quick look

Without CUDA the same code runs the tiny model at its native 64 px; `--quick` is the small
matrix CI runs (a few seconds of measuring on 2 cores):

    OMP_NUM_THREADS=1 python benchmarks/gpu_sd.py --quick --out /tmp/pipeline-cpu.json

A configuration that cannot run here (xformers without CUDA or not installed, bf16 on a GPU
without it, out of memory, no compiler) is recorded as a row with its `error`, and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import re
import resource
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from atelier.bench import results
from atelier.bench.results import Environment, PipelineResult, PipelineRow, Spread
from atelier.models.builtin import BUILTIN, ModelSpec

MODELS = {"sd15": "sd15", "sd21base": "sd21-base", "tiny": "tiny"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION = ("sdpa", "xformers")
OPTIMIZERS = ("adamw8bit", "adamw")
GUIDANCE = 7.5
# The training job's defaults (TrainConfig); neither changes how long a step takes.
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-6, 1e-2, 1.0


@dataclass(frozen=True)
class Config:
    """One row to measure."""

    task: str  # generate | train
    dtype: str  # the weights' (generate) or autocast's (train)
    attention: str
    batch: int
    compiled: bool = False
    optimizer: str | None = None
    gradient_checkpointing: bool | None = None

    def label(self) -> str:
        if self.task == "train":
            return (f"train    {self.dtype:<4} {self.optimizer:<9} b{self.batch:<2} "
                    f"{'checkpointing' if self.gradient_checkpointing else 'no checkpointing'}")
        return (f"generate {self.dtype:<4} {self.attention:<8} b{self.batch:<2} "
                f"{'compiled' if self.compiled else 'eager'}")


# -- The matrix ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="Result file (default: "
                   "bench-results/pipeline-<gpu or cpu>.json).")
    p.add_argument("--model", choices=["auto", *MODELS], default="auto",
                   help="Architecture; auto: sd15 on CUDA, tiny on CPU.")
    p.add_argument("--batches", type=_ints, help="Images per generation (default 1,2,4,8,16; "
                   "--quick: 1,2).")
    p.add_argument("--dtypes", type=_choices(DTYPES), help="Generation dtypes (default "
                   "fp32,fp16,bf16).")
    p.add_argument("--attention", type=_choices(ATTENTION), help="Attention kernels (default "
                   "sdpa,xformers).")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="Also measure each generation row under torch.compile (default: on CUDA "
                   "yes, on CPU or with --quick no). Eager rows are always measured.")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode (default reduce-overhead: CUDA graphs, as in diffusers' "
                   "guide).")
    p.add_argument("--optimizers", type=_choices(OPTIMIZERS), help="Training optimizers "
                   "(default adamw8bit,adamw), each with and without gradient checkpointing.")
    p.add_argument("--iters", type=int, help="Denoising steps per generation (default 25; "
                   "--quick: 3).")
    p.add_argument("--train-iters", type=int, help="Training steps per repeat (default 10; "
                   "--quick: 3).")
    p.add_argument("--repeats", type=int, help="Timed repeats per configuration (default 3).")
    p.add_argument("--warmup", type=int, help="Untimed repeats first (default 1).")
    p.add_argument("--quick", action="store_true", help="The minimal matrix, for CI on a CPU.")
    p.add_argument("--skip-train", action="store_true", help="Measure generation only.")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(batches=[1, 2] if quick else [1, 2, 4, 8, 16], dtypes=list(DTYPES),
                    attention=list(ATTENTION), optimizers=list(OPTIMIZERS),
                    iters=3 if quick else 25, train_iters=3 if quick else 10,
                    repeats=3, warmup=1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("iters", "train_iters", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batches must be at least 1: {text!r}")
    return values


def _choices(allowed) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown) or text!r}: choose from "
                                             f"{', '.join(allowed)}")
        return values
    return parse


def plan(args: argparse.Namespace, cuda: bool) -> list[Config]:
    """Generation grouped by dtype (one model built per dtype), then training."""
    compile_too = (cuda and not args.quick) if args.compile is None else args.compile
    configs = [Config("generate", dtype, attention, batch, compiled)
               for dtype in args.dtypes for attention in args.attention
               for compiled in ((False, True) if compile_too else (False,))
               for batch in sorted(args.batches)]
    if not args.skip_train:
        amp = "fp16" if cuda else "bf16"
        configs += [Config("train", amp, "sdpa", 1, optimizer=optimizer, gradient_checkpointing=gc)
                    for optimizer in args.optimizers for gc in (False, True)]
    return configs


# -- Models and the timed work ---------------------------------------------------------------------


def build_unet(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Any:
    """The architecture with seeded random weights, initialised where it runs: no host copy of
    SD 1.5's 3.4 GB of float32 weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with device:
        # An nn.Module, which diffusers' partial types hide from mypy.
        unet = cast(torch.nn.Module, UNet2DConditionModel(**spec.unet))
    return unet.to(dtype)


def set_attention(unet: Any, attention: str) -> None:
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def latent_side(spec: ModelSpec) -> int:
    # The VAE halves the image side at each of its blocks but the last.
    return spec.resolution // 2 ** (len(spec.vae["block_out_channels"]) - 1)


def generation(unet: Any, spec: ModelSpec, batch: int, iters: int, device: torch.device,
               dtype: torch.dtype) -> Callable[[], None]:
    """One request's denoising loop, as StableDiffusionPipeline runs it after encoding the prompt."""
    from diffusers import DDIMScheduler

    # DDIM calls the UNet once per step. PNDM, the built-ins' default, calls it once more per
    # generation (its first step twice), which would count as a step that is not one.
    scheduler = DDIMScheduler.from_config(spec.scheduler)
    side = latent_side(spec)
    start = torch.randn(batch, spec.unet["in_channels"], side, side, device=device, dtype=dtype)
    # The prompt's and the empty prompt's embeddings, as CLIP's last hidden state is shaped.
    text = torch.randn(2 * batch, spec.text["max_position_embeddings"],
                       spec.unet["cross_attention_dim"], device=device, dtype=dtype)

    def run() -> None:
        scheduler.set_timesteps(iters, device=device)
        latents = start * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            both = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(both, t, encoder_hidden_states=text).sample.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample

    return run


def make_optimizer(name: str, params: list[torch.nn.Parameter], on_gpu: bool) -> torch.optim.Optimizer:
    """The training job's own optimizer (atelier_jobs.dreambooth.make_optimizer), chosen by name."""
    from atelier.training.config import TrainConfig
    from atelier_jobs.dreambooth import make_optimizer as job_optimizer

    cfg = TrainConfig(use_8bit_adam=name == "adamw8bit", learning_rate=LEARNING_RATE,
                      adam_weight_decay=WEIGHT_DECAY)
    return job_optimizer(cfg, on_gpu, params)


def training(spec: ModelSpec, cfg: Config, iters: int, device: torch.device) -> Callable[[], None]:
    """`iters` DreamBooth steps of the whole UNet, as the training job's loop runs them."""
    from diffusers import DDPMScheduler

    amp = DTYPES[cfg.dtype]
    unet = build_unet(spec, device, torch.float32)  # trained weights stay float32 (see the job)
    set_attention(unet, cfg.attention)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = list(unet.parameters())
    optimizer = make_optimizer(cfg.optimizer or "adamw", params, device.type == "cuda")
    # fp16's narrow range underflows small gradients unless the loss is scaled; bf16 needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    scheduler = DDPMScheduler.from_config(spec.scheduler)
    side = latent_side(spec)
    latents = torch.randn(cfg.batch, spec.unet["in_channels"], side, side, device=device)
    hidden = torch.randn(cfg.batch, spec.text["max_position_embeddings"],
                         spec.unet["cross_attention_dim"], device=device)

    def run() -> None:
        for _ in range(iters):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,),
                                      device=device)
            with torch.autocast(device.type, dtype=amp):
                pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
                loss = F.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    return run


# -- Measuring -------------------------------------------------------------------------------------


def timed(run: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each timed repeat. The GPU runs asynchronously: a repeat ends when it is done."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's since it started


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes there, KiB on Linux


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cannot_run(cfg: Config, device: torch.device) -> str | None:
    """Why a configuration cannot run on this machine, known before trying."""
    if cfg.attention == "xformers":
        if device.type != "cuda":
            return "xformers needs CUDA"
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "xformers not installed"
    if device.type == "cuda" and cfg.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return "bf16 not supported by this GPU"
    return None


def error_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError | MemoryError):
        return "out of memory"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


class Runner:
    """Measures configurations in order, holding one generation model (per dtype) at a time."""

    def __init__(self, spec: ModelSpec, model: str, device: torch.device, args: argparse.Namespace):
        self.spec, self.model, self.device, self.args = spec, model, device, args
        self._unet: Any = None
        self._unet_dtype: str | None = None
        self._oom: set[tuple] = set()  # configurations (but the batch) that ran out of memory

    def measure(self, cfg: Config) -> PipelineRow:
        side = self.spec.resolution
        row = dict(task=cfg.task, model=self.model, device=self.device.type, dtype=cfg.dtype,
                   attention=cfg.attention, batch=cfg.batch, height=side, width=side,
                   compiled=cfg.compiled, optimizer=cfg.optimizer,
                   gradient_checkpointing=cfg.gradient_checkpointing)
        family = (cfg.task, cfg.dtype, cfg.attention, cfg.compiled, cfg.optimizer,
                  cfg.gradient_checkpointing)
        # A batch that ran out of memory means every larger one would too: not worth the minutes.
        reason = cannot_run(cfg, self.device) or ("out of memory (at a smaller batch)"
                                                  if family in self._oom else None)
        if reason:
            return PipelineRow(**row, it_s=None, error=reason)
        error = None
        try:
            seconds, peak = self._run(cfg)
        except Exception as e:  # recorded, and the next configuration runs
            error = error_text(e)
        finally:
            if cfg.compiled:
                torch._dynamo.reset()
            free(self.device)
        if error is not None:
            if error == "out of memory":
                self._oom.add(family)
            return PipelineRow(**row, it_s=None, error=error)
        iters = self.args.iters if cfg.task == "generate" else self.args.train_iters
        images = Spread.of([cfg.batch / s for s in seconds]) if cfg.task == "generate" else None
        return PipelineRow(**row, it_s=Spread.of([iters / s for s in seconds]),
                           images_per_s=images, peak_memory_mb=round(peak, 1))

    def _run(self, cfg: Config) -> tuple[list[float], float]:
        args, device = self.args, self.device
        if cfg.task == "train":
            self._drop_unet()  # training builds its own float32 copy
            reset_peak(device)
            run = training(self.spec, cfg, args.train_iters, device)
            return timed(run, args.warmup, args.repeats, device), peak_mb(device)
        unet = self._generation_unet(cfg.dtype)
        set_attention(unet, cfg.attention)
        reset_peak(device)
        model = torch.compile(unet, mode=args.compile_mode) if cfg.compiled else unet
        run = generation(model, self.spec, cfg.batch, args.iters, device, DTYPES[cfg.dtype])
        with torch.no_grad():
            seconds = timed(run, args.warmup, args.repeats, device)
        return seconds, peak_mb(device)

    def _generation_unet(self, dtype: str) -> Any:
        if self._unet_dtype != dtype:
            self._drop_unet()
            self._unet = build_unet(self.spec, self.device, DTYPES[dtype]).eval()
            self._unet_dtype = dtype
        return self._unet

    def _drop_unet(self) -> None:
        self._unet, self._unet_dtype = None, None
        free(self.device)


def summary(rows: list[PipelineRow]) -> str:
    """The rows as a fixed-width table."""
    head = (f"{'task':<8} {'dtype':<5} {'attention':<9} {'batch':>5} {'compiled':<8} "
            f"{'optimizer':<9} {'ckpt':<4} {'it/s':>8} {'(low-high)':<17} {'img/s':>7} "
            f"{'peak MB':>9}  error")
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = "" if r.it_s is None else f"({_fig(r.it_s.low)}-{_fig(r.it_s.high)})"
        lines.append(
            f"{r.task:<8} {r.dtype:<5} {r.attention:<9} {r.batch:>5} {'yes' if r.compiled else 'no':<8} "
            f"{r.optimizer or '-':<9} "
            f"{'-' if r.gradient_checkpointing is None else 'yes' if r.gradient_checkpointing else 'no':<4} "
            f"{'' if r.it_s is None else _fig(r.it_s.median):>8} {spread:<17} "
            f"{_fig(r.images_per_s.median) if r.images_per_s else '':>7} "
            f"{'' if r.peak_memory_mb is None else f'{r.peak_memory_mb:.0f}':>9}  {r.error or ''}")
    return "\n".join(lines)


def _fig(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def default_out(device: torch.device) -> Path:
    if device.type != "cuda":
        return Path("bench-results/pipeline-cpu.json")
    name = torch.cuda.get_device_name(0).lower().removeprefix("nvidia").strip()
    return Path(f"bench-results/pipeline-{re.sub(r'[^a-z0-9]+', '-', name).strip('-')}.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from atelier.models.libraries import quiet_libraries

    quiet_libraries()
    # Before the first progress line: bitsandbytes, which diffusers loads here, prints on import.
    from diffusers import UNet2DConditionModel  # noqa: F401

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = args.model if args.model != "auto" else ("sd15" if cuda else "tiny")
    spec = BUILTIN[MODELS[model]]
    configs = plan(args, cuda)
    out = args.out or default_out(device)
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{model} at {spec.resolution} px on {where}: {len(configs)} configurations -> {out}",
          file=sys.stderr, flush=True)

    runner = Runner(spec, model, device, args)
    rows: list[PipelineRow] = []
    t0 = time.monotonic()
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.label()} ...", end=" ", file=sys.stderr, flush=True)
        row = runner.measure(cfg)
        rows.append(row)
        if row.it_s is None:
            shown = f"error: {row.error}"
        else:
            shown = f"{_fig(row.it_s.median)} it/s"
            if row.images_per_s:
                shown += f", {_fig(row.images_per_s.median)} img/s"
            shown += f", {row.peak_memory_mb:.0f} MB"
        print(shown, file=sys.stderr, flush=True)

    notes = [
        f"generate: {args.iters} denoising steps per repeat, UNet on the doubled batch of "
        "classifier-free guidance plus the DDIM scheduler step; random latents and text "
        "embeddings (no text encoder, no VAE decode in the figures); images_per_s = batch / "
        "seconds per repeat.",
        f"train: {args.train_iters} steps per repeat; whole UNet, float32 weights under autocast "
        f"in the row's dtype; SDPA attention.",
        f"{args.warmup} warm-up repeat(s) left out, {args.repeats} timed; compile mode "
        f"{args.compile_mode}.",
        f"peak_memory_mb: {'torch.cuda.max_memory_allocated' if cuda else 'peak RSS of the process'}"
        ", reset per configuration.",
    ]
    if cuda:
        notes.append(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
                     f"cuDNN {torch.backends.cudnn.allow_tf32} (torch's defaults unless changed).")
    result = PipelineResult(environment=Environment.capture(),
                            command=shlex.join(["python", *sys.argv]), notes=notes, rows=rows)
    results.save(result, out)
    print(summary(rows))
    print(f"\n{len(rows)} rows ({sum(r.error is not None for r in rows)} could not run here) in "
          f"{time.monotonic() - t0:.0f} s, written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
