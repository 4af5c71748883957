"""Defense-GAN on real digits: the projection lowers the reconstruction error from its starting
point, counts generator passes exactly, is reproducible from the run's generator and honours
deadlines; the quick preset trains in seconds; the pipeline serves through /predict with the
stage's reconstruction error in the answer."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from models.bundle import Bundle
from service.defenses.base import DeadlineExceeded, RunContext
from tests.conftest import defense_env, png

PIPELINES = {
    "defensegan": {"defenses": [{"defense": "defensegan"}]},
    "defensegan_detect": {"defenses": [{"defense": "defensegan", "detect": True}]},
    "defensegan_rec": {"defenses": [{"defense": "defensegan", "classifier": "rec"}]},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the tiny generator's best


@pytest.fixture(scope="module")
def nets(env):
    section = env.bundle.defense("defensegan")
    return env.bundle.module(section["generator"]), env.bundle.module(section["encoder"])


def test_quick_preset_trains_in_seconds(quick_bundle):
    manifest = Bundle.load(quick_bundle).manifest
    step = {s["step"]: s for s in manifest["build"]["steps"]}["defensegan"]
    assert step["seconds"] < 30, step  # ~10 s alone on 2 cores; slack for a busy machine
    assert {"defensegan_generator", "defensegan_encoder", "defensegan_classifier"} <= set(manifest["artifacts"])
    assert (quick_bundle / manifest["defenses"]["defensegan"]["samples_png"]).stat().st_size > 100


@pytest.mark.parametrize("init", ["random", "encoder"])
def test_projection_lowers_error_and_counts_passes(nets, mnist, init):
    from service.defenses.defensegan import project, ProjectionSettings

    gen, enc = nets
    x = mnist.test.per_class(2).x
    s = ProjectionSettings(steps=25, restarts=3, optimizer="adam", lr=0.05, init=init, init_noise=0.5)
    p = project(gen, x, s, encoder=enc, rng=torch.Generator().manual_seed(0))
    assert p.x.shape == x.shape and float(p.x.min()) >= 0 and float(p.x.max()) <= 1
    assert (p.error < p.initial_error).all(), (p.error, p.initial_error)
    # the reported error is the returned image's error
    assert torch.allclose(p.error, (p.x - x).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-7)
    # no early stopping, no pruning: every restart runs every step
    assert p.generator_evals.tolist() == [25 * 3] * len(x)
    # pruning to the best restart after 5 steps: 3 rows for 5 steps, then 1 row for 20
    pruned = project(gen, x, replace(s, prune_at=5), encoder=enc, rng=torch.Generator().manual_seed(0))
    assert pruned.generator_evals.tolist() == [3 * 5 + 20] * len(x)


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3), (20, 1)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_generator_gradient_matches_autograd(image_size, channels, rows):
    """The generator's written-out backward pass against autograd's, on both kernel paths
    (rows up to NATIVE_MAX_ROWS: ATen's direct kernels; more: the default ones) and the
    generator's shapes (MNIST's crop to 7x7, CIFAR's 32x32x3, a crop of the output)."""
    from models.recipes.defensegan import Generator

    torch.manual_seed(rows * 100 + image_size)
    gen = Generator(latent_dim=16, width=4, channels=channels, image_size=image_size).eval()
    z = torch.randn(rows, 16)
    target = torch.rand(rows, channels, image_size, image_size)
    out, loss, grad = gen.reconstruction_grad(z, target)
    zr = z.clone().requires_grad_(True)
    ref_out = gen(zr)
    ref_loss = (ref_out - target).pow(2).flatten(1).mean(1)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), zr)
    assert not out.requires_grad and not grad.requires_grad
    assert torch.allclose(out, ref_out.detach(), atol=1e-6)
    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-5, atol=1e-8)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))


