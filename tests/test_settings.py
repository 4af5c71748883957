"""Settings precedence: packaged config < --config file < environment < explicit overrides."""

from __future__ import annotations

import pytest

from service.settings import load_settings


def test_config_file_merges_pipelines_and_env_overrides(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipelines:\n  extra:\n    defenses: []\n  default: null\n"
                   "default_pipeline: extra\nbatching:\n  max_batch_size: 8\n")
    s = load_settings(cfg)
    assert "extra" in s.pipelines and "baseline" in s.pipelines and "default" not in s.pipelines
    assert s.batching.max_batch_size == 8 and s.batching.max_delay_ms == 0.0
    monkeypatch.setenv("SHIELDSERVE_BATCHING__MAX_BATCH_SIZE", "5")
    assert load_settings(cfg).batching.max_batch_size == 5
    assert load_settings(cfg, port=9999).port == 9999


def test_invalid_settings_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(Exception):
        load_settings(batching={"max_batch_size": 0})
    with pytest.raises(Exception):
        load_settings(limits={"resize": "stretch"})


def test_a_setting_the_service_does_not_read_is_refused(tmp_path):
    # an ignored setting would be silently wrong: an operator would believe it applied
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="defense_options"):
        load_settings(defense_options={"rmc": {"k": 5}})
    cfg = tmp_path / "s.yaml"
    cfg.write_text("limits:\n  max_images_per_requests: 4\n")  # a typo
    with pytest.raises(ValidationError, match="max_images_per_requests"):
        load_settings(cfg)


def test_settings_errors_never_echo_a_value(tmp_path):
    # an API key pasted where its digest belongs, a password in a URL: the error names the
    # field and the rule, never the value (start-up errors end up in logs)
    from pydantic import ValidationError

    pasted = "pasted-plain-key-0a9b8c7d6e"
    with pytest.raises(ValidationError) as exc:
        load_settings(api_keys={"bob": pasted})
    assert pasted not in str(exc.value) and "sha256" in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        load_settings(query_monitor={"redis_url": "redis://:pw-in-url-77@h:1/0", "window": "wide"})
    assert "pw-in-url-77" not in str(exc.value) and "window" in str(exc.value)


def test_redis_urls_are_redacted_for_logs():
    from service.redis_store import redact

    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://user:s3cret@h/0") == "redis://user:***@h/0"
    assert redact("redis://h:6379/0?db=1&password=s3cret") == "redis://h:6379/0?db=1&password=***"
    assert redact("unix:///run/redis.sock?password=s3cret") == "unix:///run/redis.sock?password=***"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    # a password holding '#', '/', '?' or '@' unencoded (generated ones do): urlsplit ends the
    # authority at the first of them and had left the password in
    for pw in ("s3cr3t#Pw", "ab/cdEF+gh", "pa?ss", "p@ss", "x:y"):
        url = f"redis://:{pw}@127.0.0.1:6379/0"
        assert redact(url) == "redis://:***@127.0.0.1:6379/0", url
    assert redact("rediss://u:pw@h/0?password=x#frag") == "rediss://u:***@h/0?password=***"
    assert redact("redis://h/0?Password=abc&db=1") == "redis://h/0?Password=***"  # nothing after it shown
    # redis-py reads query keys percent-decoded
    assert redact("redis://h/0?pass%77ord=hunter2&db=1") == "redis://h/0?pass%77ord=***"
    assert redact("redis://h/0?db=1&%70assword=hunter2#x") == "redis://h/0?db=1&%70assword=***"
    # a password holding an unencoded '&' or '#' runs past where a parser ends the value: nothing
    # after the parameter is shown; nor a `;password=` or `password%3D` redis-py does not read
    for url in ("redis://h/0?password=p&w0rd!x", "redis://h/0?password=p#w0rd!x", "redis://h/0?db=1;password=w0rd!x",
                "redis://h/0?password%3Dw0rd!x&db=1"):
        assert "w0rd" not in redact(url) and redact(url).endswith("=***"), redact(url)


