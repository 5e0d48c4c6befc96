"""The report of a set of bench results (`atelier report`): which GPU pool is cheaper per image and
per fine-tune, at what latency and at what traffic, as Markdown, one self-contained HTML page and
the PNG plots both show. Every figure says whether it was MEASURED or is an ESTIMATE.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from atelier import pools
from atelier.bench import cost, roofline
from atelier.bench.cost import Catalogue, Market, Price
from atelier.bench.results import (
    Level,
    PipelineResult,
    PipelineRow,
    ServeResult,
    Spread,
    Target,
    TrainResult,
    TrainRun,
)
from atelier.errors import InvalidInput
from atelier.files import write_atomic

AnyResult = ServeResult | TrainResult | PipelineResult

DEFAULT_TARGET_FACTOR = 2.0
"""Without a p95 target, twice the smallest p95 any pool reached: the best p95 alone is met only at
the lightest load, so costing at it would price an idle pool; twice it leaves room for queueing."""

DEFAULT_STEPS = 50
"""Denoising steps per image when no serve result names its workload: the SD pipeline's default."""

ASSUMED_COLD_START_S = 180.0
"""Cold start of a GPU pool when none was measured: a new GPU node, the image pulled and the model
loaded. An assumption, named as such wherever it is used."""

TRAIN_STEPS = 200
"""Steps of the study's fine-tune (and TrainConfig's default)."""
ASSUMPTION_FINETUNE = (
    f"ASSUMPTION: a fine-tune is {TRAIN_STEPS} DreamBooth steps at batch 1, 512 px; a step is one "
    "eager UNet forward at that batch times a training factor fitted on the published T4 DreamBooth "
    "figure (batch 4, 8-bit Adam, fp16, gradient checkpointing: 3.66 s/step, shared/FIELD_NOTES.md) "
    "and checked on the A100's (1.03 s/step), below. Model loading, dataset upload and checkpoint "
    "saving are left out.")
ASSUMPTION_IMAGE = (
    "ASSUMPTION: an image costs its denoising loop (steps / it/s) at batch 1, one request at a time "
    "per replica; text encoder and VAE decode are left out, so real images take somewhat longer.")

BREAK_EVEN_LOW, BREAK_EVEN_HIGH = 1.0, 1e6  # images per hour the traffic model spans

_GPU_NAME = {"T4": re.compile(r"(?<![a-z0-9])t4(?![0-9])", re.I),
             "A100": re.compile(r"(?<![a-z0-9])a100(?![0-9])", re.I)}
_FP16 = {"float16", "fp16", "half", "torch.float16"}


def write_report(results: Sequence[ServeResult | TrainResult | PipelineResult], out: Path, *,
                 catalogue: Catalogue | None = None, market: Market = "on_demand",
                 p95_target_s: float | None = None, idle_timeout_s: float = 300.0,
                 sources: Sequence[str] = ()) -> list[Path]:
    """Write report.md, report.html and the PNGs into `out`; return the paths written."""
    if not results:
        raise InvalidInput("no bench results to report on: give at least one result file",
                           where="results")
    if p95_target_s is not None and p95_target_s <= 0:
        raise InvalidInput(f"the p95 target must be positive, not {p95_target_s}",
                           where="p95_target_s")
    if idle_timeout_s < 0:
        raise InvalidInput(f"the idle timeout must not be negative, not {idle_timeout_s}",
                           where="idle_timeout_s")
    report = _Report(list(results), catalogue or Catalogue.load(), market, p95_target_s,
                     idle_timeout_s, list(sources))
    blocks = report.build()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_atomic(out / name, png) for name, png in report.images.items()]
    md = write_atomic(out / "report.md", _markdown(blocks))
    page = write_atomic(out / "report.html", _html(blocks, report.images))
    return [md, page, *written]


# -- The document: built once, rendered as Markdown and as HTML -------------------------------------


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Para:
    text: str
    strong: bool = False


@dataclass
class _Bullets:
    items: list[str]


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class _Code:
    text: str


@dataclass
class _Image:
    name: str
    alt: str


_Block = _Heading | _Para | _Bullets | _Table | _Code | _Image


