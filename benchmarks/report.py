"""The JSON every benchmark writes under benchmarks/results/: its numbers plus the machine and library versions
they were measured with. Smoke runs write `<name>-smoke.json`, which git ignores."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _versions() -> dict[str, str | None]:
    found = {}
    for package in ("vllm", "torch", "triton", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def write_report(benchmark: str, smoke: bool, **fields) -> Path:
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    report = {"benchmark": benchmark, "smoke": smoke, "machine": machine, "versions": _versions(), **fields}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{benchmark}-smoke.json" if smoke else f"{benchmark}.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def median_range(values: list[float]) -> tuple[float, float, float] | None:
    """(median, min, max) of per-round values, e.g. ratios taken round by round; None when there are none."""
    import statistics

    return (statistics.median(values), min(values), max(values)) if values else None


def ratio_text(value: tuple[float, float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.2f}x ({value[1]:.2f}-{value[2]:.2f})"


def policy_specs_of(known):
    """An argparse type: comma-separated policies, each `name[:setting=value...]` with a name the plugin
    registers (`known`, the policy registry) and settings named as the plugin names them: an engine-wide setting
    or a parameter of that policy (`infokv:alpha=0.5:decode_window=8`, as `--kv-alpha 0.5 --kv-decode-window 8`)."""
    import argparse
    import dataclasses

    from infokv_vllm.config import engine_setting_names

    def parse(text: str) -> str:
        unknown = [spec for spec in text.split(",") if spec.split(":")[0] not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown policies {unknown}; known: {', '.join(known)}")
        for spec in text.split(","):
            name, *settings = spec.split(":")
            names = {*engine_setting_names(), *(field.name for field in dataclasses.fields(known[name]))}
            foreign = [setting for setting in settings if setting.split("=")[0] not in names]
            if foreign:
                raise argparse.ArgumentTypeError(f"{spec}: {foreign} are not settings of {name}; its settings: "
                                                 f"{', '.join(sorted(names))}")
        return text
    return parse


def methods_of(known):
    """An argparse type: a comma-separated list of methods, each one the plugin registers (`known`)."""
    import argparse

    def parse(text: str) -> str:
        unknown = [name for name in text.split(",") if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
        return text
    return parse


def figure_with_axes(columns: int, size: tuple[float, float]):
    """A headless matplotlib figure (these machines have no display) and its row of `columns` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=size, squeeze=False)
    return figure, list(axes[0])


def save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")