@pytest.mark.parametrize("pw", ["s3cr3t#Pw", "ab/cdEF+gh", "zq9?Kw7"])
def test_a_redis_url_redis_cannot_read_is_named_without_its_password(pw, caplog):
    """redis-py's own error for such a URL quotes the part it could not read: the password."""
    from service.defenses.query_monitor import QueryMonitor
    from service.redis_store import RedisStore, connect

    url = f"redis://:{pw}@127.0.0.1:6379/0"
    for make in (lambda: connect(url, 0.2), lambda: RedisStore(url, timeout_s=0.2),
                 lambda: QueryMonitor(store="redis", redis_url=url)):
        try:
            make()
        except ValueError as exc:
            text = str(exc) + repr(exc) + str(exc.__cause__ or "") + str(exc.__context__ or "")
        else:
            text = ""
        secret = pw.split("#")[0].split("/")[0].split("?")[0]
        assert secret not in text and secret not in caplog.text


def test_no_setting_takes_inf_or_nan() -> None:
    """`query_monitor.policy.cooldown_s: .inf` started (a blocked client's Retry-After then a
    500), as did an infinite memory window or request timeout: every float setting is finite."""
    from pydantic import ValidationError

    from service.settings import Settings

    for bad in ({"query_monitor": {"policy": {"cooldown_s": float("inf")}}},
                {"query_monitor": {"memory_window_s": float("inf")}}, {"request_timeout_s": float("inf")},
                {"certify": {"store_max_age_s": float("nan")}}, {"admission": {"max_cost": float("inf")}}):
        with pytest.raises(ValidationError, match="finite number"):
            Settings(**bad)


def test_a_config_path_that_is_a_directory_says_so(tmp_path) -> None:
    from service.settings import load_settings

    with pytest.raises(FileNotFoundError, match="is a directory, not a file"):  # "does not exist" before
        load_settings(tmp_path)


def test_log_level_formats_and_costs_are_checked_at_start(quick_bundle) -> None:
    """Values a start-up took and that failed later or silently (an auditor, stop 48):
    log_level `warn` failed in uvicorn after the whole load, `verbose` named no setting; a
    misspelt format (JEPG) turned JPEG off (every JPEG a 415); a negative cost_per_image took
    the units in flight below 0 (max_cost then limited nothing), and a misspelt pipeline's was
    never used."""
    from pydantic import ValidationError

    from service.runtime import Runtime
    from service.pipeline import PipelineConfigError
    from service.settings import Settings, load_settings

    assert Settings(log_level="WARNING").log_level == "warning"
    for bad in ("warn", "verbose", "fatal", 10):
        with pytest.raises(ValidationError, match="log_level"):
            Settings(log_level=bad)
    assert Settings(limits={"formats": ["png", "jpg", "Webp"]}).limits.formats == ["png", "jpg", "Webp"]
    for bad, said in ((["PNG", "JEPG"], "\\['JEPG'\\] are not image formats"), ([], "at least one")):
        with pytest.raises(ValidationError, match=said):
            Settings(limits={"formats": bad})
    with pytest.raises(ValidationError, match="cost_per_image.magnet"):
        Settings(admission={"cost_per_image": {"magnet": -1e9}})
    with pytest.raises(PipelineConfigError, match="cost_per_image names pipelines that are not configured: \\['magnett'\\]"):
        Runtime(load_settings(bundle=quick_bundle, warmup=False, admission={"cost_per_image": {"magnett": 5}}))


def test_the_certify_alpha_setting_has_the_bound_the_api_enforces() -> None:
    # one bound for a configured alpha and a requested one: service.defenses.smoothing.MIN_ALPHA
    from pydantic import ValidationError

    from service.defenses.smoothing import MIN_ALPHA
    from service.settings import Settings

    assert Settings(certify={"alpha": MIN_ALPHA}).certify.alpha == MIN_ALPHA
    for bad in (MIN_ALPHA / 2, 0.5, 0.0):
        with pytest.raises(ValidationError):
            Settings(certify={"alpha": bad})


