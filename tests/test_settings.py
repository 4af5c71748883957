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
