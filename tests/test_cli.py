"""The `shieldserve` command line (service/cli.py) through its real parser and `main`, with the
heavy function each subcommand ends in (build_bundle, the server, the evaluation, the export)
replaced by a recorder: what the user typed reaches it, and a missing required flag is
argparse's exit status 2."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from service import cli

REPO = Path(__file__).resolve().parents[1]


# `train` and `evaluate` configure logging (basicConfig, httpx at WARNING): undone after each test
pytestmark = pytest.mark.usefixtures("restore_logging")


def test_the_console_script_is_the_cli_main() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["shieldserve"] == "service.cli:main"
    from importlib.metadata import EntryPoint

    assert EntryPoint(name="shieldserve", value="service.cli:main", group="console_scripts").load() is cli.main


def test_the_parser_has_the_four_commands() -> None:
    parser = cli.build_parser()
    for command in ("train", "serve", "evaluate", "export"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0, command


def test_train_reaches_build_bundle_with_its_flags(tmp_path, monkeypatch, capsys) -> None:
    import models.train

    calls: list[tuple[Any, dict[str, Any]]] = []

    def build_bundle(out: Any, **kwargs: Any) -> Path:
        calls.append((out, kwargs))
        manifest = Path(out) / "manifest.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"version": "v-test", "metrics": {"accuracy": 0.5}}))
        return manifest

    monkeypatch.setattr(models.train, "build_bundle", build_bundle)
    out = tmp_path / "bundle"
    assert cli.main(["train", "--out", str(out), "--preset", "quick", "--seed", "3", "--dataset", "mnist5k"]) == 0
    [(got_out, kwargs)] = calls
    assert Path(got_out) == out
    assert (kwargs["preset"], kwargs["seed"], kwargs["dataset"]) == ("quick", 3, "mnist5k")
    assert kwargs["steps"] is None and kwargs["classifier"] is None and kwargs["device"] == "cpu"
    printed = json.loads(capsys.readouterr().out)
    assert printed["bundle"] == str(out) and printed["version"] == "v-test"


@pytest.fixture()
def logging_restored(logging_restored_all):
    """`serve` configures the process's logging: put it back after (conftest's fixture)."""
    yield


def test_serve_reaches_the_server_with_the_port_and_the_config_file(tmp_path, monkeypatch, logging_restored) -> None:
    import service.server

    calls: list[tuple[Any, Any]] = []
    monkeypatch.setattr(service.server, "serve", lambda settings, config: calls.append((settings, config)))
    config = tmp_path / "shieldserve.yaml"
    config.write_text("default_pipeline: baseline\nbatching: {max_batch_size: 7}\n")
    assert cli.main(["serve", "--config", str(config), "--port", "9001"]) == 0
    [(settings, got_config)] = calls
    assert settings.port == 9001
    assert got_config == str(config)
    assert settings.default_pipeline == "baseline" and settings.batching.max_batch_size == 7  # the file was read
    assert "magnet" in settings.pipelines  # merged over the packaged configuration


def test_a_warning_from_reading_the_settings_is_logged_as_the_settings_say(monkeypatch, capsys,
                                                                            logging_restored) -> None:
    """An unknown SHIELDSERVE_* variable's WARNING reached stderr as a bare line (logging was
    not configured yet): it is held, then logged as a JSON line with its level."""
    import service.server

    monkeypatch.setattr(service.server, "serve", lambda settings, config: None)
    monkeypatch.setenv("SHIELDSERVE_GRACEFUL_TIMEOUT", "10")
    assert cli.main(["serve"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [warning] = [r for r in lines if "SHIELDSERVE_GRACEFUL_TIMEOUT" in r["message"]]
    assert warning["level"] == "warning" and warning["logger"] == "shieldserve"


def test_a_list_setting_in_the_environment_that_is_not_json_says_so(monkeypatch) -> None:
    from service.settings import load_settings

    monkeypatch.setenv("SHIELDSERVE_TRUSTED_PROXIES", "172.28.5.10")
    with pytest.raises(ValueError, match=r"setting trusted_proxies \(SHIELDSERVE_TRUSTED_PROXIES, or a SHIELDSERVE_TRUSTED_PROXIES__\* one\) holds a list or mapping, written in JSON"):
        load_settings()


def test_evaluate_accepts_pipeline_as_an_alias_of_pipelines(tmp_path, monkeypatch) -> None:
    import service.evaluation

    configs: list[Any] = []

    def evaluate(cfg: Any) -> dict[str, Any]:
        configs.append(cfg)
        return {"seconds": 0.0, "pipelines": {}}

    monkeypatch.setattr(service.evaluation, "evaluate", evaluate)
    out = tmp_path / "report"
    argv = ["evaluate", "--out", str(out), "--pipeline", "magnet", "--pipelines", "default,rmc", "--limit", "5"]
    assert cli.main(argv) == 0
    [cfg] = configs
    assert cfg.pipelines == ["magnet", "default", "rmc"]
    assert cfg.limit == 5 and Path(cfg.out) == out and out.is_dir()


def cli_default_bundle() -> Any:
    from service.settings import Settings

    return Settings.model_fields["bundle"].default_factory()


def test_export_reaches_export_and_a_refusal_is_status_2(tmp_path, monkeypatch, capsys) -> None:
    import service.export
    from service.export import ExportRefused

    calls: list[tuple[Any, ...]] = []

    class Plan:
        pipeline, parts, left_out, exact = "magnet", ["reformer", "classifier"], [], True

    def export(bundle: Any, pipeline: str, out: Any, config: Any = None, force: bool = False) -> Plan:
        calls.append((bundle, pipeline, out, config))
        if pipeline == "smoothing":
            raise ExportRefused("randomized")
        return Plan()

    monkeypatch.setattr(service.export, "export", export)
    out = str(tmp_path / "m.pt")
    monkeypatch.delenv("SHIELDSERVE_BUNDLE", raising=False)
    monkeypatch.delenv("SHIELDSERVE_CONFIG", raising=False)
    assert cli.main(["export", "--pipeline", "magnet", "--out", out]) == 0
    assert calls[-1] == (str(cli_default_bundle()), "magnet", out, None)  # the packaged one, from any directory
    assert json.loads(capsys.readouterr().out)["parts"] == ["reformer", "classifier"]
    # without --bundle: the `bundle` setting as `serve` reads it (it was "models/default" relative to
    # the working directory, whatever SHIELDSERVE_BUNDLE or the config said)
    monkeypatch.setenv("SHIELDSERVE_BUNDLE", str(tmp_path / "env-bundle"))
    assert cli.main(["export", "--pipeline", "magnet", "--out", out]) == 0
    assert calls[-1][0] == str(tmp_path / "env-bundle")
    monkeypatch.delenv("SHIELDSERVE_BUNDLE")
    config = tmp_path / "c.yaml"
    config.write_text(f"bundle: {tmp_path / 'config-bundle'}\n")
    assert cli.main(["export", "--pipeline", "magnet", "--out", out, "--config", str(config)]) == 0
    assert calls[-1] == (str(tmp_path / "config-bundle"), "magnet", out, str(config))
    capsys.readouterr()
    assert cli.main(["export", "--bundle", "B", "--pipeline", "smoothing", "--out", out]) == 2
    assert calls[-1] == ("B", "smoothing", out, None)
    assert "export refused" in capsys.readouterr().err


def test_load_info_reads_an_exports_description_without_unpickling_anything(quick_bundle, tmp_path,
                                                                            monkeypatch) -> None:
    """load_info reads the JSON entry torch.jit.save stored in the archive (a zip file) and never
    loads the module (torch.jit.load unpickles the file's constants): the same description as
    torch's own reader gives, whatever the file is named; anything else is a ValueError."""
    import pickle
    import shutil

    import torch

    from service.export import INFO_FILE, export, load_info

    out = tmp_path / "baseline.pt"
    export(quick_bundle, "baseline", out)
    files = {INFO_FILE: ""}
    torch.jit.load(str(out), _extra_files=files)
    want = json.loads(files[INFO_FILE])

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load_info loaded the module")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    info = load_info(out)
    assert info == want and info["pipeline"] == "baseline" and info["input"]["range"] == [0.0, 1.0]
    renamed = tmp_path / "renamed.pt"  # the archive's directory inside is still "baseline"
    shutil.copy(out, renamed)
    assert load_info(renamed) == want
    plain = tmp_path / "plain.pt"  # TorchScript, but not an export of ours
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(plain))
    with pytest.raises(ValueError, match="not a shieldserve export"):
        load_info(plain)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"pipeline": "baseline"}))
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        load_info(pickled)


