"""Train steps/s of the DreamBooth Ray job against a plain one-process loop.

The plain loop is written in the reference style of diffusers' examples/dreambooth script (encode
with the VAE and the text encoder every step, one process, one thread). The job runs through the
Jobs API on a private embedded stack (free ports, temporary state, stopped at the end) with
latent/embedding caching off (compared with the same loop in one process using the job's fused
AdamW: the ratio is Ray's overhead) and on (compared with the reference loop: what the job's
caching and kernels buy). Same tiny model, concept images, 64 px, batch 1, lr, steps.

    .venv/bin/python benchmarks/train_overhead.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def plain_loop(concepts_path, concept_name: str, steps: int, lr: float, fused: bool = False) -> float:
    """Steady-state steps/s of a diffusers-example-style loop (after 20 warm-up steps).

    fused=False is the reference (default AdamW); fused=True uses the job's optimizer kernel, so
    that the job-vs-loop ratio with caching off isolates what Ray itself costs."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from atelier.catalogue.schema import ConceptsFile
    from atelier.models import resolve_model
    from atelier_jobs.dreambooth import _load_pixels

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = resolve_model("tiny")
    concept = next(c for c in ConceptsFile.load(concepts_path).concepts if c.name == concept_name)
    pixels = [_load_pixels(i.resolve(concepts_path.parent), 64, True, 0) for i in concept.images]
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2, fused=fused)
    ids = tokenizer([concept.instance_prompt], padding="max_length", max_length=77,
                    truncation=True, return_tensors="pt").input_ids
    unet.train()
    warmup, t0 = 20, 0.0
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        batch = pixels[step % len(pixels)][None]
        latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, t, hidden).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0, foreach=fused)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - warmup) / (time.perf_counter() - t0)


def job(settings, concepts_path, concept_name: str, steps: int, lr: float, cache: bool) -> dict:
    """Run the real training job; steady-state rate from its progress events."""
    from atelier.rayjobs import Jobs
    from atelier.training import events
    from atelier.training.config import TrainConfig
    from atelier.training.submit import submit

    cfg = TrainConfig(max_train_steps=steps, checkpoint_every=steps, learning_rate=lr,
                      cache_latents=cache, model_name=f"bench-{'cache' if cache else 'nocache'}")
    jobs = Jobs(settings)
    t_submit = time.monotonic()
    job_id, _ = submit(settings, concepts_path, cfg, concepts=[concept_name])
    first_step = None
    while True:
        status = jobs.status(job_id)
        logs = jobs.logs(job_id)
        if first_step is None and any(isinstance(events.parse(line), events.Step)
                                      for line in logs.splitlines()):
            first_step = time.monotonic() - t_submit
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.25)
    jobs.raise_for(job_id, status)
    step_events: dict[int, events.Step] = {}  # by step: Ray may forward a worker's line twice
    for line in logs.splitlines():
        if isinstance(e := events.parse(line), events.Step):
            step_events.setdefault(e.step, e)
    logged = list(step_events.values())
    steady = [e.steps_per_s for e in logged[2:] if e.step < steps]  # skip warm-up windows
    return {"steps_per_s": statistics.median(steady), "submit_to_first_step_s": first_step,
            "peak_rss_mb": max(e.max_rss_mb for e in logged)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-6)
    args = parser.parse_args()

    from atelier import stack
    from atelier.catalogue.build import build_concepts
    from atelier.catalogue.synth import synth_shop
    from atelier.models.tokenizer import build_clip_tokenizer
    from atelier.settings import Settings, StackSettings

    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    settings = Settings(home=tmp / "home", stack=StackSettings(**stack.free_ports(), num_cpus=2))
    stack.up(settings)
    try:
        work = settings.home / "bench"
        concepts_path = work / "concepts.yaml"
        concepts, _ = build_concepts(synth_shop(work / "shop"), concepts_path, build_clip_tokenizer())
        name = concepts.concepts[0].name

        plain = plain_loop(concepts_path, name, args.steps, args.lr)
        plain_same_kernels = plain_loop(concepts_path, name, args.steps, args.lr, fused=True)
        plain_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        nocache = job(settings, concepts_path, name, args.steps, args.lr, cache=False)
        cached = job(settings, concepts_path, name, args.steps, args.lr, cache=True)
    finally:
        stack.down(settings)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "steps": args.steps, "resolution": 64, "batch": 1, "model": "tiny",
        "plain_loop_steps_per_s": round(plain, 2),
        "plain_loop_same_kernels_steps_per_s": round(plain_same_kernels, 2),
        "plain_loop_peak_rss_mb": round(plain_rss, 1),
        "ray_job_no_cache_steps_per_s": round(nocache["steps_per_s"], 2),
        "ray_job_cached_steps_per_s": round(cached["steps_per_s"], 2),
        "ray_overhead_pct": round(100 * (1 - nocache["steps_per_s"] / plain_same_kernels), 1),
        "cached_vs_plain_ratio": round(cached["steps_per_s"] / plain, 2),
        "submit_to_first_step_s": round(cached["submit_to_first_step_s"], 1),
        "worker_peak_rss_mb": cached["peak_rss_mb"],
    }
    print(json.dumps(result, indent=2))
    print(f"Ray overhead at steady state (job, no cache, vs the same loop in one process): "
          f"{result['ray_overhead_pct']} % (goal < 10 %)")
    print(f"cached job vs the reference plain loop: {result['cached_vs_plain_ratio']}x (goal >= 1.3x)")


if __name__ == "__main__":
    main()
