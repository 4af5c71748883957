"""`shieldserve evaluate`'s names and NAME=N values are checked before any work: a typo is one
line `shieldserve: error: ...` and status 2, before the query attacks run, the bundle is opened
or a surrogate is trained; and report.md's threat models state the budgets the run used."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from service import cli
from tests.test_cli import _one_error_line
from service.evaluation import harness

CONFIGURED = ("baseline", "default", "smoothing", "denoised", "robust", "magnet", "neuralfp", "defensegan", "rmc")


# `train` and `evaluate` configure logging (basicConfig, httpx at WARNING): undone after each test
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def reached(monkeypatch) -> dict[str, list[Any]]:
    """The evaluation and the query attacks replaced by recorders."""
    import service.evaluation
    from service.evaluation import query_attacks

    calls: dict[str, list[Any]] = {"evaluate": [], "query": []}

    def evaluate(cfg: Any) -> dict[str, Any]:
        calls["evaluate"].append(cfg)
        return {"seconds": 0.0, "pipelines": {}}

    monkeypatch.setattr(service.evaluation, "evaluate", evaluate)
    monkeypatch.setattr(query_attacks, "run", lambda url, out, **kw: calls["query"].append((url, kw)))
    return calls


@pytest.fixture
def never_reached(monkeypatch) -> None:
    """Any work at all fails the test: the evaluation, the query attacks, the surrogates."""
    import service.evaluation
    from service.evaluation import query_attacks, transfer

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(service.evaluation, "evaluate", fail)
    monkeypatch.setattr(query_attacks, "run", fail)
    monkeypatch.setattr(transfer, "load_or_train_surrogates", fail)


PIPELINES = "configured pipelines: " + ", ".join(CONFIGURED)
SECTIONS = "choose from oblivious, transfer, graybox, adaptive, blackbox, certify, autoattack, query"
ATTACKS = "choose from pgd, apgd, cw, bpda, gmsa, square, hsj, autoattack, mifgsm"
NORMS = "choose from linf, l2"


@pytest.mark.parametrize(("argv", "says"), [
    (["--sections", "oblivous"], ["--sections: unknown section 'oblivous'", SECTIONS]),
    (["--sections", "oblivious, certfy,transfer"], ["--sections: unknown section 'certfy'", SECTIONS]),
    (["--sections", ","], ["--sections ',': no section given", SECTIONS]),
    (["--sections", "query,oblivous", "--url", "http://127.0.0.1:9"], ["unknown section 'oblivous'", SECTIONS]),
    (["--attacks", "pgdd"], ["--attacks: unknown attack 'pgdd'", ATTACKS]),
    (["--attacks", "pgd,cw_art,sqare"], ["--attacks: unknown attacks 'cw_art', 'sqare'", ATTACKS]),
    (["--transfer-norms", "linf,l3"], ["--transfer-norms: unknown norm 'l3'", NORMS]),
    (["--autoattack-norms", "linf2"], ["--autoattack-norms: unknown norm 'linf2'", NORMS]),
    (["--pipelines", "baseline,basline"], ["--pipelines: unknown pipeline 'basline'", PIPELINES]),
    (["--pipeline-limit", "basline=2"], ["--pipeline-limit basline=2: no pipeline 'basline'", PIPELINES]),
    (["--certify-limit", "nosuch=3"], ["--certify-limit nosuch=3: no pipeline 'nosuch'", PIPELINES]),
    (["--smoothing-n", "x=5"], ["--smoothing-n x=5: no pipeline 'x'", PIPELINES]),
    (["--blackbox-limit", "baseline=2,rcm=1"], ["--blackbox-limit rcm=1: no pipeline 'rcm'", PIPELINES]),
    (["--adaptive-limit", "magent=4"], ["--adaptive-limit magent=4: no pipeline 'magent'", PIPELINES]),
    (["--certify-n-for", "smooth=100"], ["--certify-n-for smooth=100: no pipeline 'smooth'", PIPELINES]),
    (["--autoattack-limit", "rubust=10"], ["--autoattack-limit rubust=10: no pipeline 'rubust'", PIPELINES]),
    (["--pipeline-limit", "=2"], ["--pipeline-limit =2: no pipeline ''", PIPELINES]),
    (["--autoattack-budget", "foo=3"],
     ["--autoattack-budget foo=3: unknown key 'foo'; choose from apgd_iters, targets, square_queries, pgd_steps, "
      "pgd_restarts, eot_iter, check_draws"]),
    (["--autoattack-budget", "targets=0"], ["--autoattack-budget targets=0: N must be a whole number >= 1"]),
    (["--pipeline-limit", "baseline=0"], ["--pipeline-limit baseline=0: N must be a whole number >= 1"]),
    (["--smoothing-n", "smoothing=-5"], ["--smoothing-n smoothing=-5: N must be a whole number >= 1"]),
    (["--blackbox-limit", "baseline=-1"], ["--blackbox-limit baseline=-1: N must be a whole number >= 0"]),
    (["--certify-limit", "smoothing=all"], ["--certify-limit: expected NAME=N with N a whole number, got 'smoothing=all'"]),
    (["--autoattack-budget", "targets"], ["--autoattack-budget: expected NAME=N, got 'targets'"]),
    (["--limit", "0"], ["--limit 0: must be >= 1"]),
    (["--transfer-surrogates", "0"], ["--transfer-surrogates 0: must be >= 1"]),
])
def test_a_bad_value_is_one_line_and_status_2_before_any_work(argv: list[str], says: list[str], tmp_path,
                                                              never_reached, capsys) -> None:
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--out", str(out), "--limit", "5", *argv]) == 2
    line = _one_error_line(capsys)
    for text in says:
        assert text in line
    assert not out.exists()


def test_a_pipeline_of_the_config_is_a_valid_name(tmp_path, reached) -> None:
    """NAME=N may name a pipeline the user's --config adds (the packaged ones and theirs)."""
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({"pipelines": {"mine": {"defenses": []}}}))
    argv = ["evaluate", "--out", str(tmp_path / "r"), "--config", str(config), "--pipelines", "mine",
            "--pipeline-limit", "mine=3"]
    assert cli.main(argv) == 0
    [cfg] = reached["evaluate"]
    assert cfg.pipelines == ["mine"] and cfg.pipeline_limit == {"mine": 3}


