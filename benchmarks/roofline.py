"""The roofline of one SD UNet step on each GPU pool, and the estimate calibrated on one published
it/s figure: its predictions of the others, their errors, and the bounds.

Nothing runs on a GPU: FLOPs, bytes and kernel launches are counted on torch's meta device from the
built-in sd15 / sd21-base configs; peaks come from atelier/bench/gpus.yaml; the published figures
and the host cost per kernel from atelier/bench/roofline.py, each with its source. Goal (issue 11):
every prediction within 25 % of its figure.

    .venv/bin/python benchmarks/roofline.py [--model sd15] [--batch 1]
"""

from __future__ import annotations

import argparse
import time

from atelier.bench import roofline as rl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=["sd15", "sd21-base"],
                        help="architecture of the cost table (the published figures are sd15)")
    parser.add_argument("--batch", type=int, default=1, help="images per step, with guidance")
    args = parser.parse_args()

    import diffusers  # noqa: F401  (imported first, so the time below is the count's alone)

    start = time.perf_counter()
    cost = rl.unet_step_cost(args.model, args.batch, cfg=True)
    counted_s = time.perf_counter() - start
    print(f"{args.model}, {args.batch} image(s) at native size with classifier-free guidance "
          f"(UNet batch {cost.unet_batch}), counted on the meta device in {counted_s:.1f} s:")
    print(f"  {cost.flops / 1e12:.3f} TFLOP per step, {cost.params / 1e6:.1f} M parameters, "
          f"{cost.bytes / 1e9:.2f} GB moved at least (fp16 weights once), "
          f"{cost.kernels} kernels launched")
    print()
    print(f"{'GPU':<6} {'peak TFLOPS':>11} {'GB/s':>6} {'compute ms':>10} {'weights ms':>10} "
          f"{'bound it/s':>10}  variant")
    for name, spec in rl.gpus().items():
        print(f"{name:<6} {spec.peak_fp16_tensor_tflops.value:>11g} "
              f"{spec.memory_bandwidth_gb_s.value:>6g} {cost.flops / spec.peak_flops * 1e3:>10.2f} "
              f"{cost.bytes / spec.bandwidth * 1e3:>10.2f} {1 / rl.roofline_s(cost, spec):>10.1f}"
              f"  {spec.variant}")
    print()

    estimate = rl.calibrated()
    sd15 = rl.figure(rl.CALIBRATION).cost()
    print(f"Estimate, calibrated on {rl.CALIBRATION!r}: efficiency {estimate.efficiency:.3f} of "
          f"peak; host overhead {sd15.kernels} kernels x "
          f"{estimate.host_s_per_kernel * 1e6:.1f} us = "
          f"{estimate.overhead_s(sd15, compiled=False) * 1e3:.2f} ms per eager step, "
          f"{estimate.compiled_overhead_s * 1e3:g} ms compiled")
    print(f"  host cost per kernel = {rl.DISPATCH_S * 1e6:g} us dispatch + "
          f"{rl.LAUNCH_S * 1e6:g} us launch (sources in atelier/bench/roofline.py)")
    print()
    rows = rl.table(estimate)
    print(rl.format_table(rows))
    worst = max(abs(r.error_pct) for r in rows)
    print(f"worst error {worst:.1f} % (goal: within {rl.TOLERANCE:.0%}): "
          f"{'met' if worst <= rl.TOLERANCE * 100 else 'NOT met'}")
    print(f"source of the figures: {rl.DIFFUSERS_BENCHMARK}")
    print()

    print("Sensitivity to the host cost per kernel (recalibrated each time):")
    for host_us in (0, 5, 10, rl.HOST_S_PER_KERNEL * 1e6, 20, 25):
        again = rl.calibrated(host_s_per_kernel=host_us * 1e-6)
        errors = ", ".join(f"{r.figure} {r.error_pct:+.0f} %" for r in rl.table(again)
                           if not r.calibration)
        print(f"  {host_us:4.1f} us: efficiency {again.efficiency:.3f}; {errors}")
    print()

    eager = [rl.figure("T4 eager"), rl.figure("A100 eager")]
    three = [*eager, rl.figure("A100 torch.compile")]
    for label, figures in (("T4 + A100 eager", eager), ("+ A100 compiled", three)):
        _, without = rl.best_single_efficiency(figures, 0.0)
        _, with_overhead = rl.best_single_efficiency(figures, rl.HOST_S_PER_KERNEL)
        print(f"Best single efficiency over {label}: worst error {without:.1%} without the host "
              f"overhead, {with_overhead:.1%} with it")


if __name__ == "__main__":
    main()