@pytest.mark.parametrize("argv", [["train", "--preset", "quick"], ["evaluate", "--pipeline", "magnet"],
                                  ["export", "--pipeline", "magnet"], ["export", "--out", "m.pt"], []])
def test_a_missing_required_argument_exits_with_status_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def _recorders(monkeypatch) -> dict[str, Any]:
    """build_bundle and evaluate replaced by recorders of the command line they are given."""
    import models.train
    import service.evaluation

    seen: dict[str, Any] = {}

    def build_bundle(out: Any, **kwargs: Any) -> Path:
        seen["train"] = " ".join(kwargs["argv"])
        manifest = Path(out) / "manifest.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"version": "v-test"}))
        return manifest

    def evaluate(cfg: Any) -> dict[str, Any]:
        seen["evaluate"] = cfg.command.removeprefix("shieldserve evaluate ")
        return {"seconds": 0.0, "pipelines": {}}

    monkeypatch.setattr(models.train, "build_bundle", build_bundle)
    monkeypatch.setattr(service.evaluation, "evaluate", evaluate)
    return seen


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_the_recorded_command_line_is_the_one_given_to_main(command: str, tmp_path, monkeypatch) -> None:
    """The manifest and the report record the command that made them (so it can be rerun); a
    programmatic main(argv) must record argv, as the console script records its own."""
    seen = _recorders(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "unrelated"])
    flags = ["--out", str(tmp_path / "o"), "--seed", "3"]
    assert cli.main([command, *flags]) == 0
    assert seen[command] == " ".join(flags)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_the_console_script_records_its_command_line(command: str, tmp_path, monkeypatch) -> None:
    """main() without argv (the `shieldserve` script): the arguments after the subcommand."""
    seen = _recorders(monkeypatch)
    flags = ["--out", str(tmp_path / "o"), "--seed", "3"]
    monkeypatch.setattr(sys, "argv", ["shieldserve", command, *flags])
    assert cli.main() == 0
    assert seen[command] == " ".join(flags)