def test_valid_values_reach_the_evaluation_parsed(tmp_path, reached) -> None:
    """Names with spaces around them, NAME=N for configured pipelines this run leaves out (the same
    flags serve runs split by --pipelines), 0 black-box digits (no black-box for that pipeline)."""
    out = tmp_path / "r"
    argv = ["evaluate", "--out", str(out), "--pipelines", "baseline, magnet", "--limit", "5",
            "--sections", "oblivious, autoattack,", "--attacks", "pgd, apgd,autoattack", "--transfer-norms", "l2",
            "--autoattack-norms", "linf", "--pipeline-limit", "baseline=2", "--pipeline-limit", "magnet=3",
            "--certify-limit", "smoothing=3", "--smoothing-n", "smoothing=50", "--blackbox-limit", "baseline=0",
            "--adaptive-limit", "magnet=4", "--certify-n-for", "smoothing=100", "--autoattack-limit", "baseline=1",
            "--autoattack-budget", "targets=2,apgd_iters=3", "--linf-eps", "0.1"]
    assert cli.main(argv) == 0
    [cfg] = reached["evaluate"]
    assert cfg.pipelines == ["baseline", "magnet"] and cfg.limit == 5 and out.is_dir()
    assert cfg.sections == ("oblivious", "autoattack") and cfg.attacks == ("pgd", "apgd", "autoattack")
    assert cfg.transfer_norms == ("l2",) and cfg.autoattack_norms == ("linf",)
    assert cfg.pipeline_limit == {"baseline": 2, "magnet": 3} and cfg.certify_limit == {"smoothing": 3}
    assert cfg.smoothing_n == {"smoothing": 50} and cfg.blackbox_limit == {"baseline": 0}
    assert cfg.adaptive_limit == {"magnet": 4} and cfg.certify_n_for == {"smoothing": 100}
    assert cfg.autoattack_limit == {"baseline": 1} and cfg.autoattack_budget == {"targets": 2, "apgd_iters": 3}
    assert cfg.budget.linf_eps == 0.1
    assert not reached["query"]


def test_the_defaults_reach_the_evaluation(tmp_path, reached) -> None:
    assert cli.main(["evaluate", "--out", str(tmp_path / "r")]) == 0
    [cfg] = reached["evaluate"]
    assert cfg.pipelines is None and cfg.attacks is None and cfg.sections == harness.ALL_SECTIONS
    assert cfg.transfer_norms == cfg.autoattack_norms == harness.NORMS
    assert all(getattr(cfg, name) == {} for name in harness.PIPELINE_COUNTS) and cfg.autoattack_budget == {}


