"""Pipelines are checked at start-up: order of roles, known defenses, clear errors."""

from __future__ import annotations

import pytest
import torch

from service.defenses.base import ArgmaxDecider, Component, Detection, Purified, RunContext
from service.pipeline import Pipeline, PipelineConfigError


class _Det(Component):
    role = "detector"
    defense = "probe"

    def detect(self, x, classify, ctx):
        return [Detection("bright", x.flatten(1).mean(1), threshold=0.5)]


class _Pur(Component):
    role = "purifier"
    defense = "invert"

    def purify(self, x, classify, ctx):
        return Purified(1 - x, {"change": (x - (1 - x)).abs().flatten(1).mean(1)})


class _Smooth(Component):
    role = "decider"
    defense = "fake_smoothing"
    certifies = True

    def decide(self, x, classify, ctx):
        d = ArgmaxDecider().decide(x, classify, ctx)
        d.radius = torch.full((x.shape[0],), 0.5)
        return d


def _pipeline(components):

    Pipeline._check_order("p", components)
    clf = lambda x: torch.stack([x.flatten(1).mean(1), 1 - x.flatten(1).mean(1)], 1) * 10  # noqa: E731
    return Pipeline("p", components, clf, ("dark", "light"))


def test_detector_rejects_and_skips_later_stages():
    p = _pipeline([_Det(), _Pur()])
    x = torch.stack([torch.full((1, 4, 4), 0.9), torch.full((1, 4, 4), 0.1)])
    res = p.run(x, RunContext())
    assert res[0].status == "rejected" and res[0].label is None
    assert res[0].rejected_by[0].detector == "bright" and res[0].rejected_by[0].threshold == 0.5
    assert [s.defense for s in res[0].stages] == ["probe"]  # the purifier never ran on it
    assert res[1].status == "accepted" and [s.defense for s in res[1].stages] == ["probe", "invert"]
    assert res[1].label == 0  # inverted 0.1 -> 0.9, which the toy classifier calls "dark"=0
    assert res[1].stages[1].details["change"] == pytest.approx(0.8)


def test_purifier_after_certifying_decider_is_composed_into_it():
    p = _pipeline([_Smooth(), _Pur()])
    res = p.run(torch.full((1, 1, 4, 4), 0.1), RunContext())
    assert res[0].label == 0 and res[0].certified_radius == 0.5


@pytest.mark.parametrize("components,message", [
    ([_Pur(), _Det()], "order"),
    ([ArgmaxDecider(), _Pur()], "only purifiers may follow"),
    ([ArgmaxDecider(), ArgmaxDecider()], "at most one"),
])
def test_bad_orders_are_refused(components, message):
    with pytest.raises(PipelineConfigError, match=message):
        Pipeline._check_order("p", components)


def test_unknown_defense_fails_at_start_up(quick_bundle):
    from service.app import create_app
    from service.settings import load_settings

    with pytest.raises(PipelineConfigError, match="unknown defense"):
        create_app(load_settings(bundle=quick_bundle, pipelines={"x": {"defenses": ["nonexistent"]}}))
    with pytest.raises(PipelineConfigError, match="default_pipeline"):
        create_app(load_settings(bundle=quick_bundle, default_pipeline="missing"))


@pytest.mark.parametrize("entry,message", [
    ({"defense": "smoothing", "sigma": 0.5, "target_radius": 11}, "target_radius must be in"),
    ({"defense": "smoothing", "sigma": 0.5, "alpha": 0.999}, r"alpha must be in \[1e-12, 0.5\)"),
    ({"defense": "smoothing", "sigma": 0.5, "alpha": 0.5}, r"alpha must be in \[1e-12, 0.5\)"),
    ({"defense": "smoothing", "sigma": 0.5, "alpha": 1e-13}, "alpha must be in"),
    ({"defense": "smoothing", "sigma": 0.5, "n": 0}, "n >= 1"),
    ({"defense": "smoothing", "sigma": 0.3}, "sigma 0.3: the bundle has"),
    ({"defense": "rmc", "k": 0}, "rmc"),
    ({"defense": "rmc", "lr": 0}, "rmc"),
    ({"defense": "rmc", "patience": 0}, "rmc"),
])
def test_a_defense_option_past_its_bound_refuses_start_up(quick_bundle, entry, message):
    """Each bound on a pipeline's defense options is a start-up error naming the pipeline, not a
    wrong answer later (a pipeline alpha of 0.999 "certified" radius 0.69 after 16 samples)."""
    from service.app import create_app
    from service.settings import load_settings

    with pytest.raises(PipelineConfigError, match=message) as info:
        create_app(load_settings(bundle=quick_bundle, warmup=False, pipelines={"x": {"defenses": [entry]}}))
    assert "pipeline 'x'" in str(info.value)