def _markdown(blocks: Sequence[_Block]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = []
    for b in blocks:
        if isinstance(b, _Heading):
            parts.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, _Para):
            parts.append(f"**{b.text}**" if b.strong else b.text)
        elif isinstance(b, _Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, _Table):
            lines = ["| " + " | ".join(cell(h) for h in b.headers) + " |",
                     "|" + "---|" * len(b.headers)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b.rows]
            parts.append("\n".join(lines))
        elif isinstance(b, _Code):
            parts.append(f"```\n{b.text}\n```")
        else:
            parts.append(f"![{b.alt}]({b.name})")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f2f2f2}pre{background:#f6f6f6;padding:.75rem;
overflow-x:auto}img{max-width:100%}"""


def _html(blocks: Sequence[_Block], images: dict[str, bytes]) -> str:
    """One page with nothing to fetch: the CSS inline and every plot a data URI."""
    e = html.escape
    parts = []
    for b in blocks:
        if isinstance(b, _Heading):
            parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            parts.append(f"<p><strong>{e(b.text)}</strong></p>" if b.strong else f"<p>{e(b.text)}</p>")
        elif isinstance(b, _Bullets):
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, _Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                           for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, _Code):
            parts.append(f"<pre>{e(b.text)}</pre>")
        else:
            data = base64.b64encode(images[b.name]).decode("ascii")
            parts.append(f'<p><img alt="{e(b.alt)}" src="data:image/png;base64,{data}"></p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Atelier bench report</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # Agg, never a display: the report is made on servers and in CI
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


# -- Formatting --------------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3g}"


def _money(usd: float) -> str:
    """USD to three significant figures, the precision the prices carry."""
    return f"${usd:,.0f}" if usd >= 99.95 else f"${usd:#.3g}"


def _spread(s: Spread | None) -> str:
    """A figure over repeats as "median [low–high]"; "-" where no request was answered."""
    return "-" if s is None else f"{_num(s.median)} [{_num(s.low)}–{_num(s.high)}]"


def _pct(share: float) -> str:
    return f"{share * 100:.1f} %"


def _label(pool: str, stand_in: bool, prices_as: str | None) -> str:
    """How a measured pool is named everywhere: a stand-in says so, so that no CPU figure reads as
    a GPU's."""
    if stand_in:
        return f"{pool} (CPU stand-in, priced as {prices_as})" if prices_as else \
            f"{pool} (CPU stand-in, not priced)"
    return pool