def test_the_query_section_runs_first_and_alone_when_it_is_the_only_one(tmp_path, reached) -> None:
    url = "http://127.0.0.1:9"
    assert cli.main(["evaluate", "--out", str(tmp_path / "r"), "--sections", "query,oblivious", "--url", url]) == 0
    assert [u for u, _ in reached["query"]] == [url]
    [cfg] = reached["evaluate"]
    assert cfg.sections == ("oblivious",)
    assert cli.main(["evaluate", "--out", str(tmp_path / "q"), "--sections", "query", "--url", url]) == 0
    assert len(reached["query"]) == 2 and len(reached["evaluate"]) == 1


def test_the_evaluation_checks_its_config_before_opening_the_bundle(monkeypatch) -> None:
    """A program that builds EvalConfig itself gets the same ValueError, before the bundle loads."""
    from models.bundle import Bundle

    monkeypatch.setattr(Bundle, "load", lambda *a, **kw: pytest.fail("the bundle was opened"))
    for bad, says in (({"pipelines": ["nosuch"]}, "unknown pipeline 'nosuch'"),
                      ({"sections": ("oblivious", "query")}, "unknown section 'query'"),
                      ({"attacks": ("pgd", "fgsm")}, "unknown attack 'fgsm'"),
                      ({"transfer_norms": ("l1",)}, "unknown norm 'l1'"),
                      ({"certify_limit": {"nosuch": 3}}, "no pipeline 'nosuch'"),
                      ({"autoattack_budget": {"restarts": 2}}, "unknown key 'restarts'"),
                      ({"offset": -1}, "--offset -1: must be >= 0")):
        with pytest.raises(ValueError, match=re.escape(says)):
            harness.Evaluation(harness.EvalConfig(**bad))
    harness.EvalConfig(pipelines=["baseline"], certify_limit={"smoothing": 1}).check(CONFIGURED)


def test_the_lists_the_command_checks_are_the_harness_own() -> None:
    """Every attack the sections ask `wants` about is one --attacks may name (and the reverse);
    the help lists the same attacks and sections."""
    source = Path(harness.__file__).read_text()
    asked = set(re.findall(r"wants\(\"(\w+)\"\)", source)) | {"square", "hsj"}  # blackbox: wants(kind)
    assert asked | {"autoattack"} == set(harness.ATTACKS)
    with pytest.raises(AssertionError, match="not in harness.ATTACKS"):
        harness.EvalConfig().wants("fgsm")
    evaluate = cli.build_parser()._subparsers._group_actions[0].choices["evaluate"]
    helps = {a.dest: a.help for a in evaluate._actions}
    assert set(helps["attacks"].split(": ", 1)[1].split(",")) == set(harness.ATTACKS)
    for section in (*harness.ALL_SECTIONS, *harness.OPTIONAL_SECTIONS, "query"):
        assert section in helps["sections"]


# ---------------------------------------------------------------------- report.md's threat models
def _row(section: str, attack: str, **extra: Any) -> dict[str, Any]:
    return {"section": section, "attack": attack, "n": 4, "robust_accuracy": 0.5, "robust_accuracy_ci95": [0.1, 0.9],
            "attack_success": 0.5, "accepted_correct": 0.5, "wrong": 0.5, "rejected": 0.0, "abstained": 0.0,
            "mean_l2": 1.2, "mean_linf": 0.1, "attack_seconds_per_image": 0.01, **extra}


