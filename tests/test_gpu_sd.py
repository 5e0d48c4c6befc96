"""benchmarks/gpu_sd.py run as a person runs it: the CPU's `--quick` matrix on the tiny model in a
subprocess (about 20 s on 2 cores), its result file read back with atelier.bench.results; and the
two parts of the script no CPU run reaches on its own, the guidance batch and the out-of-memory
handling, checked in-process on the real tiny UNet. With CUDA, a small GPU run too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atelier.bench import results
from atelier.bench.results import PipelineResult, PipelineRow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_sd.py"
QUICK_BATCHES, QUICK_ITERS, QUICK_REPEATS = (1, 2), 3, 3


def _run_script(out: Path, *args: str, cuda: bool = False) -> PipelineResult:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on any machine
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = results.load(out)
    assert isinstance(result, PipelineResult)
    return result


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> PipelineResult:
    return _run_script(tmp_path_factory.mktemp("gpu_sd") / "pipeline-cpu.json", "--quick")


@pytest.fixture(scope="module")
def gpu_sd():
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_sd", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sd"] = module  # dataclasses look their module up while it is executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_sd"]


def test_the_quick_cpu_run_writes_a_pipeline_result_of_this_machine(quick):
    assert quick.kind == "pipeline"
    assert quick.environment.gpu is None
    assert "--quick" in quick.command
    assert {(r.model, r.device, r.height, r.width) for r in quick.rows} == {("tiny", "cpu", 64, 64)}


def test_it_measures_every_generation_configuration_of_the_matrix_and_trains(quick):
    generate = {(r.dtype, r.attention, r.batch) for r in quick.rows if r.task == "generate"}
    assert generate == {(d, a, b) for d in ("fp32", "fp16", "bf16") for a in ("sdpa", "xformers")
                        for b in QUICK_BATCHES}
    assert not any(r.compiled for r in quick.rows)  # compilation takes minutes on 2 cores
    assert any(r.task == "train" for r in quick.rows)


def test_every_figure_is_a_positive_median_within_its_repeats(quick):
    measured = [r for r in quick.rows if r.error is None]
    assert len(measured) >= 6
    for r in measured:
        assert r.it_s.median > 0, r
        assert r.it_s.low <= r.it_s.median <= r.it_s.high, r
        assert r.it_s.repeats == QUICK_REPEATS, r
        assert r.peak_memory_mb and r.peak_memory_mb > 0, r


def test_images_per_second_is_the_batch_over_one_generation_of_iters_steps(quick):
    for r in quick.rows:
        if r.task == "generate" and r.error is None:
            assert r.images_per_s is not None
            # Per repeat: it/s = iters / s and images/s = batch / s; the median of an odd number
            # of repeats is one of them, so the two medians keep that ratio exactly.
            assert r.images_per_s.median == pytest.approx(r.it_s.median * r.batch / QUICK_ITERS)
        if r.task == "train":
            assert r.images_per_s is None


def test_training_runs_with_8bit_adamw_and_with_gradient_checkpointing(quick):
    train = [r for r in quick.rows if r.task == "train"]
    assert all(r.error is None and r.dtype == "bf16" and r.batch == 1 for r in train), train
    cells = {(r.optimizer, r.gradient_checkpointing) for r in train}
    assert ("adamw8bit", True) in cells and ("adamw8bit", False) in cells
    assert ("adamw", False) in cells


def test_a_configuration_that_cannot_run_here_is_a_row_with_its_error_not_a_crash(quick):
    xformers = [r for r in quick.rows if r.attention == "xformers"]
    assert xformers and all(r.error == "xformers needs CUDA" for r in xformers)
    assert all(r.it_s is None and r.images_per_s is None and r.peak_memory_mb is None
               for r in xformers)
    # ... and the run went on past them: rows after the first failure were measured.
    first = quick.rows.index(xformers[0])
    assert any(r.error is None for r in quick.rows[first + 1:])


def test_its_result_feeds_the_report_as_a_cpu_measurement(quick, tmp_path):
    from atelier.bench.report import write_report

    write_report([quick], tmp_path, sources=["pipeline-cpu.json"])
    md = (tmp_path / "report.md").read_text()
    assert "| no GPU (CPU) | generate | tiny | cpu | fp32 | sdpa | 1 |" in md
    assert "No GPU was measured" in md  # a CPU pipeline run never makes a GPU figure MEASURED
    assert "| t4 (T4) | ESTIMATE |" in md


def test_the_unet_sees_the_doubled_batch_of_classifier_free_guidance_once_per_step(gpu_sd):
    spec = gpu_sd.BUILTIN["tiny"]
    cpu = torch.device("cpu")
    unet = gpu_sd.build_unet(spec, cpu, torch.float32).eval()
    seen: list[int] = []
    unet.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        gpu_sd.generation(unet, spec, 3, 4, cpu, torch.float32)()
    assert seen == [6, 6, 6, 6]


def test_a_batch_out_of_memory_is_recorded_and_larger_batches_are_not_tried(gpu_sd, monkeypatch):
    # No CPU runs out of memory on the tiny model: the allocator's error is raised where a GPU
    # would raise it, from the first UNet call of a batch of 2 or more.
    real = gpu_sd.generation

    def generation(unet, spec, batch, *args):
        if batch >= 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(unet, spec, batch, *args)

    monkeypatch.setattr(gpu_sd, "generation", generation)
    args = gpu_sd.parse_args(["--quick", "--skip-train", "--dtypes", "fp32", "--attention", "sdpa",
                              "--batches", "1,2,4"])
    runner = gpu_sd.Runner(gpu_sd.BUILTIN["tiny"], "tiny", torch.device("cpu"), args)
    rows = [runner.measure(cfg) for cfg in gpu_sd.plan(args, cuda=False)]
    assert [(r.batch, r.error) for r in rows] == [
        (1, None), (2, "out of memory"), (4, "out of memory (at a smaller batch)")]


@pytest.mark.gpu
def test_a_small_gpu_run_measures_fp16_generation_and_mixed_precision_training(tmp_path):
    result = _run_script(tmp_path / "pipeline-gpu.json", "--quick", "--model", "tiny", "--dtypes",
                         "fp16", "--batches", "1", cuda=True)
    assert result.environment.gpu is not None
    rows: dict[tuple, PipelineRow] = {(r.task, r.attention, r.optimizer, r.gradient_checkpointing): r
                                      for r in result.rows}
    assert all(r.device == "cuda" for r in result.rows)
    for key in [("generate", "sdpa", None, None), ("train", "sdpa", "adamw8bit", True),
                ("train", "sdpa", "adamw8bit", False)]:
        assert rows[key].error is None and rows[key].it_s.median > 0, rows[key]
        peak = rows[key].peak_memory_mb
        assert peak is not None and peak > 0
    assert rows[("train", "sdpa", "adamw8bit", True)].dtype == "fp16"  # autocast fp16 on CUDA
    xformers = rows[("generate", "xformers", None, None)]
    assert xformers.error in (None, "xformers not installed")
