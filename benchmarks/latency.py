"""Inference latency of exported compact subnets (~25/50/75% of the dense MACs) against the dense model.

    python -m benchmarks.latency [--quick | --smoke] [--threads N] [--output-dir DIR]

CPU float32 at batch 1 and 32, eager and `torch.compile`d, plus CUDA bfloat16 when a GPU is present. Every
model of a setting runs in turn, round after round (see `harness.interleaved`), and the median is reported.
Ideal speed-up = dense MACs / subnet MACs (`count_macs`); efficiency = achieved / ideal. A torch.profiler
breakdown of one batch-32 forward of the dense and the ~50% model shows where the time that does not shrink
with MACs goes.

At batch 32, glibc's malloc returns every block over 32 MiB (a DeiT-S MLP activation is 39 MB) to the OS on
free and page-faults it back in on the next forward, a fixed cost of dense and compact models alike. The
"no-mmap" settings keep such blocks in the heap (`mallopt`), as jemalloc or tcmalloc would; they run after the
default ones, because the change lasts for the rest of the process.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from flora_hf import FloraSupernetForImageClassification, count_macs  # noqa: E402

from .common import markdown_table, parse_arguments, save_results  # noqa: E402
from .harness import (  # noqa: E402
    build,
    interleaved,
    load_average,
    median_ms,
    pixel_batch,
    set_threads,
    subnet_at_fraction,
)

NAME = "latency"
FRACTIONS = (0.25, 0.5, 0.75)
# (batch, compiled, allocator) per CPU setting, in the order they run: the "no-mmap" allocator ones come last
FULL = ((1, False, "default"), (32, False, "default"), (32, False, "no-mmap"), (1, True, "no-mmap"),
        (32, True, "no-mmap"))
MODES = {  # size, CPU settings, repeats, profile the batch-32 forward
    "full": ("DeiT-S", FULL, 5, True),
    "quick": ("DeiT-Ti", ((1, False, "default"), (32, False, "default"), (32, False, "no-mmap")), 5, True),
    "smoke": ("tiny", ((1, False, "default"), (2, False, "default")), 1, False),
}
OP_KINDS = {  # torch.profiler op name fragments -> kind of work; everything else is "other"
    "matmul (linear)": ("aten::addmm", "aten::mm"),
    "attention": ("scaled_dot_product", "aten::bmm", "aten::_softmax"),
    "copies (addmm bias)": ("aten::copy_",),
    "GELU": ("aten::gelu",),
    "layer norm": ("layer_norm",),
}


def models_under_test(size: str) -> dict[str, nn.Module]:
    """The dense model and the compact subnets nearest each of `FRACTIONS` of its MACs, by label."""
    dense = build(size)
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    models: dict[str, nn.Module] = {"dense": dense}
    for fraction in FRACTIONS:
        subnet = subnet_at_fraction(supernet, fraction)
        models[f"~{fraction:.0%}"] = supernet.export_subnet(subnet)
    return models


def forward(model: nn.Module, pixel_values: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        with torch.inference_mode():
            model(pixel_values=pixel_values)
        if pixel_values.is_cuda:
            torch.cuda.synchronize()

    return run


def compiled(model: nn.Module, pixel_values: torch.Tensor) -> tuple[Callable[[], object] | None, str | None]:
    """`torch.compile(model)`, compiled by one call here; (None, the error) where compiling fails."""
    try:
        function = forward(torch.compile(model, dynamic=False), pixel_values)
        function()
        return function, None
    except Exception as error:  # noqa: BLE001 - any compiler failure is a result to report, not a crash
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def disable_malloc_mmap() -> bool:
    """Keeps large freed blocks in glibc's heap for reuse instead of unmapping them (see the module docstring).

    False where there is no glibc to tell (macOS, musl): the "no-mmap" settings are then skipped.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def op_breakdown(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, float]:
    """Milliseconds per kind of op (`OP_KINDS`) in one forward, from torch.profiler self CPU times."""
    with torch.inference_mode():
        model(pixel_values=pixel_values)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            model(pixel_values=pixel_values)
    totals: Counter = Counter()
    for event in profiler.key_averages():
        kind = next((k for k, names in OP_KINDS.items() if any(n in event.key for n in names)), "other")
        totals[kind] += event.self_cpu_time_total / 1000
    return dict(totals)