def _fake_report() -> dict[str, Any]:
    """A run at --linf-eps 0.1 --l2-eps 0.25,0.5 --square-queries 50 --hsj-queries 40 --transfer-steps 3
    --transfer-decay 0.9 --transfer-diversity 0 --eot-draws 2, on MNIST-sized digits."""
    from service.evaluation.attacks import Budget

    budget = Budget(linf_eps=0.1, l2_eps=(0.25, 0.5), linf_sweep=(0.033333, 0.066667, 0.1), square_queries=50,
                    hsj_queries=40, transfer_steps=3, transfer_decay=0.9, transfer_diversity=0.0, eot_draws=2)
    obl = {f"pgd_linf_{e:g}": {"attack": "pgd", "eps": e, "norm": "linf", "n": 4, "success_on_base": 0.5,
                               "mean_l2": 2.5, "mean_linf": e, "seconds_per_image": 0.01} for e in budget.linf_sweep}
    obl["apgd_linf_0.1"] = {**obl["pgd_linf_0.1"], "attack": "apgd"}
    obl["cw_l2"] = {"attack": "cw", "n": 4, "success_on_base": 1.0, "mean_l2": 1.4, "mean_linf": 0.4,
                    "seconds_per_image": 0.01}
    transfer = {f"mifgsm_di_{norm}_{eps:g}": {"attack": "mi-fgsm", "norm": norm, "eps": eps, "steps": 3, "decay": 0.9,
                                              "diversity": 0.0, "n": 4, "success_on_surrogates": 0.9,
                                              "success_on_base": 0.4, "mean_l2": 1.0, "mean_linf": 0.1,
                                              "seconds_per_image": 0.01}
                for norm, eps in (("linf", 0.1), ("l2", 0.5))}
    bb = {"mode": "in-process", "queries_used_mean": 10.0, "queries_used_max": 20, "found_any_adversarial": 0.5,
          "median_distance_found": 0.4}
    attacks = {"oblivious/pgd_linf_0.1": _row("oblivious", "pgd_linf_0.1"),
               "transfer/mifgsm_di_linf_0.1": _row("transfer", "mifgsm_di_linf_0.1"),
               "adaptive/eot_pgd_linf_0.1": _row("adaptive", "eot_pgd_linf_0.1"),
               "graybox/pgd_linf_0.1": _row("graybox", "pgd_linf_0.1"),
               "blackbox/square_linf_0.1": _row("blackbox", "square_linf_0.1", query_budget=50, eps=0.1, norm="linf",
                                                **bb),
               "blackbox/hsj_l2_0.5": _row("blackbox", "hsj_l2_0.5", query_budget=40, eps=0.5, norm="l2", **bb)}
    clean = {"accuracy": 1.0, "false_rejection_rate": 0.0, "abstention_rate": 0.0, "seconds_per_image": 0.01}
    certified = {"digits": 4, "n": 100, "n0": 100, "alpha": 0.001, "sigma": 0.25, "covers_detector": True,
                 "accuracy": {"0": 1.0, "0.25": 0.75, "0.5": 0.5}}
    return {"command": "shieldserve evaluate --linf-eps 0.1", "bundle": "b", "bundle_version": "v1",
            "dataset": "mnist5k test split, first 4 digits stratified by class", "limit": 4, "offset": 0, "seed": 0,
            "budget": budget.to_json(), "sections": ["oblivious", "transfer", "graybox", "adaptive", "blackbox",
                                                     "certify"],
            "attacks": None, "certify": {"n": 100, "n0": 100, "alpha": 0.001},
            "machine": {"python": "3", "torch": "2", "threads": 1, "processor": "cpu"},
            "oblivious_attacks": obl, "transfer_attacks": transfer,
            "transfer_surrogates": {"surrogates": [{"architecture": "cnn", "seed": 0, "epochs": 1, "test_accuracy": 0.9,
                                                    "train_seconds": 1.0, "cached": True}] * 2},
            "pipelines": {"smoothing": {"digits": 4, "clean": clean, "attacks": attacks, "seconds": 1.0,
                                        "adaptive_model": "EOT x2", "certified": certified}},
            "seconds": 1.0}


def test_the_threat_models_state_the_budgets_the_run_used() -> None:
    from service.evaluation import report

    md = report.markdown(_fake_report(), {})
    threats = md[md.index("Threat models"):md.index("Coverage")]
    assert "ART PGD and APGD-CE at L-inf eps 0.1, PGD at eps 0.033333 and 0.066667 for the sweep, and " \
           "Carlini-Wagner L2" in threats
    assert "trains 2 surrogates" in threats and "MI-FGSM (momentum 0.9, 3 steps) without input diversity" in threats
    assert "at L-inf eps 0.1 and L2 eps 0.5" in threats
    assert "PGD at L-inf eps 0.1, and at L2 eps 0.25 and 0.5 on smoothing pipelines" in threats
    assert "L-inf attacks at eps 0.1, EOT also at L2 eps 0.25 and 0.5" in threats and "over 2 fresh" in threats
    assert "Square (score-based, L-inf eps 0.1, 50 queries per digit)" in threats
    assert "HopSkipJump (label-only, L2, 40 queries per digit" in threats and "within L2 <= 0.5" in threats
    limits = md[md.index("## Limits"):]
    assert "L-inf eps 0.1 perturbations have L2 norms near 2.5" in limits and "radius (0.5)" in limits
    assert "at most 50 queries per digit" in limits
    # the MNIST defaults the text used to state whatever the run used
    for default in ("eps 0.3", "0.1 and 0.2 for the sweep", "momentum 1", "10 steps", "probability 0.5",
                    "L2 <= 2", "near 6", "a few hundred queries"):
        assert default not in md, default