def _images_per_hour(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


# -- The figures -------------------------------------------------------------------------------------


@dataclass
class _Costed:
    """A measured or estimated pool's price, or why it has none."""

    price: Price | None
    reason: str = ""

    def describe(self) -> str:
        p = self.price
        if p is None or p.usd_per_gpu_hour is None:
            return self.reason
        return (f"{p.instance}, {_money(p.usd_per_gpu_hour)}/GPU-h {p.market} (source: {p.source}; "
                f"read {p.read.isoformat()})")


@dataclass
class _ServeCost:
    label: str
    costed: _Costed
    found: tuple[float, cost.Level] | None = None


@dataclass
class _Gpu:
    """One catalogue GPU pool's serving and fine-tuning figures, measured or estimated."""

    pool: str
    accelerator: str
    it_s: float
    basis: str  # "MEASURED on <GPU>" or "ESTIMATE"
    measured: bool
    steps: int
    costed: _Costed
    finetune_s: float
    cold_start_s: float
    cold_start_basis: str

    @property
    def seconds_per_image(self) -> float:
        return self.steps / self.it_s

    @property
    def images_per_s(self) -> float:
        return self.it_s / self.steps

    @property
    def usd_per_hour(self) -> float | None:
        return None if self.costed.price is None else self.costed.price.usd_per_gpu_hour

    def usd_per_1000(self, p95_target_s: float | None) -> float | None:
        """At full use; with a target, only if a lone image's latency meets it."""
        if self.usd_per_hour is None:
            return None
        level = cost.Level(1, self.images_per_s, self.seconds_per_image)
        found = cost.usd_per_1000_images([level], self.usd_per_hour,
                                         p95_target_s if p95_target_s is not None else math.inf)
        return None if found is None else found[0]

    def usd_per_finetune(self) -> float | None:
        usd = self.usd_per_hour
        return None if usd is None else cost.usd_per_finetune(self.finetune_s, usd)

    def traffic_pool(self, min_replicas: int, idle_timeout_s: float) -> cost.Pool | None:
        usd = self.usd_per_hour
        if usd is None:
            return None
        return cost.Pool(self.pool, usd, self.images_per_s, min_replicas=min_replicas,
                         idle_timeout_s=idle_timeout_s, cold_start_s=self.cold_start_s)


class _Report:
    def __init__(self, results: list[AnyResult], catalogue: Catalogue, market: Market,
                 p95_target_s: float | None, idle_timeout_s: float, sources: list[str]):
        self.results = results
        self.catalogue = catalogue
        self.market = market
        self.idle_timeout_s = idle_timeout_s
        self.sources = sources
        self.serve = [r for r in results if isinstance(r, ServeResult)]
        self.train = [r for r in results if isinstance(r, TrainResult)]
        self.pipeline = [r for r in results if isinstance(r, PipelineResult)]
        self.images: dict[str, bytes] = {}
        self.gpus = self._gpu_figures()
        self.p95_target_s, self.target_note = self._target(p95_target_s)
        self.serve_costs = [self._serve_cost(r, t) for r in self.serve for t in r.targets]

    # -- inputs ---------------------------------------------------------------------------------

    def _name(self, index: int) -> str:
        """A result as the reader knows it: its file when the sources line up with the results."""
        if len(self.sources) == len(self.results):
            return self.sources[index]
        return f"result {index + 1}"

    def _costed(self, pool: str, stand_in: bool, prices_as: str | None) -> _Costed:
        catalogue_pool = prices_as or (None if stand_in else pool)
        if catalogue_pool is None:
            return _Costed(None, "cannot be costed: a CPU stand-in that names no catalogue pool "
                                 "(prices_as)")
        if catalogue_pool not in self.catalogue.pools:
            return _Costed(None, f"cannot be costed: the price catalogue prices no pool "
                                 f"{catalogue_pool!r}")
        price = self.catalogue.price(catalogue_pool, self.market)
        if price.usd_per_gpu_hour is None:
            return _Costed(price, f"cannot be costed: the catalogue records no {self.market} price "
                                  f"for {price.instance} (source: {price.source}; read "
                                  f"{price.read.isoformat()})")
        return _Costed(price)

    def _target(self, given: float | None) -> tuple[float, str]:
        if given is not None:
            return given, f"p95 target: {_num(given)} s (given)."
        measured = [(lv.p95_s.median, lv) for r in self.serve for lv in r.levels_summary
                    if lv.p95_s is not None]
        if measured:
            best, level = min(measured, key=lambda m: m[0])
            label = self._target_label(level.pool)
            return (best * DEFAULT_TARGET_FACTOR,
                    f"p95 target: {_num(best * DEFAULT_TARGET_FACTOR)} s (default: "
                    f"{DEFAULT_TARGET_FACTOR:g} x the smallest p95 measured, {_num(best)} s by "
                    f"{label} at level {level.level:g}; give a target to change it).")
        if self.gpus:
            fastest = min(self.gpus, key=lambda g: g.seconds_per_image)
            target = fastest.seconds_per_image * DEFAULT_TARGET_FACTOR
            return (target, f"p95 target: {_num(target)} s (default: {DEFAULT_TARGET_FACTOR:g} x "
                            f"the fastest GPU pool's seconds per image, {fastest.pool} "
                            f"{_num(fastest.seconds_per_image)} s, {fastest.basis}; give a target "
                            "to change it).")
        return math.inf, "p95 target: none (nothing measured or estimated has a latency)."

    def _target_label(self, pool: str) -> str:
        for r in self.serve:
            for t in r.targets:
                if t.pool == pool:
                    return _label(t.pool, t.stand_in, t.prices_as)
        return pool

    def _steps(self) -> int:
        """Steps per image of the GPU figures: the serve workload's where a real pool was measured
        with it; a stand-in's (a handful of steps on a tiny model) says nothing about a GPU's."""
        real = [r for r in self.serve if any(not t.stand_in for t in r.targets)]
        return real[0].workload.steps if real else DEFAULT_STEPS

    def _measured_it_s(self, accelerator: str) -> tuple[float, str] | None:
        """SD 1.5 512x512 fp16 batch-1 generation measured on a GPU of this kind, eager preferred
        (the estimate is eager); None when no pipeline result has it."""
        pattern = _GPU_NAME.get(accelerator)
        found: list[tuple[PipelineRow, str]] = []
        for r in self.pipeline:
            gpu_name = r.environment.gpu
            if gpu_name is None or pattern is None or not pattern.search(gpu_name):
                continue
            found += [(row, gpu_name) for row in r.rows
                      if row.task == "generate" and row.model == "sd15" and row.batch == 1
                      and row.dtype.lower() in _FP16 and row.error is None
                      and (row.height, row.width) == (512, 512) and row.it_s is not None
                      and row.it_s.median > 0]
        if not found:
            return None
        row, gpu_name = min(found, key=lambda f: f[0].compiled)
        assert row.it_s is not None  # filtered above
        return row.it_s.median, f"MEASURED on {gpu_name}" + (" (torch.compile)" if row.compiled else "")

    def _cold_start(self, pool: str) -> tuple[float, str]:
        """A GPU pool's measured cold start, else the named assumption. A stand-in's is never
        used: it provisions no GPU node and pulls no image, so it would make scaling to zero look
        cheaper than it is."""
        by_pool = {t.pool: t for r in self.serve for t in r.targets}
        mine = [c.seconds for r in self.serve for c in r.cold_starts
                if c.status == 200 and (t := by_pool.get(c.pool)) is not None and not t.stand_in
                and (t.prices_as or t.pool) == pool]
        if mine:
            seconds = statistics.median(mine)
            return seconds, f"{_num(seconds)} s MEASURED (median of {len(mine)})"
        return ASSUMED_COLD_START_S, (f"{ASSUMED_COLD_START_S:g} s ASSUMED (no cold start of the "
                                      f"{pool} pool measured)")

    def _gpu_figures(self) -> list[_Gpu]:
        steps = self._steps()
        figures = []
        estimate: roofline.Estimate | None = None
        for pool in self.catalogue.pools:
            accelerator = pools.POOLS[pool].ray_accelerator_type
            if accelerator is None:
                continue
            estimate = estimate or roofline.calibrated()
            spec = roofline.gpu(accelerator)
            measured = self._measured_it_s(accelerator)
            if measured:
                it_s, basis = measured
            else:
                step = estimate.step_s(roofline.unet_step_cost("sd15", 1, cfg=True), spec,
                                       compiled=False)
                it_s, basis = 1 / step, "ESTIMATE"
            train_step = roofline.train_step_s(accelerator, 1, estimate)
            cold, cold_basis = self._cold_start(pool)
            figures.append(_Gpu(pool, accelerator, it_s, basis, measured is not None, steps,
                                self._costed(pool, False, None), train_step * TRAIN_STEPS, cold,
                                cold_basis))
        return figures

    def _serve_cost(self, result: ServeResult, target: Target) -> _ServeCost:
        label = _label(target.pool, target.stand_in, target.prices_as)
        costed = self._costed(target.pool, target.stand_in, target.prices_as)
        if costed.price is None or costed.price.usd_per_gpu_hour is None:
            return _ServeCost(label, costed)
        levels = [cost.Level(lv.level, lv.images_per_s.median, lv.p95_s.median, lv.error_rate)
                  for lv in result.levels_summary if lv.pool == target.pool and lv.p95_s is not None]
        return _ServeCost(label, costed, cost.usd_per_1000_images(
            levels, costed.price.usd_per_gpu_hour, self.p95_target_s))

    # -- sections -------------------------------------------------------------------------------

    def build(self) -> list[_Block]:
        blocks: list[_Block] = [_Heading(1, "Atelier bench report: which GPU pool, when")]
        blocks += self._header()
        for i, r in enumerate(self.serve):
            blocks += self._serve_section(r, i)
        if self.serve:
            blocks += self._serve_cost_section()
        blocks += self._cold_start_section()
        if self.train:
            blocks += self._train_section()
        blocks += self._gpu_section()
        blocks += self._break_even_section()
        blocks += self._which_pool()
        if self.pipeline:
            blocks += self._pipeline_section()
        return blocks

    def _header(self) -> list[_Block]:
        blocks: list[_Block] = [_Para("Result files: " + (", ".join(self.sources) or
                                                          "(not named)"))]
        rows = []
        for i, r in enumerate(self.results):
            env = r.environment
            rows.append([self._name(i), r.kind, r.created_at, env.hostname,
                         env.gpu or "no GPU (CPU)", env.cpu, env.packages.get("torch") or "-",
                         env.packages.get("diffusers") or "-", env.packages.get("ray") or "-"])
        blocks.append(_Table(["result", "kind", "made", "host", "GPU", "CPU", "torch", "diffusers",
                              "ray"], rows))
        measured, estimated = self._provenance()
        if not any(r.environment.gpu for r in self.results):
            blocks.append(_Para("No GPU was measured; GPU figures below are ESTIMATES.", strong=True))
        blocks.append(_Para("MEASURED: " + ("; ".join(measured) or "nothing") + "."))
        blocks.append(_Para("ESTIMATE: " + ("; ".join(estimated) or "nothing") + "."))
        blocks.append(_Para(self.target_note))
        return blocks

    def _provenance(self) -> tuple[list[str], list[str]]:
        measured, estimated = [], []
        for r in self.serve:
            labels = [_label(t.pool, t.stand_in, t.prices_as) for t in r.targets]
            measured.append(f"serve latency and throughput of {', '.join(labels)}")
        for t in self.train:
            labels = [_label(run.pool, run.stand_in, run.prices_as) for run in t.runs]
            measured.append(f"training time of {', '.join(labels)}")
        for p in self.pipeline:
            measured.append(f"pipeline it/s on {p.environment.gpu or 'no GPU (CPU)'}")
        for g in self.gpus:
            if g.measured:
                measured.append(f"{g.pool} ({g.accelerator}) denoising it/s, {g.basis}")
            else:
                estimated.append(f"{g.pool} ({g.accelerator}) it/s, seconds per image and cost per "
                                 "image (roofline, calibrated on a published figure)")
        if self.gpus:
            estimated.append("cost per fine-tune of " + ", ".join(g.pool for g in self.gpus)
                             + " (roofline and a named assumption)")
            estimated.append("break-even traffic (from the figures above)")
        return measured, estimated

    def _serve_section(self, result: ServeResult, index: int) -> list[_Block]:
        targets = {t.pool: t for t in result.targets}
        label = {p: _label(p, t.stand_in, t.prices_as) for p, t in targets.items()}
        axis = "concurrency (clients)" if result.mode == "closed" else "arrivals per second"
        w = result.workload
        blocks: list[_Block] = [
            _Heading(2, f"Serve: {self._name(index)}"),
            _Para(f"{result.mode} loop, levels {', '.join(f'{lv:g}' for lv in result.levels)} "
                  f"({axis}); workload {w.width}x{w.height}, {w.steps} steps, {w.n} image(s) per "
                  f"request; {result.warmup} warm-up requests per pool left out. MEASURED."),
            _Bullets([f"{label[t.pool]}: {t.description or 'no description'}" for t in result.targets]),
        ]
        rows = [[label.get(lv.pool, lv.pool), f"{lv.level:g}", str(lv.requests), _spread(lv.p50_s),
                 _spread(lv.p95_s), _spread(lv.p99_s), _spread(lv.images_per_s), _pct(lv.error_rate),
                 _pct(lv.rate_503)]
                for lv in sorted(result.levels_summary, key=lambda lv: (lv.pool, lv.level))]
        blocks.append(_Table(["pool", "level", "requests", "p50 s", "p95 s", "p99 s", "images/s",
                              "errors", "503"], rows))
        if result.comparisons:
            blocks.append(_Table(
                ["metric", "level", "a / b", "ratio [interval]"],
                [[c.metric, f"{c.level:g}", f"{label.get(c.a, c.a)} / {label.get(c.b, c.b)}",
                  f"{c.ratio:.3g} [{c.low:.3g}–{c.high:.3g}]"] for c in result.comparisons]))
        suffix = f"-{index + 1}" if len(self.serve) > 1 else ""
        blocks.append(self._plot(f"serve-latency{suffix}.png", "p50 and p95 latency against load",
                                 self._latency_plot(result, label, axis)))
        per_dollar = self._per_dollar_plot(result, label, axis)
        if per_dollar is not None:
            blocks.append(self._plot(f"serve-images-per-dollar{suffix}.png",
                                     "images/s per $/h against load", per_dollar))
        return blocks

    def _plot(self, name: str, alt: str, fig: Figure) -> _Image:
        self.images[name] = _png(fig)
        return _Image(name, alt)

    def _levels(self, result: ServeResult, pool: str) -> list[Level]:
        return sorted((lv for lv in result.levels_summary if lv.pool == pool), key=lambda lv: lv.level)

    def _latency_plot(self, result: ServeResult, label: dict[str, str], axis: str) -> Figure:
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        for i, pool in enumerate(label):
            levels = self._levels(result, pool)
            for name, style in (("p50_s", "-o"), ("p95_s", "--s")):
                answered = [(lv.level, getattr(lv, name)) for lv in levels if getattr(lv, name)]
                x = [level for level, _ in answered]
                spreads: list[Spread] = [s for _, s in answered]
                ax.errorbar(x, [s.median for s in spreads], fmt=style, capsize=3,
                            yerr=[[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]],
                            color=f"C{i}", label=f"{label[pool]} {name[:3]}")
        if math.isfinite(self.p95_target_s):
            ax.axhline(self.p95_target_s, color="grey", linestyle=":", label="p95 target")
        ax.set_xlabel(axis)
        ax.set_ylabel("latency, s (median, bars: lowest-highest repeat)")
        ax.set_title("Serve latency (MEASURED)")
        ax.legend(fontsize="small")
        return fig

    def _per_dollar_plot(self, result: ServeResult, label: dict[str, str], axis: str) -> Figure | None:
        priced = {}
        for t in result.targets:
            costed = self._costed(t.pool, t.stand_in, t.prices_as)
            if costed.price is not None and costed.price.usd_per_gpu_hour:
                priced[t.pool] = costed.price.usd_per_gpu_hour
        if not priced:
            return None
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        for pool, usd in priced.items():
            levels = self._levels(result, pool)
            ax.plot([lv.level for lv in levels], [lv.images_per_s.median / usd for lv in levels],
                    "-o", label=label[pool])
        ax.set_xlabel(axis)
        ax.set_ylabel("images/s per $/h")
        ax.set_title("Throughput per dollar-hour (MEASURED throughput, catalogue price)")
        ax.legend(fontsize="small")
        return fig

    def _serve_cost_section(self) -> list[_Block]:
        blocks: list[_Block] = [_Heading(2, "Cost per 1000 images at the p95 target"),
                                _Para(self.target_note + " The cost is taken at the largest measured "
                                      "throughput whose p95 meets the target with under 1 % errors.")]
        rows = []
        for c in self.serve_costs:
            if c.found is not None:
                usd, level = c.found
                figure = (f"{_money(usd)} (level {level.concurrency:g}, {_num(level.images_per_s)} "
                          f"images/s, p95 {_num(level.p95_s)} s)")
            elif c.costed.price is None or c.costed.price.usd_per_gpu_hour is None:
                figure = c.costed.reason
            else:
                figure = f"no level meets the p95 target of {_num(self.p95_target_s)} s"
            rows.append([c.label, c.costed.describe() if c.costed.reason == "" else "-", figure])
        blocks.append(_Table(["pool", "priced by", "$ per 1000 images"], rows))
        bars = [(c.label, c.found[0]) for c in self.serve_costs if c.found is not None]
        if bars:
            fig = Figure(figsize=(8, 0.6 * len(bars) + 1.5))
            ax = fig.add_subplot()
            ax.barh([b[0] for b in bars], [b[1] for b in bars])
            ax.set_xlabel(f"$ per 1000 images at p95 <= {_num(self.p95_target_s)} s")
            ax.set_title("Serve cost (MEASURED throughput x catalogue price)")
            blocks.append(self._plot("cost-per-1000-images.png", "$ per 1000 images", fig))
        return blocks

    def _cold_start_section(self) -> list[_Block]:
        rows = []
        for r in self.serve:
            targets = {t.pool: t for t in r.targets}
            for c in r.cold_starts:
                t = targets.get(c.pool)
                rows.append([_label(c.pool, t.stand_in, t.prices_as) if t else c.pool,
                             _num(c.seconds), str(c.status)])
        if not rows:
            return []
        return [_Heading(2, "Cold start (MEASURED)"), _Table(["pool", "seconds", "status"], rows)]

    def _train_section(self) -> list[_Block]:
        rows, bars = [], []
        for r in self.train:
            for run in r.runs:
                label = _label(run.pool, run.stand_in, run.prices_as)
                costed = self._costed(run.pool, run.stand_in, run.prices_as)
                usd = self._finetune_usd(run, costed)
                rows.append([label, _spread(run.steps_per_s), _spread(run.seconds),
                             _spread(run.time_to_first_step_s),
                             "-" if run.peak_memory_mb is None else f"{run.peak_memory_mb:,.0f}",
                             costed.describe(), costed.reason if usd is None else _money(usd[0])])
                if usd is not None:
                    bars.append((label, usd))
        blocks: list[_Block] = [
            _Heading(2, "Fine-tune (MEASURED)"),
            _Table(["pool", "steps/s", "seconds per run", "time to first step s", "peak memory MB",
                    "priced by", "$ per fine-tune (median seconds x price)"], rows)]
        if bars:
            fig = Figure(figsize=(8, 0.6 * len(bars) + 1.5))
            ax = fig.add_subplot()
            mid = [b[1][0] for b in bars]
            ax.barh([b[0] for b in bars], mid, xerr=[[m - b[1][1] for m, b in zip(mid, bars, strict=True)],
                                                     [b[1][2] - m for m, b in zip(mid, bars, strict=True)]],
                    capsize=3)
            ax.set_xlabel("$ per fine-tune (bars: fastest-slowest run)")
            ax.set_title("Fine-tune cost (MEASURED seconds x catalogue price)")
            blocks.append(self._plot("cost-per-finetune.png", "$ per fine-tune", fig))
        return blocks

    @staticmethod
    def _finetune_usd(run: TrainRun, costed: _Costed) -> tuple[float, float, float] | None:
        usd = None if costed.price is None else costed.price.usd_per_gpu_hour
        if usd is None:
            return None
        return (cost.usd_per_finetune(run.seconds.median, usd), cost.usd_per_finetune(run.seconds.low, usd),
                cost.usd_per_finetune(run.seconds.high, usd))

    def _gpu_section(self) -> list[_Block]:
        if not self.gpus:
            return []
        steps_from = (f"the serve workload's {self._steps()} steps"
                      if any(not t.stand_in for r in self.serve for t in r.targets) else
                      f"{DEFAULT_STEPS} steps (no GPU pool served: the SD pipeline's default)")
        blocks: list[_Block] = [
            _Heading(2, "GPU pools: ESTIMATE unless MEASURED"),
            _Para("SD 1.5, 512x512, fp16, batch 1, classifier-free guidance, eager PyTorch, at "
                  f"{steps_from}. An ESTIMATE comes from the roofline model calibrated on one "
                  "published figure (atelier.bench.roofline); a MEASURED figure from a pipeline "
                  "result on that GPU."),
            _Bullets([ASSUMPTION_IMAGE, ASSUMPTION_FINETUNE]),
        ]
        rows = []
        for g in self.gpus:
            tag = "" if g.measured else " ESTIMATE"
            full, at_target = g.usd_per_1000(None), g.usd_per_1000(self.p95_target_s)
            finetune = g.usd_per_finetune()
            no_price = g.costed.reason
            rows.append([
                f"{g.pool} ({g.accelerator})", g.basis, f"{g.it_s:.2f}{tag}", f"{_num(g.seconds_per_image)}{tag}",
                f"{_num(g.images_per_s)}{tag}", g.costed.describe(),
                no_price if full is None else f"{_money(full)}{tag}",
                no_price if g.usd_per_hour is None else
                (f"{_money(at_target)}{tag}" if at_target is not None else
                 f"misses the target ({_num(g.seconds_per_image)} s{tag} > {_num(self.p95_target_s)} s)"),
                f"{_num(g.finetune_s)} s ESTIMATE",
                no_price if finetune is None else f"{_money(finetune)} ESTIMATE"])
        blocks.append(_Table(["pool", "basis", "it/s", "s per image", "images/s per replica",
                              "priced by", "$ per 1000 images at full use",
                              f"$ per 1000 images at p95 <= {_num(self.p95_target_s)} s",
                              "fine-tune seconds", "$ per fine-tune"], rows))
        blocks.append(_Para("The estimate against the published figures it is checked on "
                            "(predicted vs published it/s, error %, and the roofline bound):"))
        blocks.append(_Code(roofline.format_table(roofline.table())))
        blocks.append(_Para("The training step against the published DreamBooth figures "
                            "(steps/s; the bound is forward + backward at the GPU's peak):"))
        blocks.append(_Code(roofline.format_table(roofline.training_table())))
        priced = [g for g in self.gpus if g.usd_per_hour is not None]
        if priced:
            fig = Figure(figsize=(9, 3.5))
            images_ax, tune_ax = fig.subplots(1, 2)
            names = [f"{g.pool} ({g.basis.split(' (')[0]})" for g in priced]
            images_ax.barh(names, [g.usd_per_1000(None) or 0.0 for g in priced])
            images_ax.set_xlabel("$ per 1000 images at full use")
            tune_ax.barh(names, [g.usd_per_finetune() or 0.0 for g in priced])
            tune_ax.set_xlabel("$ per fine-tune (ESTIMATE)")
            fig.suptitle("GPU pools (ESTIMATE unless MEASURED)")
            fig.tight_layout()
            blocks.append(self._plot("gpu-pools.png", "GPU pools: $ per 1000 images and per fine-tune", fig))
        return blocks

    # -- break-even -----------------------------------------------------------------------------

    def _scenarios(self) -> list[tuple[str, int]]:
        return [(f"scale to zero (min_replicas 0, idle timeout {self.idle_timeout_s:g} s)", 0),
                ("always on (min_replicas 1)", 1)]

    def _break_even_section(self) -> list[_Block]:
        if len(self.gpus) < 2:
            return []
        blocks: list[_Block] = [_Heading(2, "Break-even traffic")]
        unpriced = [g for g in self.gpus if g.usd_per_hour is None]
        blocks.append(_Bullets([f"{g.pool}: {_num(g.images_per_s)} images/s per replica ({g.basis}), "
                                f"cold start {g.cold_start_basis}" for g in self.gpus]))
        if unpriced:
            blocks.append(_Para("Break-even cannot be computed: " + "; ".join(
                f"{g.pool} {g.costed.reason}" for g in unpriced) + "."))
            return blocks
        rows = []
        for a, b in itertools.combinations(self.gpus, 2):
            for name, min_replicas in self._scenarios():
                rows.append([f"{a.pool} vs {b.pool}", name, self._crossings_text(a, b, min_replicas)])
        blocks.append(_Table(["pools", "autoscaling", "which is cheaper"], rows))
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        grid = [BREAK_EVEN_LOW * (BREAK_EVEN_HIGH / BREAK_EVEN_LOW) ** (i / 299) for i in range(300)]
        for g in self.gpus:
            for (name, min_replicas), style in zip(self._scenarios(), ("-", "--"), strict=True):
                pool = g.traffic_pool(min_replicas, self.idle_timeout_s)
                assert pool is not None  # priced: checked above
                ax.plot(grid, [pool.usd_per_hour_at(r) for r in grid], style,
                        label=f"{g.pool} ({'MEASURED' if g.measured else 'ESTIMATE'}), {name}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("traffic, images per hour")
        ax.set_ylabel("$ per hour")
        ax.set_title("Pool cost against traffic")
        ax.legend(fontsize="small")
        blocks.append(self._plot("break-even.png", "$ per hour against traffic", fig))
        return blocks

    def _segments(self, a: _Gpu, b: _Gpu, min_replicas: int) -> list[tuple[float, float, str]]:
        """(from, to, cheaper pool) over the traffic range, split where the cheaper one changes."""
        pa = a.traffic_pool(min_replicas, self.idle_timeout_s)
        pb = b.traffic_pool(min_replicas, self.idle_timeout_s)
        assert pa is not None and pb is not None
        edges = [BREAK_EVEN_LOW, *cost.break_even(pa, pb, BREAK_EVEN_LOW, BREAK_EVEN_HIGH),
                 BREAK_EVEN_HIGH]
        segments: list[tuple[float, float, str]] = []
        for lo, hi in itertools.pairwise(edges):
            mid = math.sqrt(lo * hi)
            ca, cb = pa.usd_per_hour_at(mid), pb.usd_per_hour_at(mid)
            cheaper = a.pool if ca < cb else b.pool if cb < ca else "neither"
            if segments and segments[-1][2] == cheaper:
                segments[-1] = (segments[-1][0], hi, cheaper)
            else:
                segments.append((lo, hi, cheaper))
        return segments

    def _crossings_text(self, a: _Gpu, b: _Gpu, min_replicas: int) -> str:
        segments = self._segments(a, b, min_replicas)
        if len(segments) == 1:
            return (f"{segments[0][2]} at every traffic from {_images_per_hour(BREAK_EVEN_LOW)} to "
                    f"{_images_per_hour(BREAK_EVEN_HIGH)} images/hour")
        return "; ".join(f"{cheaper} from {_images_per_hour(lo)} to {_images_per_hour(hi)} images/hour"
                         for lo, hi, cheaper in segments)

    # -- the answer -----------------------------------------------------------------------------

    def _which_pool(self) -> list[_Block]:
        lines = []
        tag = {g.pool: "MEASURED" if g.measured else "ESTIMATE" for g in self.gpus}
        priced = [g for g in self.gpus if g.usd_per_hour is not None]
        if len(self.gpus) >= 2 and len(priced) == len(self.gpus):
            for a, b in itertools.combinations(self.gpus, 2):
                for name, min_replicas in self._scenarios():
                    segments = self._segments(a, b, min_replicas)
                    if len(segments) == 1:
                        lines.append(f"With {name}, the {segments[0][2]} pool is cheaper at any traffic "
                                     f"up to {_images_per_hour(BREAK_EVEN_HIGH)} images/hour "
                                     f"({a.pool} {tag[a.pool]}, {b.pool} {tag[b.pool]}).")
                        continue
                    first = segments[0]
                    text = f"With {name}, below {_images_per_hour(first[1])} images/hour the {first[2]} pool is cheaper"
                    for lo, _hi, cheaper in segments[1:]:
                        text += f"; above {_images_per_hour(lo)} the {cheaper}"
                    lines.append(text + f" ({a.pool} {tag[a.pool]}, {b.pool} {tag[b.pool]}).")
        if priced:
            cheapest = min(priced, key=lambda g: g.usd_per_1000(None) or math.inf)
            per_image = ", ".join(f"{g.pool} {_money(g.usd_per_1000(None) or 0)} ({tag[g.pool]})" for g in priced)
            lines.append(f"Per 1000 images at full use: {per_image}; the {cheapest.pool} pool is cheapest.")
            tunes = ", ".join(f"{g.pool} {_money(g.usd_per_finetune() or 0)}" for g in priced)
            cheapest_tune = min(priced, key=lambda g: g.usd_per_finetune() or math.inf)
            lines.append(f"Per fine-tune (ESTIMATE, under the stated assumption): {tunes}; the "
                         f"{cheapest_tune.pool} pool is cheaper.")
        for g in self.gpus:
            if g.usd_per_hour is None:
                lines.append(f"The {g.pool} pool {g.costed.reason}.")
        if self.gpus and math.isfinite(self.p95_target_s):
            meeting = [g for g in self.gpus if g.seconds_per_image <= self.p95_target_s]
            times = ", ".join(f"{g.pool} {_num(g.seconds_per_image)} s ({tag[g.pool]})" for g in self.gpus)
            if not meeting:
                verdict = "neither GPU pool meets it"
            elif len(meeting) == len(self.gpus):
                verdict = "every GPU pool meets it"
            else:
                verdict = "only " + " and ".join(f"the {g.pool}" for g in meeting) + " pool meets it"
            choice = (f"; under this target the choice is {' or '.join(g.pool for g in meeting)} "
                      "whatever the traffic" if 0 < len(meeting) < len(self.gpus) else "")
            lines.append(f"At a p95 target of {_num(self.p95_target_s)} s, {verdict} for SD 1.5 at "
                         f"{self._steps()} steps (one image: {times}){choice}.")
        costed = [c for c in self.serve_costs if c.found is not None]
        if costed:
            best = min(costed, key=lambda c: c.found[0] if c.found else math.inf)
            assert best.found is not None
            stand_ins = " (CPU stand-ins: their ranking, not their dollars, carries over to GPUs)" \
                if any("CPU stand-in" in c.label for c in costed) else ""
            lines.append(f"Of the measured serve pools{stand_ins}, {best.label} costs least per 1000 "
                         f"images at the target: {_money(best.found[0])}.")
        if not lines:
            return []
        return [_Heading(2, "Which pool when"), _Bullets(lines)]

    def _pipeline_section(self) -> list[_Block]:
        rows = []
        for r in self.pipeline:
            where = r.environment.gpu or "no GPU (CPU)"
            for row in r.rows:
                rows.append([where, row.task, row.model, row.device, row.dtype, row.attention,
                             str(row.batch), f"{row.width}x{row.height}", "yes" if row.compiled else "no",
                             "-" if row.it_s is None else _spread(row.it_s),
                             "-" if row.error else _spread(row.images_per_s),
                             "-" if row.peak_memory_mb is None else f"{row.peak_memory_mb:,.0f}",
                             row.error or ""])
        return [_Heading(2, "Pipeline measurements (MEASURED)"),
                _Table(["machine", "task", "model", "device", "dtype", "attention", "batch", "size",
                        "compiled", "it/s", "images/s", "peak memory MB", "error"], rows)]
