"""Checkpoint faults on real checkpoints: damaged files, full disks, pruning, untrusted loading.

Each test injects one fault into checkpoints written by `rlino.checkpoint.save` for a real tiny
model (or by a real 4-iteration training run) and checks what the user sees (a one-line warning or
error) and that the run still finishes exactly as an uninterrupted one (bitwise, on one machine).
"""

from __future__ import annotations

import ast
import errno
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_train import tiny_config
from typer.testing import CliRunner

from rlino import checkpoint
from rlino.errors import UserError
from rlino.policy import load_policy, save_policy
from rlino.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
ERROR_28 = "Error while serializing: I/O error: No space left on device (os error 28)"


# ---------------------------------------------------------------- helpers


def _config(model_dir: Path, **extra: object) -> object:
    """4 iterations, a checkpoint after each one, the last three kept."""
    options: dict[str, object] = {"checkpoint_every": 1, "checkpoint_keep": 3, **extra}
    return tiny_config(model_dir, "grpo", eval={"every": 2}, **options)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    """Same metric rows (timings aside) and bitwise-equal final weights."""
    assert _rows(a) == _rows(b)
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _flip_bytes(file: Path) -> None:
    """Invert 16 bytes in the middle of `file`, keeping its size (bit rot, a bad copy)."""
    data = bytearray(file.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(255 - b for b in data[mid : mid + 16])
    file.write_bytes(bytes(data))


def _escape_manifest(ckpt: Path) -> None:
    """A manifest that points outside its checkpoint (to a device that never ends)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../../../../../dev/zero"] = {"size": 0, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def straight(tiny_random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 4-iteration run every faulty run must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert train(_config(tiny_random_model_dir), run, progress=False).completed
    return run


@pytest.fixture
def stopped(tiny_random_model_dir: Path, tmp_path: Path) -> Path:
    """The same run stopped after iteration 3: checkpoints 2 and 3 (and 1) on disk."""
    run = tmp_path / "run"
    train(_config(tiny_random_model_dir), run, progress=False, stop_after=3)
    assert _names(run)[-2:] == ["iter_000002", "iter_000003"]
    return run


class _Parts:
    """A real tiny policy with a stepped AdamW and a LambdaLR, for direct `checkpoint.save` calls."""

    def __init__(self, model_dir: Path) -> None:
        torch.manual_seed(0)
        self.policy = load_policy(str(model_dir), device="cpu", dtype="fp32")
        params = list(self.policy.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: 0.5**it)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        ids = torch.arange(1, 9).unsqueeze(0)
        self.policy.model(input_ids=ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def save(self, run: Path, iteration: int, **kw: object) -> Path:
        def save_model(path: Path) -> None:
            save_policy(self.policy, path)

        return checkpoint.save(
            run, iteration, save_model, self.optimizer, self.scheduler, scaler=self.scaler, **kw
        )


@pytest.fixture(scope="module")
def parts(tiny_random_model_dir: Path) -> _Parts:
    return _Parts(tiny_random_model_dir)


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda c: _flip_bytes(c / "model" / "model.safetensors"), "checksum mismatch"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt: missing"),
        (lambda c: (c / "rng.pt").write_bytes((c / "rng.pt").read_bytes()[:-7]), "rng.pt: "),
        (lambda c: (c / "manifest.json").unlink(), "manifest.json missing"),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json unreadable"),
        (_escape_manifest, "manifest.json names a file outside the checkpoint"),
    ],
    ids=[
        "flipped-model-bytes",
        "missing-file",
        "truncated-file",
        "no-manifest",
        "bad-manifest",
        "hostile-manifest",
    ],
)
def test_damaged_newest_checkpoint_falls_back_and_finishes_identically(
    tiny_random_model_dir: Path,
    straight: Path,
    stopped: Path,
    damage: Callable[[Path], None],
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage(stopped / "checkpoints" / "iter_000003")
    assert checkpoint.latest(stopped) == stopped / "checkpoints" / "iter_000002"
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: checkpoint iter_000003 is damaged (")
    assert problem in warning and warning.endswith("resuming from iter_000002")
    assert "\n" not in warning
    result = train(_config(tiny_random_model_dir), stopped, resume=True, progress=False)
    assert result.completed and result.iterations_done == 4
    _assert_same_run(straight, stopped)
    assert checkpoint.damage(stopped / "checkpoints" / "iter_000003") is None  # rewritten


def test_every_checkpoint_damaged_is_a_one_line_error_exit_2(stopped: Path) -> None:
    """Never a silent restart from scratch: the damaged checkpoints stay for inspection."""
    for name in _names(stopped):
        _flip_bytes(stopped / "checkpoints" / name / "optimizer.pt")
    with pytest.raises(UserError, match="no intact checkpoint") as err:
        checkpoint.latest(stopped)
    assert "\n" not in str(err.value)
    assert "iter_000003 (optimizer.pt: checksum mismatch)" in str(err.value)
    rows_before, names = (stopped / "metrics.jsonl").read_text(), _names(stopped)

    from rlino import cli

    result = CliRunner().invoke(cli.app, ["train", "--resume", str(stopped), "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no intact checkpoint in ")
    assert _names(stopped) == names
    assert (stopped / "metrics.jsonl").read_text() == rows_before


def test_no_checkpoint_at_all_starts_from_scratch(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path / "run") is None
    (tmp_path / "run" / "checkpoints" / ".tmp-iter_000001").mkdir(parents=True)  # killed write
    assert checkpoint.latest(tmp_path / "run") is None


def test_manifest_covers_every_file(parts: _Parts, tmp_path: Path) -> None:
    ckpt = parts.save(tmp_path / "run", 1)
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(manifest) == on_disk
    assert {"model/model.safetensors", "optimizer.pt", "scaler.pt", "state.json"} <= on_disk
    assert all(manifest[rel]["size"] == (ckpt / rel).stat().st_size for rel in manifest)
    assert checkpoint.damage(ckpt) is None


# ---------------------------------------------------------------- checkpoint_keep and pruning


def test_checkpoint_keep_1_keeps_one(tiny_random_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_config(tiny_random_model_dir, checkpoint_keep=1), run, progress=False)
    assert _names(run) == ["iter_000004"]
    assert checkpoint.damage(run / "checkpoints" / "iter_000004") is None


def test_pruning_never_drops_the_only_good_checkpoint(
    parts: _Parts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resumed from iteration 2 past a damaged 4, the next save (3, keep 1) keeps 3, not 4."""
    run = tmp_path / "run"
    for it in (1, 2, 4):
        parts.save(run, it, keep=3)
    assert _names(run) == ["iter_000001", "iter_000002", "iter_000004"]
    _flip_bytes(run / "checkpoints" / "iter_000004" / "optimizer.pt")
    assert checkpoint.latest(run) == run / "checkpoints" / "iter_000002"
    parts.save(run, 3, keep=1)
    assert _names(run) == ["iter_000003"]
    assert checkpoint.latest(run) == run / "checkpoints" / "iter_000003"
    parts.save(run, 4, keep=2)
    parts.save(run, 5, keep=2)
    assert _names(run) == ["iter_000004", "iter_000005"]
    with pytest.raises(ValueError, match="keep"):
        parts.save(run, 6, keep=0)


# ---------------------------------------------------------------- write errors


def _fail_on_call(n: int, real: Callable[..., object]) -> Callable[..., object]:
    """`real`, except that call number `n` raises ENOSPC."""
    calls = {"n": 0}

    def wrapper(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            raise ENOSPC
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("target", "call"),
    [
        ("torch.save", 2),
        ("save_model", 1),
        ("safetensors", 1),
        ("os.fsync", 3),
        ("os.replace", 1),
    ],
)
def test_write_error_keeps_the_previous_checkpoint(
    parts: _Parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, call: int
) -> None:
    run = tmp_path / "run"
    parts.save(run, 2)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    if target in ("save_model", "safetensors"):

        def save_model(path: Path) -> None:
            save_policy(parts.policy, path)
            if target == "safetensors":  # how safetensors reports a full disk: no OSError
                raise SafetensorError(ERROR_28)
            raise ENOSPC

        with pytest.raises(UserError) as err:
            checkpoint.save(run, 4, save_model, parts.optimizer, parts.scheduler)
    else:
        module, name = target.split(".")
        owner = torch if module == "torch" else checkpoint.os
        monkeypatch.setattr(owner, name, _fail_on_call(call, getattr(owner, name)))
        with pytest.raises(UserError) as err:
            parts.save(run, 4)
        monkeypatch.undo()
    message = str(err.value)
    assert message == (
        f"could not write checkpoint iter_000004 in {run}: [Errno 28] No space left on device; "
        f"the previous checkpoint iter_000002 is intact, resume with --resume {run} "
        "after freeing space"
    )
    assert _names(run) == ["iter_000002"]  # no partial iter_000004, no .tmp-*
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before
    assert checkpoint.latest(run) == run / "checkpoints" / "iter_000002"


def test_write_error_without_a_previous_checkpoint(
    parts: _Parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "save", _fail_on_call(1, torch.save))
    with pytest.raises(UserError, match="no earlier checkpoint is intact; start the run again"):
        parts.save(tmp_path / "run", 1)
    assert _names(tmp_path / "run") == []


def test_a_bug_while_saving_is_not_a_user_error(parts: _Parts, tmp_path: Path) -> None:
    def broken(path: Path) -> None:
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        checkpoint.save(tmp_path / "run", 1, broken, parts.optimizer, parts.scheduler)
    assert _names(tmp_path / "run") == []


def test_disk_full_mid_training_stops_then_resumes_identically(
    tiny_random_model_dir: Path, straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 3rd checkpoint's optimizer.pt hits ENOSPC (torch.save calls: 3 per checkpoint)."""
    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _fail_on_call(7, torch.save))
    with pytest.raises(UserError) as err:
        train(_config(tiny_random_model_dir), run, progress=False)
    monkeypatch.undo()
    assert str(err.value).startswith(
        f"could not write checkpoint iter_000003 in {run}: [Errno 28] No space left on device; "
        "the previous checkpoint iter_000002 is intact"
    )
    assert _names(run) == ["iter_000001", "iter_000002"]
    assert not (run / "final").exists()
    assert checkpoint.latest(run) == run / "checkpoints" / "iter_000002"
    assert train(_config(tiny_random_model_dir), run, resume=True, progress=False).completed
    _assert_same_run(straight, run)


def test_disk_full_writing_final_leaves_the_run_resumable(
    tiny_random_model_dir: Path, straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    real = checkpoint.save_final

    def full_disk(run_dir: Path, save_model: Callable[[Path], None]) -> Path:
        def partial(path: Path) -> None:
            save_model(path)
            raise ENOSPC

        return real(run_dir, partial)

    monkeypatch.setattr(checkpoint, "save_final", full_disk)
    with pytest.raises(UserError) as err:
        train(_config(tiny_random_model_dir), run, progress=False)
    monkeypatch.undo()
    assert str(err.value) == (
        f"could not write the final model in {run}: [Errno 28] No space left on device; "
        f"checkpoint iter_000004 is intact, resume with --resume {run} after freeing space"
    )
    assert not (run / "final").exists() and not (run / ".tmp-final").exists()
    assert train(_config(tiny_random_model_dir), run, resume=True, progress=False).completed
    _assert_same_run(straight, run)


@pytest.fixture
def small_disk(straight: Path, tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs with room for the run's logs and two checkpoints, not three (skipped where
    mounting is not permitted)."""
    one = sum(p.stat().st_size for p in (straight / "checkpoints").glob("iter_*/**/*"))
    one //= len(list((straight / "checkpoints").glob("iter_*")))
    size = f"size={int(2.6 * one) // 1024}k"
    where = tmp_path / "disk"
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(where)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=30)


def test_real_full_disk(
    tiny_random_model_dir: Path, straight: Path, small_disk: Path, tmp_path: Path
) -> None:
    """On a real full filesystem (safetensors and torch raise their own errors for ENOSPC)."""
    run = small_disk / "run"
    with pytest.raises(UserError) as err:
        train(_config(tiny_random_model_dir), run, progress=False)
    message = str(err.value)
    assert "No space left on device" in message and "\n" not in message
    assert "is intact, resume with --resume" in message and "after freeing space" in message
    assert message.startswith(f"could not write checkpoint iter_000003 in {run}: ")
    assert _names(run) == ["iter_000001", "iter_000002"]  # no partial iter_000003, no .tmp-*
    assert checkpoint.latest(run) == run / "checkpoints" / "iter_000002"
    moved = tmp_path / "roomy"  # "freeing space": the run moves to a bigger disk
    shutil.copytree(run, moved)
    assert train(_config(tiny_random_model_dir), moved, resume=True, progress=False).completed
    _assert_same_run(straight, moved)


# ---------------------------------------------------------------- untrusted files


def test_states_load_with_weights_only(
    parts: _Parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optimizer, scheduler, scaler and RNG states round-trip through weights_only loading."""
    ckpt = parts.save(tmp_path / "run", 7)
    rng = torch.get_rng_state()
    seen: list[object] = []
    real_load = torch.load

    def load(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    fresh = _Parts.__new__(_Parts)
    params = list(parts.policy.model.parameters())
    fresh.optimizer = torch.optim.AdamW(params, lr=1e-3)
    fresh.scheduler = torch.optim.lr_scheduler.LambdaLR(fresh.optimizer, lambda it: 0.5**it)
    fresh.scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(123)
    assert checkpoint.load_state(ckpt, fresh.optimizer, fresh.scheduler, fresh.scaler) == 7
    assert seen == [True, True, True, True]
    assert torch.equal(torch.get_rng_state(), rng)
    assert fresh.scheduler.state_dict() == parts.scheduler.state_dict()
    assert fresh.scaler.state_dict() == parts.scaler.state_dict()
    a, b = parts.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key, state in a["state"].items():
        assert all(torch.equal(v, b["state"][key][k]) for k, v in state.items())
    model_files = {p.name for p in (ckpt / "model").iterdir()}
    assert "model.safetensors" in model_files
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in model_files)


def test_every_torch_load_in_rlino_is_weights_only() -> None:
    """A static guard: torch.load of a pickle can run code; rlino never allows it."""
    import rlino

    offenders = []
    for path in Path(rlino.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                ok = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not ok:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