def test_the_threat_models_leave_out_what_the_run_did_not_measure() -> None:
    from service.evaluation import report

    fake = _fake_report()
    fake.update(transfer_attacks={}, sections=["oblivious"], attacks=["pgd"])
    fake["oblivious_attacks"] = {k: v for k, v in fake["oblivious_attacks"].items() if k == "pgd_linf_0.1"}
    fake["pipelines"]["smoothing"]["attacks"] = {"oblivious/pgd_linf_0.1": _row("oblivious", "pgd_linf_0.1")}
    text = report.threat_models(fake)
    assert "(ART PGD at L-inf eps 0.1) and then sent" in text
    for absent in ("**Transfer**", "**Gray-box**", "**Adaptive", "**Black-box**", "APGD", "Carlini"):
        assert absent not in text, absent
    assert "queries per digit" not in report.limits(fake)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--linf-eps", "-0.1"], "--linf-eps"), (["--linf-eps", "0"], "--linf-eps"), (["--linf-eps", "2"], "--linf-eps"),
    (["--pgd-steps", "0"], "--pgd-steps"), (["--square-queries", "-5"], "--square-queries"),
    (["--transfer-diversity", "1.5"], "--transfer-diversity"), (["--transfer-decay", "-1"], "--transfer-decay"),
    (["--transfer-steps", "x"], "--transfer-steps"), (["--query-budget", "0"], "--query-budget"),
    (["--query-attacks", "square_0.3,hjs"], "--query-attacks"), (["--query-attacks", "square_2"], "--query-attacks"),
    (["--query-attacks", ","], "--query-attacks"), (["--query-l2-eps", "0"], "--query-l2-eps"),
    # --threads -1 was torch's RuntimeError traceback; --jobs 0 was taken (one process, said nowhere)
    (["--threads", "-1"], "--threads"), (["--jobs", "0"], "--jobs"), (["--linf-eps", "nan"], "--linf-eps"),
    (["--transfer-decay", "inf"], "--transfer-decay"),
])
def test_a_bad_budget_is_an_argparse_error(argv: list[str], flag: str, tmp_path, never_reached, capsys) -> None:
    """The budgets took 0 or a negative (`--linf-eps -0.1`) and --query-attacks any name: they
    failed, or measured nothing, once the run was under way."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--out", str(tmp_path / "report"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"shieldserve evaluate: error: argument {flag}: ")
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------- --out, and the service at --url
def test_an_out_that_is_a_file_is_one_line(tmp_path, never_reached, capsys) -> None:
    """os.makedirs(--out) raised FileExistsError (a traceback) after the query section had run."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    for sections in ("oblivious", "query"):
        assert cli.main(["evaluate", "--out", str(out), "--sections", sections, "--url", "http://127.0.0.1:9"]) == 2
        assert f"--out {out} is a file" in _one_error_line(capsys)
    assert out.read_text() == "mine"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_service_that_cannot_be_reached_or_refuses_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    """The query section against a --url nobody listens on (httpx's ConnectError, wrapped in
    ServiceError) or one that refuses the API key: a traceback, now one line and status 2."""
    from service.evaluation import blackbox, query_attacks

    url = f"http://127.0.0.1:{_closed_port()}"
    argv = ["evaluate", "--out", str(tmp_path / "q"), "--sections", "query", "--url", url, "--query-digits", "1",
            "--query-budget", "5", "--query-attacks", "hsj", "--query-no-adaptive"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # the section's progress bar (query_attacks' own tqdm) around the line
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "shieldserve: error: " in line]
    assert line.split("shieldserve: error: ")[1].startswith("ConnectError")

    def refused(url: str, out: Path, **kw: Any) -> None:
        raise blackbox.ServiceError("401 unauthorized from the service: it needs an API key this evaluation does not "
                                    "have (give --api-key, or set SHIELDSERVE_EVAL_API_KEY)")

    monkeypatch.setattr(query_attacks, "run", refused)
    assert cli.main([*argv, "--api-key", "wrong"]) == 2
    assert "401 unauthorized" in _one_error_line(capsys)