def measure(models: dict[str, nn.Module], device: str, dtype: torch.dtype, batch: int, compile_: bool,
            repeats: int, allocator: str = "default") -> list[dict]:
    """One setting (device, dtype, batch, eager or compiled): every model timed in interleaved rounds."""
    dense = models["dense"]
    dense_macs = count_macs(dense)
    pixel_values = pixel_batch(dense, batch).to(device, dtype)
    functions, errors = {}, {}
    for label, model in models.items():
        model = model.to(device, dtype)
        if compile_:
            functions[label], errors[label] = compiled(model, pixel_values)
        else:
            functions[label] = forward(model, pixel_values)
    repeats *= 4 if batch == 1 else 1  # short calls: more of them for a steady median
    seconds = interleaved({k: f for k, f in functions.items() if f is not None}, repeats, warmup=1)
    rows = []
    for label, model in models.items():
        macs = count_macs(model)
        row = {"subnet": label, "device": device, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
               "compiled": compile_, "allocator": allocator, "macs": macs, "macs_fraction": macs / dense_macs,
               "params": sum(p.numel() for p in model.parameters()), "ideal_speedup": dense_macs / macs,
               "error": errors.get(label)}
        if label in seconds and "dense" in seconds:
            row["runs_ms"] = [1000 * s for s in seconds[label]]
            row["median_ms"] = median_ms(seconds[label])
            row["speedup"] = median_ms(seconds["dense"]) / row["median_ms"]
            row["efficiency"] = row["speedup"] / row["ideal_speedup"]
        rows.append(row)
    return rows


def run(mode: str, threads: int | None, output_dir: Path) -> dict:
    size, cpu_settings, repeats, profiled = MODES[mode]
    threads = set_threads(threads)
    models = models_under_test(size)
    settings = {"model": size, "threads": threads, "repeats": repeats, "warmup": 1,
                "load_average_start": load_average()}
    if profiled:
        pixel_values = pixel_batch(models["dense"], 32)
        settings["op_ms_batch32"] = {k: op_breakdown(models[k], pixel_values) for k in ("dense", "~50%")}
    rows, heap_kept = [], None
    for batch, compile_, allocator in cpu_settings:
        if allocator == "no-mmap":
            heap_kept = disable_malloc_mmap() if heap_kept is None else heap_kept
            if not heap_kept:
                continue
        rows += measure(models, "cpu", torch.float32, batch, compile_, repeats, allocator)
    if torch.cuda.is_available():
        for batch in (1, 32):
            for compile_ in (False, True):
                rows += measure(models, "cuda", torch.bfloat16, batch, compile_, repeats)
        settings["cuda_device"] = torch.cuda.get_device_name()
    settings["load_average_end"] = load_average()
    for row in rows:
        row["model"] = size
    path = save_results(NAME, rows, output_dir, settings)
    plot(rows, output_dir / f"{NAME}.png")
    print(markdown(rows))
    print(f"wrote {path} and {output_dir / f'{NAME}.png'}")
    return {"settings": settings, "rows": rows}


def setting_name(row: dict) -> str:
    allocator = " no-mmap" if row["allocator"] == "no-mmap" else ""
    return f"{row['device']} {row['dtype']} b{row['batch']}{' compiled' if row['compiled'] else ''}{allocator}"


def plot(rows: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    settings = dict.fromkeys(setting_name(row) for row in rows)
    for setting in settings:
        points = [r for r in rows if setting_name(r) == setting and r.get("speedup") is not None]
        axes.plot([r["ideal_speedup"] for r in points], [r["speedup"] for r in points], "o-", label=setting)
    top = max(r["ideal_speedup"] for r in rows)
    axes.plot([1, top], [1, top], "k:", label="ideal (MACs ratio)")
    axes.set(xlabel="ideal speed-up (dense MACs / subnet MACs)", ylabel="measured speed-up vs dense",
             title=f"{rows[0]['model']}: compact subnets vs dense")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(rows: list[dict]) -> str:
    table = []
    for row in rows:
        measured = row.get("median_ms") is not None
        table.append([
            setting_name(row), row["subnet"], f"{row['macs_fraction']:.1%}", f"{row['median_ms']:.1f}" if measured else "–",
            f"{row['speedup']:.2f}×" if measured else "–", f"{row['ideal_speedup']:.2f}×",
            f"{row['efficiency']:.2f}" if measured else (row["error"] or "–"),
        ])
    headers = ["setting", "model", "MACs", "median ms", "speed-up", "ideal", "achieved / ideal"]
    return markdown_table(headers, table)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(__doc__.splitlines()[0], {"quick": "DeiT-Ti, no torch.compile (about 2 minutes)", "smoke": "a tiny ViT, one repeat: checks the script runs"}, argv)
    return run(args.mode, args.threads, args.output_dir)


if __name__ == "__main__":
    main()
