"""The README's bad-input table, one test per row: each input ends in one `error:` line (exit status 2) or
the documented behaviour, nothing of the user's is touched, nothing half-written is left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifact import contract
from qwen2_export import export as export_module
from qwen2_export import staging
from qwen2_export.errors import CheckpointError, ExportError
from qwen2_export.export import export_checkpoint
from qwen2_onnx.cli import main
from runtime import Model, RuntimeInputError
from runtime.chat import ChatTemplate
from runtime.template_limits import TemplateLimits

MESSAGES = [{"role": "user", "content": "hi"}]


def one_error(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must fail with exit status 2 and end in one `error:` line (after any progress lines)
    containing each of `expected`."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    error = lines[-1]
    assert ": error: " in error and not any(": error: " in line or "Traceback" in line for line in lines[:-1]), lines
    for text in expected:
        assert text in error, error
    return error


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


# ---- export ------------------------------------------------------------------------------------------
def test_force_never_replaces_the_checkpoint_or_a_folder_containing_it(tiny_checkpoint, tmp_path, capsys):
    checkpoint = copy_of(tiny_checkpoint("dense_tied"), tmp_path / "models", "ckpt")
    before = sorted(p.name for p in checkpoint.iterdir())
    for output in (checkpoint, checkpoint.parent):
        one_error(capsys, ["export", str(checkpoint), "-o", str(output), "--force"], "checkpoint folder")
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_force_never_replaces_a_plain_file(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    one_error(capsys, ["export", str(tiny_checkpoint("dense_tied")), "-o", str(target), "--force"], "--force replaces only")
    assert target.read_text() == "mine"


def test_output_under_a_file(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    one_error(capsys, ["export", str(tiny_checkpoint("dense_tied")), "-o", str(tmp_path / "file" / "out")], "is a file")


@pytest.mark.parametrize("code, fix", [(errno.EACCES, "permissions"), (errno.EROFS, "read-only"), (errno.ENOSPC, "free some space")])
def test_write_failures_name_the_output_and_the_fix(tiny_checkpoint, tmp_path, capsys, monkeypatch, code, fix):
    """Permission denied, a read-only file system, a full disk while the staging folder is written: one line,
    the staging folder gone. (Simulated: the tests run as root, whom permissions do not stop.)"""
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(export_module, "trace_to_onnx", failing)
    out = tmp_path / "out"
    one_error(capsys, ["export", str(tiny_checkpoint("dense_tied")), "-o", str(out)], str(out), fix)
    assert list(tmp_path.iterdir()) == []


def test_too_little_disk_space_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    monkeypatch.setattr(export_module, "trace_to_onnx", lambda *a: pytest.fail("traced despite no space"))
    one_error(capsys, ["export", str(tiny_checkpoint("dense_tied")), "-o", str(tmp_path / "out")], "GB free")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_tokenizer_is_found_before_tracing(tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = copy_of(tiny_checkpoint("dense_tied"), tmp_path)
    (checkpoint / "tokenizer.json").write_text('{"model": ')
    monkeypatch.setattr(export_module, "trace_to_onnx", lambda *a: pytest.fail("traced with a broken tokenizer"))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        export_checkpoint(checkpoint, tmp_path / "out")


@pytest.mark.parametrize("variant, options, expected", [
    ("awq", [], "already AWQ int4"),
    ("sliding_window", ["--block-size", "256"], "does not divide"),
    ("act_order", [], "desc_act"),
])
def test_refused_int4_layouts(tiny_checkpoint, tmp_path, capsys, variant, options, expected):
    from qwen2_export.synthetic_int4 import write_int4_checkpoint

    if variant in ("awq", "act_order"):
        checkpoint = tmp_path / "checkpoint"
        write_int4_checkpoint(checkpoint, "awq" if variant == "awq" else "gptq", group_size=32)
        if variant == "act_order":
            config = json.loads((checkpoint / "config.json").read_text())
            config["quantization_config"]["desc_act"] = True
            (checkpoint / "config.json").write_text(json.dumps(config))
    else:
        checkpoint = tiny_checkpoint(variant)
    quantize = [] if variant == "act_order" else ["--quantize", "int4"]
    one_error(capsys, ["export", str(checkpoint), "-o", str(tmp_path / "out"), *quantize, *options], expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("header", [b"\xff" * 8, (12).to_bytes(8, "little") + b'{"w": {}}   '])
def test_safetensors_with_an_absurd_header_or_missing_keys(tiny_checkpoint, tmp_path, header):
    checkpoint = copy_of(tiny_checkpoint("dense_tied"), tmp_path)
    (checkpoint / "model.safetensors").write_bytes(header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        export_checkpoint(checkpoint, tmp_path / "out")


def test_stale_staging_of_a_killed_export_is_removed_and_reported(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".old.partial-{dead.pid}-x", tmp_path / f".other.partial-{os.getpid()}-y"
    for folder, pid in ((stale, dead.pid), (live, os.getpid())):
        folder.mkdir()
        (folder / staging.MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        (folder / "model.onnx_data").write_bytes(b"\0" * 4096)
    foreign = tmp_path / ".mine.partial-1-z"  # no marker: not ours
    foreign.mkdir()

    def stop(*args):
        raise ExportError("stopped here")

    monkeypatch.setattr(export_module, "trace_to_onnx", stop)  # the clean-up comes before tracing
    assert main(["export", str(tiny_checkpoint("dense_tied")), "-o", str(tmp_path / "out")]) == 2
    assert "removed 1 staging folder(s) of interrupted exports, 0.00 GB freed" in capsys.readouterr().err
    assert not stale.exists() and live.exists() and foreign.exists()


def modes_of(folder: Path) -> dict[str, tuple[bool, int]]:
    return {p.relative_to(folder).as_posix(): (p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@pytest.fixture(scope="module")
def bf16_export(tiny_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """A bf16 export through the CLI (the README's first example) under umask 027: (artifact, stderr)."""
    artifact = tmp_path_factory.mktemp("bf16") / "artifact"
    previous = os.umask(0o027)
    try:
        result = subprocess.run([sys.executable, "-m", "qwen2_onnx", "export", str(tiny_checkpoint("dense_tied")), "-o",
                                 str(artifact), "--dtype", "bf16"], capture_output=True, text=True, timeout=300)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    return artifact, result.stderr


def test_artifacts_follow_the_umask(tiny_artifact, bf16_export):
    """The shared artifacts were exported under the default umask 022, the bf16 one under 027."""
    assert set(modes_of(tiny_artifact("dense_tied")).values()) == {(True, 0o755), (False, 0o644)}
    modes = modes_of(bf16_export[0])
    assert set(modes.values()) == {(True, 0o750), (False, 0o640)} and staging.MARKER not in modes


# ---- the artifact ------------------------------------------------------------------------------------
def edit_manifest(artifact: Path, edit) -> None:
    raw = json.loads((artifact / "manifest.json").read_text())
    edit(raw)
    (artifact / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("path", ["../outside/onnx/model.onnx", "/etc/passwd", "onnx/../../x.onnx"])
def test_manifest_paths_outside_the_artifact_are_refused(tiny_artifact, tmp_path, path):
    outside = copy_of(tiny_artifact("dense_tied"), tmp_path, "outside")  # a valid model that must not run
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    edit_manifest(artifact, lambda raw: raw["graphs"][0].update(file=path))
    with pytest.raises(RuntimeInputError, match="not inside the artifact"):
        Model.load(artifact)
    assert outside.is_dir()


def test_links_out_of_the_artifact_are_refused(tiny_artifact, tmp_path):
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    elsewhere = tmp_path / "tokenizer.json"
    shutil.move(artifact / "tokenizer.json", elsewhere)
    (artifact / "tokenizer.json").symlink_to(elsewhere)
    with pytest.raises(RuntimeInputError, match="outside the artifact"):
        Model.load(artifact)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_weights_are_named_before_onnxruntime_reads_them(tiny_artifact, tmp_path, capsys, damage):
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    data = artifact / "onnx/model.onnx_data"
    if damage == "truncate":
        with data.open("r+b") as f:
            f.truncate(data.stat().st_size // 2)
    else:
        data.unlink()
    one_error(capsys, ["generate", str(artifact), "--prompt", "x"], "model.onnx_data", "re-export")


def test_replaced_weights_fail_verify(tiny_artifact, tmp_path, capsys):
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    assert main(["verify", str(artifact)]) == 0
    assert "sha256 match" in capsys.readouterr().out
    data = artifact / "onnx/model.onnx_data"
    blob = bytearray(data.read_bytes())
    blob[-100] ^= 0xFF  # same size, other bytes
    data.write_bytes(bytes(blob))
    one_error(capsys, ["verify", str(artifact)], "sha256")
    Model.load(artifact)  # without verify, only sizes are checked
    with pytest.raises(RuntimeInputError, match="sha256"):
        Model.load(artifact, verify=True)


@pytest.mark.parametrize("edit, expected", [
    (lambda raw: raw.update(format_version=99), "versions [1]"),
    (lambda raw: raw.update(model="x"), "lacks or mangles"),
    (lambda raw: raw["graphs"][0]["files"].update({"onnx/model.onnx": {"sha256": "x", "bytes": "many"}}), "lacks or mangles"),
])
def test_foreign_or_mangled_manifest(tiny_artifact, tmp_path, capsys, edit, expected):
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    edit_manifest(artifact, edit)
    one_error(capsys, ["generate", str(artifact), "--prompt", "x"], expected)


def test_corrupt_tokenizer_in_the_artifact(tiny_artifact, tmp_path, capsys):
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    (artifact / "tokenizer.json").write_text("not json")
    one_error(capsys, ["generate", str(artifact), "--prompt", "x"], "tokenizer.json")


def test_bf16_artifact_on_cpu_is_refused_with_the_fix_then_runs_with_its_cpu_graph(bf16_export, tmp_path, capsys):
    """The README's first export is bf16: its portable graph cannot run on onnxruntime's CPU."""
    artifact, export_messages = copy_of(bf16_export[0], tmp_path), bf16_export[1]
    assert "no bf16 kernels for the CPU" in export_messages and "--target cpu" in export_messages  # export says so
    one_error(capsys, ["generate", str(artifact), "--prompt", "x", "--max-new-tokens", "2"], "--target cpu", "--dtype fp32")
    assert main(["optimize", str(artifact), "--target", "cpu"]) == 0
    assert main(["generate", str(artifact), "--prompt", "x", "--max-new-tokens", "2", "--greedy", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) == 2


# ---- chat templates ----------------------------------------------------------------------------------
HOSTILE_TEMPLATES = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    "a 10 GB string": ("{{ 'a' * 10**10 }}", "output cap"),
    "a huge width": ("{{ '{:>999999999}'.format(1) }}", "output cap"),
    "doubling": ("{% set s = 'a' * 1000 %}" + "{% set s = s ~ s %}" * 40, "output cap"),
    "include": ("{% include 'other.jinja' %}", "not allowed"),
    "import": ("{% import 'macros.jinja' as m %}", "not allowed"),
    "syntax error": ("{% for m in messages %}", "line 1"),
    "runtime error": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_templates_end_in_an_error_naming_the_template(name):
    source, expected = HOSTILE_TEMPLATES[name]
    started = time.monotonic()
    with pytest.raises(RuntimeInputError, match=expected) as error:
        ChatTemplate(source, origin="/ckpt/chat_template.jinja").render(MESSAGES)
    assert "/ckpt/chat_template.jinja" in str(error.value) and time.monotonic() - started < 5


def test_template_time_and_size_limits_are_configurable():
    # 50,000 iterations: ~0.1 s, far inside the default 2 s even on a loaded 2-core machine (500,000 once
    # ran past it there), far past 0.01 s
    slow = "{% for i in range(5000) %}{% for j in range(9) %}{% endfor %}{% endfor %}done"
    assert ChatTemplate(slow).render(MESSAGES) == "done"
    with pytest.raises(RuntimeInputError, match="longer than 0.01 s"):
        ChatTemplate(slow, limits=TemplateLimits(seconds=0.01)).render(MESSAGES)
    with pytest.raises(RuntimeInputError, match="cap of 10"):
        ChatTemplate("{{ messages[0].content * 6 }}", limits=TemplateLimits(max_chars=10)).render(MESSAGES)


def test_the_checkpoints_hostile_template_through_the_cli(tiny_artifact, tmp_path, capsys):
    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    template = artifact / "chat_template.jinja"
    template.write_text(HOSTILE_TEMPLATES["nested loops"][0])
    one_error(capsys, ["generate", str(artifact), "--prompt", "x", "--chat"], str(template), "loop iterations")
    template.write_bytes(b"{{ '\xff' }}")
    one_error(capsys, ["generate", str(artifact), "--prompt", "x", "--chat"], str(template), "not UTF-8")


# ---- options and prompts -----------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, expected", [
    ("--max-new-tokens", "0", "max_new_tokens=0"), ("--max-new-tokens", "-3", "max_new_tokens=-3"),
    ("--temperature", "inf", "temperature=inf"), ("--temperature", "nan", "temperature=nan"),
    ("--top-p", "nan", "top_p=nan"), ("--repetition-penalty", "inf", "repetition_penalty=inf"),
    ("--seed", "-1", "seed=-1"), ("--template-seconds", "0", "--template-seconds"),
])
def test_numeric_options_are_checked_never_replaced(tiny_artifact, capsys, option, value, expected):
    one_error(capsys, ["generate", str(tiny_artifact("dense_tied")), "--prompt", "x", option, value], expected)


def test_prompt_file_and_stdin_equal_prompt(tiny_artifact, tmp_path, capsys, monkeypatch):
    artifact = str(tiny_artifact("dense_tied"))
    common = ["--greedy", "--max-new-tokens", "4", "--json"]
    (tmp_path / "prompt.txt").write_text("Hello there")
    outputs = []
    for source in (["--prompt", "Hello there"], ["--prompt-file", str(tmp_path / "prompt.txt")], ["--prompt-file", "-"]):
        monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": __import__("io").BytesIO(b"Hello there")})())
        assert main(["generate", artifact, *source, *common]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["output_ids"])
    assert outputs[0] == outputs[1] == outputs[2]


def test_non_utf8_prompts(tiny_artifact, tmp_path, capsys):
    artifact = str(tiny_artifact("dense_tied"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    one_error(capsys, ["generate", artifact, "--prompt-file", str(tmp_path / "latin1.txt")], "not UTF-8")
    one_error(capsys, ["generate", artifact, "--prompt", "caf\udce9"], "not valid UTF-8")  # how Python passes a bad argv


def test_a_huge_prompt_is_refused_from_its_size_before_tokenization(tiny_artifact, tmp_path, capsys, monkeypatch):
    model = Model.load(tiny_artifact("dense_tied"))
    monkeypatch.setattr(model.tokenizer, "_tokenizer", None)  # tokenizing would fail loudly
    started = time.monotonic()
    with pytest.raises(RuntimeInputError, match="past the model's context length"):
        model.generate("word " * 2_000_000)  # 10 MB
    assert time.monotonic() - started < 1
    (tmp_path / "huge.txt").write_bytes(b"x" * 50_000_000)
    one_error(capsys, ["generate", str(tiny_artifact("dense_tied")), "--prompt-file", str(tmp_path / "huge.txt")], "at least")


def test_a_chat_turn_that_does_not_fit_is_an_error_for_that_turn(tiny_artifact):
    script = "Hello\n" + "word " * 400 + "\nHi again\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "runtime", "chat", str(tiny_artifact("dense_tied")), "--greedy",
                             "--max-new-tokens", "4"], input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3 and "context length" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_interrupt_and_sigterm_remove_the_staging_folder(tiny_checkpoint, tmp_path):
    """A real process, stopped with SIGTERM while it works in its staging folder: nothing is left, no traceback."""
    code = (f"import time, qwen2_export.export as e\n"
            f"def slow(*a, **k):\n    print('writing', flush=True); time.sleep(60)\n"
            f"e.trace_to_onnx = slow\n"
            f"from qwen2_onnx.cli import main\n"
            f"raise SystemExit(main(['export', {str(tiny_checkpoint('dense_tied'))!r}, '-o', {str(tmp_path / 'out')!r}]))\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parent.parent)
    assert process.stdout.readline().strip() == "writing"
    process.terminate()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_external_data_outside_the_artifact_is_refused(tiny_artifact, tmp_path):
    """A graph (manifest updated to match) whose weights point out of the folder: onnxruntime refuses it."""
    import onnx

    artifact = copy_of(tiny_artifact("dense_tied"), tmp_path)
    shutil.copy(artifact / "onnx/model.onnx_data", tmp_path / "outside.onnx_data")
    graph_path = artifact / "onnx/model.onnx"
    graph = onnx.load(str(graph_path), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../outside.onnx_data"
    onnx.save(graph, str(graph_path))
    record = contract.FileRecord.of(graph_path)
    edit_manifest(artifact, lambda raw: raw["graphs"][0]["files"].update(
        {"onnx/model.onnx": {"sha256": record.sha256, "bytes": record.bytes}}))
    with pytest.raises(RuntimeInputError, match="onnxruntime cannot load"):
        Model.load(artifact)


def test_a_failure_inside_onnxruntime_is_one_line(tiny_artifact, capsys, monkeypatch):
    """A graph that passed the load checks but fails in a step (device memory, a kernel): no traceback."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from runtime import steps

    def failing(*args, **kwargs):
        raise Fail("CUDA failure 2: out of memory")

    monkeypatch.setattr(steps.PlainSteps, "step", failing)
    one_error(capsys, ["generate", str(tiny_artifact("dense_tied")), "--prompt", "x"], "onnxruntime failed", "out of memory")