# ------------------------------------------------------------------ a user's mistake is one line
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shieldserve: error: "), err
    return lines[0]


@pytest.fixture
def no_build(monkeypatch) -> None:
    """The mistakes below are found before the build starts (nothing written, no dataset loaded)."""
    import models.train

    def build_bundle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("build_bundle was reached")

    monkeypatch.setattr(models.train, "build_bundle", build_bundle)


def _npz(path: Path, **drop: bool) -> Path:
    import numpy as np

    arrays = {"x_train": np.zeros((4, 1, 8, 8), np.float32), "y_train": np.arange(4) % 2,
              "x_test": np.zeros((2, 1, 8, 8), np.float32), "y_test": np.arange(2)}
    np.savez(path, **{k: v for k, v in arrays.items() if not drop.get(k)})
    return path


def test_train_mistakes_are_one_line_and_status_2(tmp_path, no_build, capsys) -> None:
    import torch
    from safetensors.torch import save_file

    out = ["train", "--out", str(tmp_path / "b")]
    no_x_test = _npz(tmp_path / "no_x_test.npz", x_test=True)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    cases = {  # argv: what the one line must name
        "missing npz": (["--dataset", f"npz:{tmp_path / 'none.npz'}"], "none.npz: no such file"),
        "missing .pt": (["--classifier", f"torchscript:{tmp_path / 'none.pt'}"], "none.pt: no such file"),
        "unknown classifier": (["--classifier", "mlp"], "--classifier must be"),
        "npz without x_test": (["--dataset", f"npz:{no_x_test}"], "lacks x_test"),
        # the import: path of README "Bring your own model", with weights of another network
        "weights mismatch": (["--classifier", "import:examples.photo_cnn:PhotoCNN",
                              "--classifier-weights", str(tmp_path / "other.safetensors")],
                             "do not fit examples.photo_cnn:PhotoCNN: state_dict keys"),
        "missing weights": (["--classifier", "import:examples.photo_cnn:PhotoCNN",
                             "--classifier-weights", str(tmp_path / "none.safetensors")], "no such file"),
        "feature layer alone": (["--feature-layer", "fc1"], "--feature-layer is for a classifier you bring"),
        # each was ignored, and the built-in classifier trained for hours (an auditor, stop 46)
        "weights alone": (["--classifier-weights", str(tmp_path / "none.safetensors")],
                          "--classifier-weights is for a classifier you bring"),
        "kwargs alone": (["--classifier-kwargs", '{"x": 1}'], "--classifier-kwargs is for a classifier you bring"),
        "std alone": (["--std", "0.5"], "--std goes with --mean"),
        # an existing file: os.makedirs' FileExistsError traceback
        "out is a file": (["--out", str(no_x_test)], f"--out {no_x_test} is a file; --out names the bundle directory"),
    }
    before = no_x_test.read_bytes()
    for name, (argv, says) in cases.items():
        assert cli.main(out + argv) == 2, name
        assert says in _one_error_line(capsys), name
    assert not (tmp_path / "b").exists()
    assert no_x_test.read_bytes() == before