def test_a_pipeline_alpha_inside_the_bounds_starts(quick_bundle):
    from service.app import create_app
    from service.settings import load_settings

    for alpha in (1e-12, 0.499):
        create_app(load_settings(bundle=quick_bundle, warmup=False, pipelines={
            "x": {"defenses": [{"defense": "smoothing", "sigma": 0.5, "alpha": alpha}]}}))


def test_a_monitor_window_larger_than_the_images_refuses_start_up(quick_bundle):
    """It hashes windows of the flattened image: a window past its 784 values made every
    monitored request a 500 while /readyz said ready."""
    from service.app import create_app
    from service.settings import load_settings

    with pytest.raises(PipelineConfigError, match=r"query_monitor.window \(785\) is larger than this bundle's images "
                                                  r"\(784 values\)"):
        create_app(load_settings(bundle=quick_bundle, warmup=False, query_monitor={"window": 785}))
    create_app(load_settings(bundle=quick_bundle, warmup=False, query_monitor={"window": 784}))
    # no pipeline monitored: nothing to refuse
    create_app(load_settings(bundle=quick_bundle, warmup=False, query_monitor={"window": 785},
                             pipelines={name: {"query_monitor": False} for name in ("default", "smoothing", "denoised",
                                        "robust", "magnet", "neuralfp", "defensegan", "rmc")}))


def test_a_monitor_threshold_above_the_fingerprint_width_refuses_start_up(quick_bundle):
    """A 28x28 query has 80 + 28 hashes: a threshold above 108 could never be met, and was
    lowered to 108 without a word (only exact copies flagged)."""
    from service.app import create_app
    from service.settings import load_settings

    message = r"query_monitor threshold \{'magnet': 109\} is above the 108 hashes a query of this bundle has"
    with pytest.raises(PipelineConfigError, match=message):
        create_app(load_settings(bundle=quick_bundle, warmup=False,
                                 pipelines={"magnet": {"query_monitor": {"threshold": 109}}}))
    # the service-wide policy too, against a narrower fingerprint: 4 + 28 hashes
    with pytest.raises(PipelineConfigError, match=r"'default': 40.* above the 32 hashes .*top_n 4"):
        create_app(load_settings(bundle=quick_bundle, warmup=False,
                                 query_monitor={"top_n": 4, "policy": {"threshold": 40}}))
    create_app(load_settings(bundle=quick_bundle, warmup=False,
                             pipelines={"magnet": {"query_monitor": {"threshold": 108}}}))


class _Adapt(Component):
    role = "adapter"
    defense = "adapt"

    def adapt(self, x, classify, ctx):
        return classify


class _NoFollowers(_Smooth):
    composes_followers = False


@pytest.mark.parametrize("components,message", [
    ([_Pur(), _Smooth()], "only detectors may come before fake_smoothing: invert"),
    ([_Det(), _Adapt(), _Smooth()], "only detectors may come before fake_smoothing: adapt"),
    ([_NoFollowers(), _Pur()], "would never run"),
])
def test_what_would_void_a_certificate_is_refused(components, message):
    """A purifier or adapter before a certifying decider makes the radius hold around the
    changed image (or an input-dependent classifier), not around the input; purifiers after a
    decider that does not compose them would never run. Each is refused, not served."""
    with pytest.raises(PipelineConfigError, match=message):
        Pipeline._check_order("p", components)
    Pipeline._check_order("p", [_Det(), _Smooth(), _Pur()])  # detectors before, purifiers composed after


@pytest.mark.parametrize("defenses,message", [
    ([{"defense": "magnet", "reform": True}, {"defense": "smoothing", "sigma": 0.5}], "only detectors may come before"),
    ([{"defense": "rmc"}, {"defense": "smoothing", "sigma": 0.25, "denoiser": True}], "only detectors may come before"),
    ([{"defense": "smoothing", "sigma": 0.5}, {"defense": "magnet", "reform": True, "detectors": []}], "never run"),
])
def test_a_pipeline_whose_certificate_would_not_cover_its_input_refuses_start_up(quick_bundle, defenses, message):
    from service.app import create_app
    from service.settings import load_settings

    with pytest.raises(PipelineConfigError, match=message):
        create_app(load_settings(bundle=quick_bundle, pipelines={"x": {"defenses": defenses}}))