def _masked_projection(generator, x, s, encoder, rng):
    """The projection as it was written before its active rows were packed (a mask over all
    b * r rows, gathered and scattered every step), with autograd's gradients: the reference
    the packed loop must reproduce exactly."""
    from service.defenses.defensegan import _clamp_norm

    b, r, latent = x.shape[0], s.restarts, generator.latent_dim
    image = torch.arange(b).repeat_interleave(r)
    target = x.repeat_interleave(r, dim=0)
    with torch.no_grad():
        z0 = encoder(x).repeat_interleave(r, dim=0)
    noise = torch.randn(z0.shape, generator=rng)
    noise.view(b, r, latent)[:, 0] = 0
    z = _clamp_norm(z0 + s.init_noise * noise, s, latent)
    buf1, buf2 = torch.zeros_like(z), torch.zeros_like(z)
    best_loss = torch.full((b * r,), float("inf"))
    best_z, best_x = z.clone(), torch.zeros_like(target)
    initial = torch.full((b * r,), float("inf"))
    since = torch.zeros(b * r, dtype=torch.long)
    active = torch.ones(b * r, dtype=torch.bool)
    evals = torch.zeros(b, dtype=torch.long)
    steps_run = torch.zeros(b * r, dtype=torch.long)
    for t in range(s.steps):
        rows = active.nonzero().flatten()
        if rows.numel() == 0:
            break
        zr = z[rows].detach().requires_grad_(True)
        with torch.enable_grad():
            out = generator(zr)
            loss = (out - target[rows]).pow(2).flatten(1).mean(1)
            (grad,) = torch.autograd.grad(loss.sum(), zr)
        evals.index_add_(0, image[rows], torch.ones_like(rows))
        steps_run[rows] += 1
        loss = loss.detach()
        if t == 0:
            initial[rows] = loss
        better = loss < best_loss[rows] * (1 - s.min_delta)
        improved = loss < best_loss[rows]
        upd = rows[improved]
        best_loss[upd] = loss[improved]
        best_z[upd] = zr.detach()[improved]
        best_x[upd] = out.detach()[improved]
        since[rows] = torch.where(better, torch.zeros_like(since[rows]), since[rows] + 1)
        lr = s.lr * (s.decay if t >= int(s.decay_at * s.steps) else 1.0)
        m = 0.9 * buf1[rows] + 0.1 * grad
        v = 0.999 * buf2[rows] + 0.001 * grad * grad
        buf1[rows], buf2[rows] = m, v
        k = steps_run[rows].unsqueeze(1).float()
        z[rows] = zr.detach() - lr * (m / (1 - 0.9 ** k)) / ((v / (1 - 0.999 ** k)).sqrt() + 1e-8)
        z[rows] = _clamp_norm(z[rows], s, latent)
        active &= since < s.patience
        if t + 1 == s.prune_at:
            keep = best_loss.view(b, r).argmin(1) + torch.arange(b) * r
            mask = torch.zeros_like(active)
            mask[keep] = True
            active &= mask
    pick = best_loss.view(b, r).argmin(1) + torch.arange(b) * r
    return best_x[pick], best_loss[pick], initial.view(b, r).min(1).values, evals, steps_run.view(b, r).max(1).values


def test_packed_projection_reproduces_the_masked_one(nets, mnist):
    """Packing the active rows changes no step: with the same gradients (autograd's, through a
    wrapper that hides the generator's own backward pass) every image gets the same
    projection, error, step count and generator passes as the masked loop, with restarts
    pruned and rows stopping early at different steps."""
    from service.defenses.defensegan import PRESETS, project

    gen, enc = nets

    class AutogradOnly(torch.nn.Module):
        def __init__(self, g):
            super().__init__()
            self.g, self.latent_dim = g, g.latent_dim

        def forward(self, z):
            return self.g(z)

    x = mnist.test.per_class(2).x
    s = replace(PRESETS["default"], steps=60, patience=6, prune_at=5)
    p = project(AutogradOnly(gen), x, s, encoder=enc, rng=torch.Generator().manual_seed(3))
    ref_x, ref_err, ref_initial, ref_evals, ref_steps = _masked_projection(gen, x, s, enc, torch.Generator().manual_seed(3))
    assert p.generator_evals.tolist() == ref_evals.tolist() and p.steps.tolist() == ref_steps.tolist()
    assert torch.allclose(p.x, ref_x, atol=1e-6) and torch.allclose(p.error, ref_err, rtol=1e-6)
    assert torch.allclose(p.initial_error, ref_initial, rtol=1e-6)
    # and the generator's own gradients give projections as good (chaotic trajectories: the
    # same steps from a gradient differing in the last bits diverge; the errors do not)
    fast = project(gen, x, s, encoder=enc, rng=torch.Generator().manual_seed(3))
    assert float(fast.error.mean()) <= 1.05 * float(ref_err.mean())
    assert torch.allclose(fast.initial_error, ref_initial, rtol=1e-5)