def test_a_file_exists_error_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    """Wherever else a path the user gave is in the way (os.makedirs under --out), one line."""
    import models.train

    monkeypatch.setattr(models.train, "build_bundle",
                        lambda out, **kw: (_ for _ in ()).throw(FileExistsError(17, "File exists", str(out))))
    assert cli.main(["train", "--out", str(tmp_path / "b")]) == 2
    assert "File exists" in _one_error_line(capsys)


def test_train_force_reaches_build_bundle(tmp_path, monkeypatch) -> None:
    _recorders(monkeypatch)
    import models.train

    kwargs: dict[str, Any] = {}
    recorder = models.train.build_bundle
    monkeypatch.setattr(models.train, "build_bundle", lambda out, **kw: (kwargs.update(kw), recorder(out, **kw))[1])
    assert cli.main(["train", "--out", str(tmp_path / "b")]) == 0
    assert kwargs["force"] is False
    assert cli.main(["train", "--out", str(tmp_path / "b"), "--force"]) == 0
    assert kwargs["force"] is True


@pytest.mark.parametrize(("argv", "flag"), [
    (["--value-range", "0"], "--value-range"), (["--value-range", "1,0"], "--value-range"),
    (["--options", "{bad json"], "--options"), (["--options", "[1]"], "--options"),
    (["--classifier-kwargs", "{"], "--classifier-kwargs"), (["--steps", "bogus"], "--steps"),
    (["--steps", "magnet,bogus"], "--steps"), (["--mean", "a"], "--mean"), (["--std", "0"], "--std"),
    # a fraction: "2" (meant as 2 %) turned the quality gate off
    (["--max-accuracy-drop", "2"], "--max-accuracy-drop"), (["--max-accuracy-drop", "1"], "--max-accuracy-drop"),
    (["--max-accuracy-drop", "-0.01"], "--max-accuracy-drop"), (["--max-accuracy-drop", "nan"], "--max-accuracy-drop")])