def test_settings_that_would_refuse_every_request_are_refused_at_start() -> None:
    """certify's defaults above their maxima made every /certify without n= a 422 about an n
    the client never sent; a queue shorter than the largest request made such a request a 503
    with Retry-After on an idle replica, forever."""
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=r"certify.default_n \(10000\) is above certify.max_n \(5000\)"):
        Settings(certify={"max_n": 5000})
    with pytest.raises(ValidationError, match=r"certify.default_n0 \(100\) is above certify.max_n0 \(50\)"):
        Settings(certify={"max_n0": 50})
    assert Settings(certify={"max_n": 5000, "default_n": 5000}).certify.max_n == 5000
    with pytest.raises(ValidationError, match=r"batching.max_queue \(4\) is below limits.max_images_per_request \(64\)"):
        Settings(batching={"max_queue": 4})
    assert Settings(batching={"max_queue": 4}, limits={"max_images_per_request": 4}).batching.max_queue == 4
    # a default deadline past the longest one a request may have (the gateway gave up first)
    with pytest.raises(ValidationError, match=r"request_timeout_s \(200\) is above max_request_timeout_s \(120\)"):
        Settings(request_timeout_s=200)
    assert Settings(request_timeout_s=200, max_request_timeout_s=200).request_timeout_s == 200


def test_an_environment_variable_naming_no_setting_is_refused_or_said(monkeypatch, caplog) -> None:
    """pydantic-settings drops an unknown top-level SHIELDSERVE_* variable without a word: a
    one-underscore SHIELDSERVE_ADMISSION_MAX_CLIENT_COST left the per-client share off. Such a
    section typo is refused; any other unknown name is a WARNING (an environment may hold
    variables of its own); an orchestrator's for a service named shieldserve are neither."""
    import logging

    from service.settings import load_settings, unknown_environment

    monkeypatch.setenv("SHIELDSERVE_ADMISSION_MAX_CLIENT_COST", "100")
    with pytest.raises(ValueError, match=r"SHIELDSERVE_ADMISSION_MAX_CLIENT_COST \(did you mean "
                                         r"SHIELDSERVE_ADMISSION__MAX_CLIENT_COST\?\)"):
        load_settings()
    monkeypatch.delenv("SHIELDSERVE_ADMISSION_MAX_CLIENT_COST")
    monkeypatch.setenv("shieldserve_gil_switch_interval_ms", "1")  # names are not case-sensitive
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        load_settings()
    assert any("name no setting, ignored: shieldserve_gil_switch_interval_ms" in r.getMessage().lower()
               for r in caplog.records)
    # settings in any case, a section's variables, the variables the project reads besides
    # settings, and Kubernetes' and Docker's links for a service or container named shieldserve
    assert unknown_environment({"SHIELDSERVE_Admission__Max_Client_Cost": "5", "SHIELDSERVE_WORKERS": "2",
                                "SHIELDSERVE_CONFIG": "c.yaml", "SHIELDSERVE_RAY_MAX_REPLICAS": "2",
                                "SHIELDSERVE_TEST_QUICK_BUNDLE": "b", "SHIELDSERVE_WORK_DIR": "w",
                                "SHIELDSERVE_EVAL_API_KEY": "k", "OTHER": "x",
                                "SHIELDSERVE_SERVICE_HOST": "10.0.0.1", "SHIELDSERVE_SERVICE_PORT": "8000",
                                "SHIELDSERVE_SERVICE_PORT_HTTP": "8000", "SHIELDSERVE_PORT_8000_TCP": "tcp://10.0.0.1:8000",
                                "SHIELDSERVE_PORT_8000_TCP_ADDR": "10.0.0.1", "SHIELDSERVE_PORT_8000_TCP_PORT": "8000",
                                "SHIELDSERVE_PORT_8000_TCP_PROTO": "tcp", "SHIELDSERVE_NAME": "/web/shieldserve",
                                "SHIELDSERVE_ENV_FOO": "x"}) == []
    monkeypatch.delenv("shieldserve_gil_switch_interval_ms")
    monkeypatch.setenv("SHIELDSERVE_ADMISSION__MAX_CLIENT_COST", "5")
    monkeypatch.setenv("SHIELDSERVE_SERVICE_HOST", "10.0.0.1")
    assert load_settings().admission.max_client_cost == 5


