"""`rlino compare`: a grid of methods x seeds from one base model, resumable, with one report.

A comparison spec (YAML, or command-line flags) names the methods, the seeds and one training
config shared by every run::

    title: GRPO vs F-ISFT+ on the tiny base
    preset: tiny-countdown          # optional TrainConfig preset under `train`
    methods:
      - grpo                        # a method or preset name (label = the name)
      - {label: grpo-token-mean, name: grpo, aggregation: token-mean}   # MethodParams + label
    seeds: [0, 1, 2]
    train:                          # a TrainConfig mapping (method and seed are set per run)
      iterations: 40

Two optional keys widen the grid and the report::

    bases:                          # base models, a grid axis (runs/METHOD@BASE/seedN)
      - {label: weak, path: tiny:countdown-weak}    # built-in recipe: built once, then cached
      - {label: mine, path: path/to/model}
    passk: {n: 64, prompts: 100}    # pass@k of every final model and base (rlino.analysis.passk)

A `tiny:NAME` model path (in `bases:` or in `train.model.path`) is a built-in tiny base recipe
(`rlino.tiny_bases`): pretrained into the cache before the first run that needs it. With one base
(or none) the labels stay plain.

Run `LABEL/seedN` trains with the shared config, `method:` replaced by that entry's params and
`seed:` by the seed. The train loop's prompt order and sampling seeds are functions of (seed,
iteration), so every method sees the same prompts for the same seed. Runs live in
`OUT/runs/LABEL/seedN/` (so `fisft+/seed0` and `fisft+-/seed0` cannot be misread); a run with
`final/` is skipped, one with a checkpoint resumes, and a partial one without a checkpoint restarts
from scratch. An `OUT/runs/` of the earlier flat layout (`LABEL-sSEED/`) is refused, not mixed in.
`OUT/compare.json` records the spec; report.md, summary.json and the plots are (re)written at the
end (`write_report`).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rlino.analysis.passk import (
    BASE_PASSK_DIR,
    BASE_SEED,
    BASE_SEP,
    PASSK_FILE,
    PasskSpec,
    ensure_passk,
    parse_passk,
)
from rlino.analysis.report import WALL_TIME_FILE, check_layout, run_name, write_report
from rlino.config import (
    TrainConfig,
    deep_merge,
    from_dict,
    parse_override,
    preset_path,
    read_yaml,
    to_dict,
)
from rlino.errors import UserError
from rlino.methods import MethodParams, resolve

LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SPEC_KEYS = ("title", "preset", "methods", "seeds", "train", "bases", "passk")
IGNORED_WHEN_RESUMING = ("threads", "tensorboard", "model.device", "eval.batch_size")
"""Config keys that may differ between a finished run and the spec without invalidating it."""


@dataclass
class MethodEntry:
    """One column of the grid: a label (its runs are `runs/LABEL/seedN`) and MethodParams fields."""

    label: str
    params: dict[str, Any]
    """MethodParams fields, at least `name`"""


@dataclass
class BaseEntry:
    """One base model of the grid: a label (runs are `runs/METHOD@LABEL/seedN`) and a model."""

    label: str
    path: str
    """a model directory, a hub id, or `tiny:NAME` (a built-in recipe, built into the cache)"""


@dataclass
class CompareSpec:
    """(Bases x) methods x seeds, sharing one training config."""

    methods: list[MethodEntry]
    seeds: list[int]
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig mapping shared by every run (its `method` and `seed` are replaced per run)"""
    preset: str | None = None
    """TrainConfig preset (name in configs/ or YAML path) merged under `train`"""
    title: str = "rlino comparison"
    bases: list[BaseEntry] = field(default_factory=list)
    """base models, a grid axis; empty = the one of the training config (`model.path`)"""
    passk: PasskSpec | None = None
    """pass@k of every finished run and base; None = not measured"""

    def grid(self) -> list[tuple[MethodEntry, BaseEntry | None, int]]:
        """Every run as (method, base or None, seed): bases outer, then methods, seeds inner."""
        bases: list[BaseEntry | None] = [*self.bases] or [None]
        return [(m, b, s) for b in bases for m in self.methods for s in self.seeds]

    def run_label(self, entry: MethodEntry, base: BaseEntry | None) -> str:
        """The method's label, or `LABEL@BASE` on a grid of several bases."""
        if base is None or len(self.bases) < 2:
            return entry.label
        return f"{entry.label}{BASE_SEP}{base.label}"

    def run_names(self) -> list[str]:
        """`LABEL/seedN` for every run, in grid order."""
        return [run_name(self.run_label(m, b), s) for m, b, s in self.grid()]