def test_early_stopping_is_per_image(nets, mnist):
    from service.defenses.defensegan import PRESETS, project

    gen, enc = nets
    x = mnist.test.per_class(3).x
    p = project(gen, x, PRESETS["default"], encoder=enc, rng=torch.Generator().manual_seed(0))
    s = PRESETS["default"]
    assert (p.generator_evals <= s.restarts * s.prune_at + (s.steps - s.prune_at)).all()
    assert p.generator_evals.min() < p.generator_evals.max() or p.steps.max() < s.steps
    assert (p.error <= p.initial_error).all()


def test_random_restarts_come_from_the_run_generator_and_deadlines_stop_it(env, mnist):
    from service.defenses.defensegan import build

    (purifier,) = build({"projection": "paper", "overrides": {"steps": 3, "restarts": 2}}, env)
    x = mnist.test.per_class(1).x
    a = purifier.purify(x, env.classifier, RunContext(seed=7))
    b = purifier.purify(x, env.classifier, RunContext(seed=7))
    c = purifier.purify(x, env.classifier, RunContext(seed=8))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.details["reconstruction_error"].shape == (len(x),)
    with pytest.raises(DeadlineExceeded):
        purifier.purify(x, env.classifier, RunContext(deadline=time.monotonic() - 1))


def test_detector_threshold_round_trips(env, mnist):
    from service.defenses.defensegan import build

    record = env.bundle.defense("defensegan")["detector"]["reconstruction_error"]
    assert record["target_fpr"] == 0.01 and record["measured_val_fpr"] <= 0.01 + 1e-9
    detector, purifier = build({"detect": True}, env)
    assert [detector.role, purifier.role] == ["detector", "purifier"]
    assert detector.threshold == record["thresholds"]["reconstruction_error"]
    # far-off-manifold inputs (white-on-black inverted: mostly white) score above the
    # threshold; the purifier reuses the detector's work
    noise = 0.7 + 0.3 * torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ctx = RunContext()
    (det,) = detector.detect(noise, env.classifier, ctx)
    assert det.rejected.all(), (det.scores, det.threshold)
    out = purifier.purify(noise, env.classifier, ctx)
    assert torch.equal(out.details["reconstruction_error"], det.scores)


def test_the_purifier_reuses_only_its_own_runs_projections(env, mnist, monkeypatch):
    # the detector's projections are kept in the run's context: the purifier of the same run
    # reuses them (one image sent twice included, each with its own), another run never does
    import service.defenses.defensegan as dg

    detector, purifier = dg.build({"detect": True}, env)
    calls = []
    real = dg.project
    monkeypatch.setattr(dg, "project", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    p, q = mnist.test.x[0], mnist.test.x[1]
    x = torch.stack([p, q, p])
    ctx = RunContext(seed=3)
    (det,) = detector.detect(x, env.classifier, ctx)
    out = purifier.purify(x, env.classifier, ctx)
    assert calls == [3] and torch.equal(out.details["reconstruction_error"], det.scores)
    other = purifier.purify(x, env.classifier, RunContext(seed=3))  # a fresh run projects anew
    assert calls == [3, 3] and torch.equal(other.details["reconstruction_error"], det.scores)
    assert not ctx.memo[detector.projector] or all(not v for v in ctx.memo[detector.projector].values())


def test_options_are_checked(env):
    from service.defenses.defensegan import build

    for bad in ({"projection": "fastest"}, {"bogus": 1}, {"overrides": {"stepz": 3}},
                {"detect": True, "projection": "paper"}, {"detect": True, "rate": 0.05},
                {"classifier": "other"}):
        with pytest.raises(ValueError):
            build(bad, env)


def test_pipeline_serves_through_predict(make_client, mnist):
    client = make_client(pipelines=PIPELINES)
    x = mnist.test.per_class(1).x[:3]
    files = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(len(x))]
    bright = 0.7 + 0.3 * torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1))
    files.append(("file", ("bright.png", png(bright), "image/png")))
    body = client.post("/predict?pipeline=defensegan", files=files)
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    for r in results:
        assert r["status"] == "accepted" and r["label"] is not None
        (stage,) = [s for s in r["stages"] if s["defense"] == "defensegan"]
        assert stage["reconstruction_error"] >= 0 and stage["generator_evals"] > 0
    assert results[-1]["stages"][0]["reconstruction_error"] > max(r["stages"][0]["reconstruction_error"]
                                                                 for r in results[:-1])
    det = client.post("/predict?pipeline=defensegan_detect", files=files).json()["results"]
    assert det[-1]["status"] == "rejected"
    assert det[-1]["rejected_by"][0]["detector"] == "reconstruction_error"
    pipes = {p["name"]: p for p in client.get("/pipelines").json()["pipelines"]}
    assert [d["role"] for d in pipes["defensegan_detect"]["defenses"]] == ["detector", "purifier"]
    rec = client.post("/predict?pipeline=defensegan_rec", files=files[:1]).json()["results"][0]
    purify, adapt = [s for s in rec["stages"] if s["defense"] == "defensegan"]  # projection, Rec classifier
    assert purify["reconstruction_error"] >= 0 and "reconstruction_error" not in adapt
    assert [d["role"] for d in pipes["defensegan_rec"]["defenses"]] == ["purifier", "adapter"]