def _finished(out: Path, **extra: Any) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"command": "shieldserve evaluate --limit 200", "started": "2026-01-01T00:00:00Z",
                       "pipelines": {}, **extra})
    (out / "report.json").write_text(text)
    return text


def test_a_finished_report_is_not_replaced_without_force(tmp_path, reached, capsys) -> None:
    """evaluate replaced an earlier run's finished report in the same --out without a word."""
    out = tmp_path / "r"
    text = _finished(out, finished="2026-01-01T01:00:00Z")
    assert cli.main(["evaluate", "--out", str(out), "--limit", "5"]) == 2
    line = _one_error_line(capsys)
    assert f"--out {out} holds the finished report of an earlier run (finished 2026-01-01T01:00:00Z" in line
    assert "--force" in line and "shieldserve evaluate --limit 200" in line
    assert (out / "report.json").read_text() == text and not reached["evaluate"]
    # the query section alone writes query_attacks.*, not report.json: not refused
    assert cli.main(["evaluate", "--out", str(out), "--sections", "query", "--url", "http://127.0.0.1:9"]) == 0
    assert len(reached["query"]) == 1
    assert cli.main(["evaluate", "--out", str(out), "--limit", "5", "--force"]) == 0
    assert len(reached["evaluate"]) == 1


def test_an_interrupted_run_is_started_over_without_force(tmp_path, reached) -> None:
    """A report.json without `finished` is an interrupted run's (saved as it went): rerunning the
    command into the same --out (where its transfer surrogates are cached) is how it goes on."""
    out = tmp_path / "r"
    _finished(out)
    assert cli.main(["evaluate", "--out", str(out), "--limit", "5"]) == 0
    (out / "report.json").write_text('{"command": "shieldserve evaluate", "pipel')  # cut off mid-write
    assert cli.main(["evaluate", "--out", str(out), "--limit", "5"]) == 0
    assert len(reached["evaluate"]) == 2


def test_the_report_files_are_replaced_whole(tmp_path, monkeypatch) -> None:
    """report.json (after every pipeline), report.md, the plots and --doc were rewritten in place:
    a reader, or a run killed mid-write, saw half a file. Each is now written beside and renamed
    over the old one: a reader's open file keeps the old whole, and a failed write leaves it."""
    import os
    from types import SimpleNamespace

    from service.evaluation import report

    out, doc = tmp_path / "r", tmp_path / "docs" / "security-report.md"
    out.mkdir()
    doc.parent.mkdir()
    names = ("report.json", "report.md", "accuracy_vs_eps.png")
    for path in (*(out / n for n in names), doc):
        path.write_text("old " * 1000)
    readers = {p: open(p) for p in (*(out / n for n in names), doc)}
    try:
        fake = SimpleNamespace(cfg=SimpleNamespace(out=str(out)), report=_fake_report())
        harness.Evaluation.save(fake)  # type: ignore[arg-type]
        report.write(fake.report, out, doc=doc)
        for path, fh in readers.items():
            assert fh.read() == "old " * 1000, path  # the old file, whole
            assert os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino, path  # a new file took its name
        assert json.loads((out / "report.json").read_text())["bundle_version"] == "v1"
    finally:
        for fh in readers.values():
            fh.close()
    assert not [p.name for p in (out, doc.parent) for p in p.iterdir() if p.name.endswith(".tmp")]

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    before = (out / "report.json").read_text()
    fake.report["pipelines"] = {}
    with pytest.raises(OSError, match="No space left"):
        harness.Evaluation.save(fake)  # type: ignore[arg-type]
    assert (out / "report.json").read_text() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_the_coverage_table_gives_each_black_box_attack_its_own_budget() -> None:
    """The coverage column showed the first black-box row's budget (Square's) for both attacks."""
    from service.evaluation import report

    row = report.coverage(_fake_report())[0]
    assert "square 50" in row[4] and "hsj 40" in row[4], row


def test_a_bundle_refused_at_load_leaves_no_empty_out_dir(tmp_path, capsys) -> None:
    """The bundle is loaded after --out is made: a refusal there (here, a directory that is no
    bundle; an untrusted TorchScript classifier alike) left an empty --out behind."""
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--bundle", str(nothing), "--out", str(out), "--limit", "5"]) == 2
    _one_error_line(capsys)
    assert not out.exists()
    kept = tmp_path / "kept"  # a directory the user made is theirs, even empty
    kept.mkdir()
    assert cli.main(["evaluate", "--bundle", str(nothing), "--out", str(kept), "--limit", "5"]) == 2
    assert kept.is_dir()