def test_bad_option_values_are_argparse_errors(argv: list[str], flag: str, tmp_path, no_build, capsys) -> None:
    """Values argparse can check are checked by it: its usage line, then one error line, status 2."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--out", str(tmp_path / "b"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"shieldserve train: error: argument {flag}: ")


def test_good_option_values_reach_build_bundle(tmp_path, monkeypatch) -> None:
    _recorders(monkeypatch)
    import models.train

    kwargs: dict[str, Any] = {}
    recorder = models.train.build_bundle
    monkeypatch.setattr(models.train, "build_bundle", lambda out, **kw: (kwargs.update(kw), recorder(out, **kw))[1])
    assert cli.main(["train", "--out", str(tmp_path / "b"), "--value-range=-1,1", "--mean", "0.5",
                     "--steps", "magnet, quality", "--options", '{"quality": {"images": 0}}',
                     "--max-accuracy-drop", "0.05"]) == 0
    assert kwargs["input_overrides"] == {"value_range": (-1.0, 1.0), "mean": (0.5,), "std": (1.0,)}
    assert kwargs["steps"] == ["magnet", "quality"]
    assert kwargs["options"] == {"quality": {"images": 0, "max_accuracy_drop": 0.05}}
    for drop in ("0", "0.999"):  # the ends of [0, 1)
        assert cli.main(["train", "--out", str(tmp_path / "b"), "--max-accuracy-drop", drop]) == 0
        assert kwargs["options"] == {"quality": {"max_accuracy_drop": float(drop)}}


def test_the_max_accuracy_drop_error_says_it_is_a_fraction(tmp_path, no_build, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(tmp_path / "b"), "--max-accuracy-drop", "2"])
    assert "expected a number at least 0 and below 1 (a fraction: 0.02 is 2%), got '2'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "flag"), [
    (["--port", "99999"], "--port"), (["--port", "65536"], "--port"), (["--port", "-5"], "--port"),
    (["--port", "http"], "--port"), (["--workers", "0"], "--workers"), (["--workers", "-2"], "--workers")])
def test_bad_serve_values_are_argparse_errors(argv: list[str], flag: str, monkeypatch, capsys) -> None:
    """uvicorn listened on 99999 mod 65536 (logging 99999) and refused -5 with "Servname not
    supported for ai_socktype" after the bundle had loaded."""
    import service.server

    monkeypatch.setattr(service.server, "serve", lambda settings, config: pytest.fail("the server was started"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"shieldserve serve: error: argument {flag}: ")


def test_serve_takes_the_ends_of_the_port_range_and_refuses_a_port_setting_past_it(monkeypatch, capsys,
                                                                                  logging_restored) -> None:
    import service.server

    served: list[Any] = []
    monkeypatch.setattr(service.server, "serve", lambda settings, config: served.append(settings))
    for port in ("0", "65535"):
        assert cli.main(["serve", "--port", port, "--workers", "1"]) == 0
    assert [s.port for s in served] == [0, 65535]
    monkeypatch.setenv("SHIELDSERVE_PORT", "99999")  # the setting itself, from the environment
    assert cli.main(["serve"]) == 2
    assert "port" in _one_error_line(capsys) and len(served) == 2


def test_evaluate_on_a_missing_bundle_is_one_line(tmp_path, capsys) -> None:
    assert cli.main(["evaluate", "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "no manifest.json" in _one_error_line(capsys)
    assert cli.main(["evaluate", "--out", str(tmp_path / "r"), "--pipeline-limit", "magnet=all"]) == 2
    assert "expected NAME=N" in _one_error_line(capsys)


def test_serve_with_a_missing_config_is_one_line(tmp_path, capsys) -> None:
    assert cli.main(["serve", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in _one_error_line(capsys)


def test_a_key_error_is_shown_without_quotes_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch,
                                                                              capsys) -> None:
    import models.train

    raised: list[BaseException] = []
    monkeypatch.setattr(models.train, "build_bundle", lambda out, **kw: (_ for _ in ()).throw(raised[-1]))
    argv = ["train", "--out", str(tmp_path / "b")]
    raised.append(KeyError("x_val is not a file in the archive"))
    assert cli.main(argv) == 2
    assert _one_error_line(capsys) == "shieldserve: error: x_val is not a file in the archive"
    with pytest.raises(KeyError):  # --traceback: the exception itself, for a bug report
        cli.main([*argv, "--traceback"])
    raised.append(RuntimeError("CUDA error: an illegal memory access"))  # not the user's doing
    with pytest.raises(RuntimeError, match="illegal memory"):
        cli.main(argv)
    from models.bundle import BundleError

    raised.append(BundleError("classifier.safetensors: sha256 does not match the manifest"))
    assert cli.main(argv) == 2
    assert "sha256 does not match" in _one_error_line(capsys)


def test_the_help_says_how_to_get_the_traceback(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "--traceback" in capsys.readouterr().out
    for command in ("train", "serve", "evaluate", "export"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        assert "--traceback" in capsys.readouterr().out


def test_a_held_warning_is_still_told_when_the_settings_are_refused(monkeypatch, capsys, logging_restored) -> None:
    """A misspelt variable (ignored, a warning) beside one that is refused: the warning was held
    for the logging the settings never configured, and lost with the refusal."""
    import service.server

    monkeypatch.setattr(service.server, "serve", lambda settings, config: None)
    monkeypatch.setenv("SHIELDSERVE_MAX_REQUEST_TIMEOUT", "300")  # the name lacks its _S
    monkeypatch.setenv("SHIELDSERVE_REQUEST_TIMEOUT_S", "200")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "request_timeout_s (200) is above max_request_timeout_s" in err
    assert "name no setting, ignored: SHIELDSERVE_MAX_REQUEST_TIMEOUT" in err