def test_kubernetes_service_link_in_shieldserve_port_is_ignored_with_a_warning(monkeypatch, caplog) -> None:
    """A Kubernetes Service named shieldserve sets SHIELDSERVE_PORT=tcp://IP:PORT in every pod,
    the `port` setting's variable: start-up failed on "port: Input should be a valid integer".
    The link is ignored, said once; a port number in it is still read, and anything else is
    still refused."""
    import logging

    from service.settings import load_settings

    monkeypatch.setenv("SHIELDSERVE_PORT", "tcp://10.96.12.7:8000")
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        assert load_settings().port == 8000
        assert load_settings(port=9001).port == 9001
    assert sum("SHIELDSERVE_PORT=tcp://10.96.12.7:8000 is ignored" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.setenv("SHIELDSERVE_PORT", "8123")
    assert load_settings().port == 8123
    monkeypatch.setenv("SHIELDSERVE_PORT", "http://10.96.12.7:8000")
    with pytest.raises(ValueError, match="port"):
        load_settings()


def test_settings_errors_never_show_a_secret_a_config_line_or_a_reversed_key(tmp_path) -> None:
    """PyYAML quotes the offending line (an unclosed quote on `admin_api_key:` showed the key),
    and an `api_keys` mapping written the wrong way round (`KEY: name`) put the key in the
    entry's name, which the error named."""
    from service.settings import load_settings

    secret = "Adm1nS3cretKey-" + "x" * 20
    for text in (f'admin_api_key: "{secret}\n', f"query_monitor:\n  secret: {secret}: value\n"):
        config = tmp_path / "bad.yaml"
        config.write_text("default_pipeline: baseline\n" + text)
        with pytest.raises(ValueError, match=r"not valid YAML at line \d+, column \d+") as e:
            load_settings(str(config))
        assert secret not in str(e.value) and "Adm1n" not in str(e.value)
    with pytest.raises(ValueError, match="entry 2 of 2") as e:
        load_settings(api_keys={"alice": "a" * 64, secret: "bob"})
    assert secret not in str(e.value) and "bob" not in str(e.value)


def test_the_port_is_one_tcp_can_listen_on() -> None:
    """uvicorn took 99999 and listened on 99999 mod 65536 (34463), logging 99999; -5 failed once
    the bundle had loaded, with "Servname not supported for ai_socktype"."""
    from pydantic import ValidationError

    for bad in (99999, 65536, -5):
        with pytest.raises(ValidationError, match="port"):
            load_settings(port=bad)
    assert load_settings(port=0).port == 0 and load_settings(port=65535).port == 65535


def test_a_pipeline_named_without_defenses_keeps_the_packaged_defenses(tmp_path):
    """`pipelines.magnet.query_monitor` in a file (the settings table's own example) replaced
    the packaged pipeline: `magnet` and `robust` then served the bare classifier, without a
    word, while the same setting in the environment merged field by field. A pipeline that
    gives its own `defenses` still replaces the packaged one of that name."""
    packaged = load_settings().pipelines
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipelines:\n  magnet:\n    query_monitor: {action: block}\n  robust:\n    threads: 1\n"
                   "  smoothing:\n    defenses: []\n    description: mine\n")
    s = load_settings(cfg)
    assert s.pipelines["magnet"].defenses == packaged["magnet"].defenses != []
    assert s.pipelines["magnet"].query_monitor == {"action": "block"}
    assert s.pipelines["magnet"].description == packaged["magnet"].description
    assert s.pipelines["robust"].defenses == packaged["robust"].defenses != [] and s.pipelines["robust"].threads == 1
    assert s.pipelines["smoothing"].defenses == [] and s.pipelines["smoothing"].description == "mine"
    assert s.pipelines["smoothing"].query_monitor is None  # replaced: nothing of the packaged one kept


def test_a_validation_error_names_the_settings_not_an_internal_class():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        load_settings(port=70000)
    assert "validation error for settings" in str(err.value) and "_Loaded" not in str(err.value)