def test_rec_classifier_and_bundle_settings(env, mnist):
    """`classifier: rec` classifies G(z*) with the Defense-GAN-Rec classifier (trained on
    projections); the default keeps the base classifier; `default` runs the bundle's stored settings."""
    from service.defenses.defensegan import build

    section = env.bundle.defense("defensegan")
    assert section["classifier"] == "defensegan_classifier"
    purifier, adapter = build({"classifier": "rec"}, env)
    assert adapter.role == "adapter" and adapter.public_settings() == {"classifier": "defensegan_classifier"}
    x = mnist.test.per_class(1).x
    classify = adapter.adapt(x, env.classifier, RunContext())
    assert classify is not env.classifier and classify(x).shape == (len(x), 10)
    assert [c.role for c in build({}, env)] == ["purifier"]
    stored = {k: v for k, v in section["projection"].items() if k != "preset"}
    assert {k: v for k, v in purifier.public_settings().items() if k != "projection"} == stored
    assert stored["min_norm"] == stored["max_norm"] == 1.0  # z on the sphere ||z|| = sqrt(latent)


def test_default_bundle_purifies_clean_digits(default_bundle, mnist):
    from service.defenses.defensegan import build

    env = defense_env(default_bundle)
    if "defensegan" not in env.bundle.manifest.get("defenses", {}):
        pytest.skip("models/default has no defensegan artifacts yet")
    (purifier,) = build({}, env)
    x, y = mnist.test.per_class(5).x, mnist.test.per_class(5).y
    classify = env.classifier
    out = purifier.purify(x, env.classifier, RunContext())
    with torch.no_grad():
        acc = float((classify(out.x).argmax(1) == y).float().mean())
    assert acc >= 0.9


def test_a_checkpoint_of_other_data_is_not_resumed(mnist, tmp_path):
    """The checkpoint key holds the train/validation content's sha256 (not only the dataset's name
    and sizes), and a checkpoint recording other data is refused on load, never resumed."""
    from types import SimpleNamespace

    from models.datasets import Dataset, Split
    from models.recipes import defensegan
    from models.recipes.common import dataset_sha256, seeded

    small = Dataset("small", Split(mnist.train.x[:64], mnist.train.y[:64]), mnist.val.per_class(2),
                    mnist.test.per_class(2), mnist.class_names)
    resplit = Dataset("small", Split(mnist.train.x[64:128], mnist.train.y[64:128]), small.val, small.test,
                      small.class_names)
    r = defensegan.recipe("quick", generator_steps=2, checkpoint_every=1)
    ctx = lambda ds: SimpleNamespace(options={"defensegan": {"work_dir": str(tmp_path)}}, preset="quick",  # noqa: E731
                                     seed=0, dataset=ds)
    mine, other = defensegan.work_dir(ctx(small), r), defensegan.work_dir(ctx(resplit), r)
    assert mine != other
    ckpt = defensegan.Checkpoint(mine, dataset_sha256(small))
    defensegan.train_gan(small.train.x, r, seeded(0, "defensegan"), ckpt)
    _, fresh = defensegan.train_gan(resplit.train.x, r, seeded(0, "defensegan"),
                                    defensegan.Checkpoint(other, dataset_sha256(resplit)))
    assert fresh["resumed_from_step"] == 0
    _, again = defensegan.train_gan(small.train.x, r, seeded(0, "defensegan"), ckpt)
    assert again["resumed_from_step"] == 2  # its own data: resumed
    with pytest.raises(ValueError, match="not trained on this data"):
        defensegan.Checkpoint(mine, dataset_sha256(resplit)).load()