def _default_label(params: dict[str, Any]) -> str:
    """A label when none is given: `grpo-token-mean`, `grpo-beta0.04`, `fisft-alpha0.25`."""
    extras = [str(v) if isinstance(v, str) else f"{k}{v}" for k, v in params.items() if k != "name"]
    return "-".join([str(params["name"]), *extras]).replace(" ", "")


def parse_method(item: Any) -> MethodEntry:
    """A method entry from a name or a mapping {label?, name, **MethodParams fields}."""
    if isinstance(item, str):
        params: dict[str, Any] = {"name": item}
        label = item
    elif isinstance(item, dict):
        params = {k: v for k, v in item.items() if k != "label"}
        if "name" not in params:
            raise UserError(f"method entry {item!r} needs a 'name'")
        label = str(item.get("label") or _default_label(params))
    else:
        raise UserError(f"a method entry is a name or a mapping, got {item!r}")
    if "/" in label:
        raise UserError(
            f"method label {label!r} cannot hold '/': it names the directory runs/LABEL"
        )
    known = {f.name for f in fields(MethodParams)}
    if unknown := sorted(set(params) - known):
        raise UserError(
            f"method {label!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    from_dict(MethodParams, params, "method")
    resolve(from_dict(MethodParams, params, "method"))  # unknown method names fail here
    if not LABEL.match(label):
        raise UserError(f"method label {label!r} must be letters, digits and _ . + - only")
    return MethodEntry(label, params)


def parse_base(item: Any) -> BaseEntry:
    """A base entry from a model path (`tiny:NAME`, a directory, a hub id) or {label?, path}."""
    from rlino.tiny_bases import is_tiny_ref, recipe_name

    if isinstance(item, str):
        path, label = item, None
    elif isinstance(item, dict) and set(item) <= {"label", "path"} and "path" in item:
        path, label = str(item["path"]), item.get("label")
    else:
        raise UserError(f"a base entry is a model path or a mapping {{label, path}}, got {item!r}")
    if is_tiny_ref(path):
        recipe_name(path)  # unknown recipe names fail here
    label = str(label or path.removeprefix("tiny:").rstrip("/").split("/")[-1])
    if not LABEL.match(label):
        raise UserError(f"base label {label!r} must be letters, digits and _ . + - only")
    return BaseEntry(label, path)


def parse_seeds(value: Any) -> list[int]:
    """Seeds from a list or a comma-separated string; non-empty, distinct integers."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise UserError(f"seeds must be a non-empty list of integers, got {value!r}")
    try:
        seeds = [int(str(s).strip()) for s in items]
    except ValueError:
        raise UserError(f"seeds must be integers, got {value!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct, got {seeds}")
    return seeds


def spec_from_dict(data: dict[str, Any]) -> CompareSpec:
    """A CompareSpec from a mapping (the YAML file), checked; unknown keys are errors."""
    if not isinstance(data, dict):
        raise UserError("a compare config must be a YAML mapping")
    if unknown := sorted(set(data) - set(SPEC_KEYS)):
        raise UserError(
            f"unknown compare key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}"
        )
    raw_methods = data.get("methods")
    if not isinstance(raw_methods, list) or not raw_methods:
        raise UserError("a compare config needs a non-empty `methods:` list")
    methods = [parse_method(m) for m in raw_methods]
    labels = [m.label for m in methods]
    if dupes := sorted({x for x in labels if labels.count(x) > 1}):
        raise UserError(f"method labels must be distinct; repeated: {', '.join(dupes)}")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise UserError("`train:` must be a mapping of training config keys")
    preset = data.get("preset")
    raw_bases = data.get("bases") or []
    if not isinstance(raw_bases, list):
        raise UserError("`bases:` must be a list of model paths or {label, path} mappings")
    bases = [parse_base(b) for b in raw_bases]
    base_labels = [b.label for b in bases]
    if dupes := sorted({x for x in base_labels if base_labels.count(x) > 1}):
        raise UserError(f"base labels must be distinct; repeated: {', '.join(dupes)}")
    if bases and isinstance(train.get("model"), dict) and train["model"].get("path") is not None:
        raise UserError("give the base models either in `bases:` or as train.model.path, not both")
    spec = CompareSpec(
        methods=methods,
        seeds=parse_seeds(data.get("seeds", [0])),
        train=dict(train),
        preset=None if preset is None else str(preset),
        title=str(data.get("title") or "rlino comparison"),
        bases=bases,
        passk=parse_passk(data.get("passk")),
    )
    for base in spec.bases or [None]:  # fail on a bad shared config before any run starts
        for entry in spec.methods:
            run_config(spec, entry, spec.seeds[0], base, built=False)
    return spec


def load_spec(path: str | Path) -> CompareSpec:
    """Read a compare YAML: a path, or a name in configs/ (e.g. compare-paper)."""
    file = preset_path(str(path))
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{file}: invalid YAML ({str(e).splitlines()[0]})") from None
    return spec_from_dict(data)


def spec_from_flags(
    base: CompareSpec | None,
    *,
    methods: str | None = None,
    seeds: str | None = None,
    iterations: int | None = None,
    overrides: Sequence[str] = (),
) -> CompareSpec:
    """Apply command-line flags on top of `base` (or on an empty spec): flags win."""
    data: dict[str, Any] = {"methods": [], "seeds": [0], "train": {}}
    if base is not None:
        data = {
            "title": base.title,
            "preset": base.preset,
            "methods": [{"label": m.label, **m.params} for m in base.methods],
            "seeds": list(base.seeds),
            "train": dict(base.train),
            "bases": [asdict(b) for b in base.bases],
            "passk": None if base.passk is None else asdict(base.passk),
        }
    if methods:
        data["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
    if seeds:
        data["seeds"] = parse_seeds(seeds)
    train = dict(data["train"])
    if iterations is not None:
        train["iterations"] = iterations
    for item in overrides:
        train = deep_merge(train, parse_override(item))
    data["train"] = train
    if not data["methods"]:
        raise UserError("no methods: give a compare config or --methods grpo,fisft+")
    return spec_from_dict(data)


def method_block(spec: CompareSpec, entry: MethodEntry) -> tuple[dict[str, Any], list[str]]:
    """The entry's `method:` settings over the preset's that apply to its method (as
    `rlino train -c PRESET --method NAME` does), and a note per preset setting dropped."""
    from rlino.method_switch import carry_params

    data = deep_merge(read_yaml(preset_path(spec.preset)) if spec.preset else {}, spec.train)
    block = data.get("method")
    name = str(entry.params.get("name", ""))
    carried, notes = carry_params(
        block if isinstance(block, dict) else {}, name, who=f"run {entry.label}"
    )
    return {**carried, **entry.params}, [n for k, n in notes.items() if k not in entry.params]


def _shared_model_path(spec: CompareSpec) -> Any:
    """The `model.path` of the preset and the shared train block (None when unset)."""
    data = deep_merge(read_yaml(preset_path(spec.preset)) if spec.preset else {}, spec.train)
    model = data.get("model")
    return model.get("path") if isinstance(model, dict) else None


def tiny_refs(spec: CompareSpec) -> list[str]:
    """The built-in base recipes (`tiny:NAME`) the grid trains from, in grid order."""
    from rlino.tiny_bases import is_tiny_ref

    paths = [b.path for b in spec.bases] or [_shared_model_path(spec)]
    return list(dict.fromkeys(p for p in paths if is_tiny_ref(p)))


def run_config(
    spec: CompareSpec,
    entry: MethodEntry,
    seed: int,
    base: BaseEntry | None = None,
    *,
    built: bool = True,
) -> TrainConfig:
    """The validated TrainConfig of run (entry, base, seed).

    A `tiny:NAME` base becomes its cache directory; `built=False` (checking a spec before the
    bases are built) validates a base not built yet against the shipped tiny model instead.
    """
    from rlino.tiny_bases import base_dir, is_built, is_tiny_ref

    data = read_yaml(preset_path(spec.preset)) if spec.preset else {}
    data = deep_merge(data, spec.train)
    data["method"], _ = method_block(spec, entry)
    data["seed"] = seed
    path = base.path if base is not None else _shared_model_path(spec)
    if is_tiny_ref(path):
        directory = base_dir(path)
        if built and not is_built(directory):
            raise UserError(f"tiny base {path} is not built yet (rlino pretrain --recipe {path})")
        path = str(directory) if is_built(directory) else None
    if base is not None or path != _shared_model_path(spec):
        model = data.get("model")
        data["model"] = {**(model if isinstance(model, dict) else {}), "path": path}
    config: TrainConfig = from_dict(TrainConfig, data)
    if config.method.aggregation == "constant" and config.method.constant_length is None:
        _, params = resolve(config.method)
        if params.aggregation == "constant":  # write the divisor out, as the trainer would
            config.method.constant_length = config.rollout.max_new_tokens
    try:
        config.validate()
    except UserError as e:
        raise UserError(f"run {run_name(spec.run_label(entry, base), seed)}: {e}") from None
    return config


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def config_mismatch(config: TrainConfig, run_dir: Path) -> list[str]:
    """Keys where the run's saved config.yaml differs from `config` (ignoring harmless ones).

    A key the saved config lacks (a setting added to rlino after the run was made) counts only if
    `config` sets it away from its default: the run was made with the default behaviour.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    saved = _flatten(yaml.safe_load(path.read_text()) or {})
    wanted = _flatten(to_dict(config))
    defaults = _flatten(to_dict(TrainConfig()))
    keys = sorted(set(saved) | set(wanted))
    return [
        k
        for k in keys
        if k not in IGNORED_WHEN_RESUMING and saved.get(k, defaults.get(k)) != wanted.get(k)
    ]


TrainFn = Callable[..., Any]


def _record_wall_time(run_dir: Path, seconds: float) -> None:
    path = run_dir / WALL_TIME_FILE
    before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    path.write_text(json.dumps({"seconds": before + seconds}) + "\n")


def run_compare(
    spec: CompareSpec,
    out_dir: Path,
    progress: bool = True,
    train_fn: TrainFn | None = None,
) -> Path:
    """Train every (base, method, seed) run not yet finished, measure pass@k where asked, then
    write the report; returns report.md. Built-in bases the grid names are built first.

    `train_fn` (default `rlino.train.train`) is injectable so tests can count calls. A run stopped
    early (Ctrl-C) ends the grid; running the same command again resumes it.
    """
    from rich.console import Console

    if train_fn is None:
        from rlino.train import train as train_fn
    from rlino import checkpoint
    from rlino.tiny_bases import ensure_base

    console = Console(stderr=True, quiet=not progress)
    out_dir = Path(out_dir)
    for ref in tiny_refs(spec):
        ensure_base(ref, progress=progress, say=console.print)
    grid = spec.grid()
    configs = {run_name(spec.run_label(e, b), s): run_config(spec, e, s, b) for e, b, s in grid}
    for entry in spec.methods:
        for note in method_block(spec, entry)[1]:
            print(note, file=sys.stderr)
    check_layout(out_dir / "runs")
    for name, config in configs.items():
        if diff := config_mismatch(config, out_dir / "runs" / name):
            raise UserError(
                f"{out_dir / 'runs' / name} was trained with a different config "
                f"({', '.join(diff[:4])}); use another --out or delete that run"
            )
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    record = {"spec": _spec_dict(spec), "run_names": spec.run_names()}
    (out_dir / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    if spec.passk is not None:
        _base_passk(spec, spec.passk, out_dir, console)

    stopped = False
    for i, (name, config) in enumerate(configs.items(), start=1):
        run_dir = out_dir / "runs" / name
        head = f"[{i}/{len(configs)}] {name}"
        if (run_dir / "final").is_dir():
            console.print(f"{head}: finished earlier, skipped")
        else:
            ckpt = checkpoint.latest(run_dir) if run_dir.is_dir() else None
            if ckpt is not None:
                console.print(f"{head}: resuming from {ckpt.name}")
            else:
                if run_dir.exists():
                    console.print(f"{head}: partial run without a checkpoint, restarting it")
                    shutil.rmtree(run_dir)
                console.print(f"{head}: training {config.iterations} iterations")
            start = time.perf_counter()
            result = train_fn(config, run_dir, resume=ckpt is not None, progress=progress)
            _record_wall_time(run_dir, time.perf_counter() - start)
            if not getattr(result, "completed", True):
                console.print(f"{head}: stopped; run the same command again to resume")
                stopped = True
                break
        final = run_dir / "final"
        if spec.passk is not None and final.is_dir():
            measured = ensure_passk(run_dir / PASSK_FILE, final, config, spec.passk, config.seed)
            if measured:
                console.print(f"{head}: pass@k measured ({_passk_size(spec.passk)})")
    if not stopped:
        console.print(f"all {len(configs)} runs finished")
    write_report(out_dir, spec.title)
    return out_dir / "report.md"


def _passk_size(p: PasskSpec) -> str:
    return f"{p.n} samples x {p.prompts} prompts at temperature {p.temperature}"


def _base_passk(spec: CompareSpec, passk: PasskSpec, out_dir: Path, console: Any) -> None:
    """pass@k of each base model before training, once per comparison (`base_passk/BASE.json`)."""
    from rlino.setup import target_of

    for base in spec.bases or [None]:
        config = run_config(spec, spec.methods[0], BASE_SEED, base)
        target = target_of(config)
        label = base.label if base is not None and len(spec.bases) > 1 else "base"
        path = out_dir / BASE_PASSK_DIR / f"{label}.json"
        measured = ensure_passk(
            path, target.model_path, config, passk, BASE_SEED, gguf_file=target.gguf_file
        )
        if measured:
            console.print(f"base {label}: pass@k measured ({_passk_size(passk)})")


def _spec_dict(spec: CompareSpec) -> dict[str, Any]:
    data = asdict(spec)
    data["methods"] = [{"label": m.label, **m.params} for m in spec.methods]
    return data


def report_only(out_dir: Path) -> Path:
    """Regenerate report.md, summary.json and the plots from the runs already in `out_dir`."""
    out_dir = Path(out_dir)
    title = "rlino comparison"
    record = out_dir / "compare.json"
    if record.is_file():
        title = json.loads(record.read_text()).get("spec", {}).get("title", title)
    write_report(out_dir, title)
    return out_dir / "report.md"


def compare_command(
    *,
    config: str | None,
    methods: str | None,
    seeds: str | None,
    iterations: int | None,
    out: str | None,
    overrides: list[str],
    report_only_dir: str | None,
    quiet: bool,
) -> Path:
    """Body of `rlino compare`: run the grid (or only rebuild the report) and say where it is."""
    if report_only_dir is not None:
        if config or methods or seeds or iterations is not None or overrides:
            raise UserError("--report-only takes only the comparison directory")
        path = report_only(Path(report_only_dir))
    else:
        base = load_spec(config) if config else None
        spec = spec_from_flags(
            base, methods=methods, seeds=seeds, iterations=iterations, overrides=overrides
        )
        default = f"runs/{Path(config).stem}" if config else "runs/compare"
        path = run_compare(spec, Path(out or default), progress=not quiet)
    print(f"report: {path}")
    return path
