"""Defense-GAN's restarts start where a keyed hash of the image says, not where the batch's seed
says. The auditor's case: the same digit sent alone 40 times through a served `detect: true`
pipeline got 3 different answers (the batcher seeds each batch from secrets.randbits and one
randn covered the whole batch), so a client near the threshold could resend until it passed.
Served (RunContext.noise_key set), an image's starts depend only on (key, its pixels, the
projection's settings): the same alone every time, the same at any position in any company,
different for another image. Without the key, or with a client-chosen seed, the starts come
from the run's seeded generator as before. The quick bundle's networks: seconds in all."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
import torch

import service.defenses.defensegan as dg
from service.defenses.base import RunContext
from tests.conftest import png

KEY = b"k" * 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the tiny generator's best


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.test.per_class(1).x  # 10 different digits


def served(seed: int | None = None, key: bytes | None = KEY, **options) -> RunContext:
    """A RunContext as the batcher makes one: a fresh unpredictable seed per batch, the key."""
    return RunContext(seed=secrets.randbits(63) if seed is None else seed, noise_key=key, options=options)


def starts(monkeypatch, run) -> torch.Tensor:
    """The (b * r, latent) points the projection's first step evaluates (its starts, after the
    norm clamp), recorded while `run()` runs."""
    seen: list[torch.Tensor] = []
    real = dg.reconstruction_grad

    def spy(generator, z, target):
        if not seen:
            seen.append(z.clone())
        return real(generator, z, target)

    monkeypatch.setattr(dg, "reconstruction_grad", spy)
    run()
    monkeypatch.setattr(dg, "reconstruction_grad", real)
    return seen[0]


def test_the_same_image_alone_gets_the_same_answer_every_time(env, digits, monkeypatch):
    # the served detect pipeline, as the auditor hit it: each resend a new batch, a new seed.
    # The starts are compared too: on a clean digit the restart from E(x) itself often wins
    # whatever the others drew (the auditor's 38 of 40), which would hide a fresh draw
    detector, purifier = dg.build({"detect": True}, env)
    x = digits[3:4]
    answers = set()
    for _ in range(6):
        ctx = served()
        z = starts(monkeypatch, lambda: detector.detect(x, env.classifier, ctx))
        out = purifier.purify(x, env.classifier, ctx)  # reuses the detector's projection
        answers.add((z.numpy().tobytes(), float(out.details["reconstruction_error"][0]),
                     float(out.details["generator_evals"][0]), out.x.numpy().tobytes()))
    assert len(answers) == 1


def test_company_and_position_do_not_change_an_image_s_starts(env, digits, monkeypatch):
    img, a, b = digits[0], digits[1], digits[2]
    batch = torch.stack([img, a, b, img])
    # `paper`: the starts are the N(0, I) draws themselves, compared bit for bit
    (paper,) = dg.build({"projection": "paper", "overrides": {"steps": 1, "restarts": 3}}, env)
    alone = starts(monkeypatch, lambda: paper.purify(img[None], env.classifier, served()))
    together = starts(monkeypatch, lambda: paper.purify(batch, env.classifier, served())).view(4, 3, -1)
    assert torch.equal(together[0], alone) and torch.equal(together[3], alone)
    # the served `default`: E(x) + 0.5 x the draws, E(x) rounded as the batch's size has it
    (purifier,) = dg.build({}, env)
    r, latent = purifier.projector.settings.restarts, purifier.projector.generator.latent_dim
    alone = starts(monkeypatch, lambda: purifier.purify(img[None], env.classifier, served()))
    together = starts(monkeypatch, lambda: purifier.purify(batch, env.classifier, served())).view(4, r, latent)
    assert torch.allclose(together[0], alone, atol=1e-5) and torch.allclose(together[3], alone, atol=1e-5)
    # and the answer: the same starts, so the same projection up to the float rounding of
    # kernels at another batch size (README, "Batched requests and float rounding")
    one = purifier.purify(img[None], env.classifier, served())
    four = purifier.purify(batch, env.classifier, served())
    for i in (0, 3):
        assert torch.allclose(four.x[i], one.x[0], atol=1e-3)
        assert torch.allclose(four.details["reconstruction_error"][i], one.details["reconstruction_error"][0],
                              rtol=1e-2, atol=1e-6)


def test_different_images_get_different_starts(env, digits, monkeypatch):
    (purifier,) = dg.build({"projection": "paper", "overrides": {"steps": 1, "restarts": 3}}, env)  # N(0, I) starts
    z = starts(monkeypatch, lambda: purifier.purify(digits, env.classifier, served())).view(len(digits), 3, -1)
    flat = z.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(len(digits)) for j in range(i))
    # an image's restarts are not copies of one draw either
    assert not torch.equal(z[0, 0], z[0, 1])
    # the key and the settings enter the seed: another key or other settings, other starts
    other_key = starts(monkeypatch, lambda: purifier.purify(digits, env.classifier, served(key=b"o" * 32)))
    assert not torch.equal(other_key.view_as(z), z)
    s = purifier.projector.settings
    x = digits[:2]
    assert dg.image_seeds(KEY, x, s, 128) != dg.image_seeds(KEY, x, replace(s, restarts=4), 128)
    # the image as the query monitor identifies it: the same 8-bit pixels a float32 last bit
    # apart (another lossless format) are the same image, the same seed
    assert dg.image_seeds(KEY, x, s, 128) == dg.image_seeds(KEY, x + 1e-7, s, 128)


def test_without_the_key_or_with_a_chosen_seed_the_run_s_generator_draws_as_before(env, digits, monkeypatch):
    (purifier,) = dg.build({}, env)
    p = purifier.projector
    x = digits[:4]
    # evaluation, calibration and tests pass no key: exactly project() on the run's seeded
    # generator, one draw for the batch
    ref = dg.project(p.generator, x, p.settings, encoder=p.encoder, rng=torch.Generator().manual_seed(7))
    # no key (as RunContext's default); a key but a client-chosen seed (/certify's seed=, as
    # smoothing honours it)
    for ctx in (RunContext(seed=7), RunContext(seed=7, noise_key=KEY, options={"seed": 7})):
        out = purifier.purify(x, None, ctx)
        assert torch.equal(out.x, ref.x) and torch.equal(out.details["reconstruction_error"], ref.error)

    # and the run's seed still decides the starts there (on these digits the restart from E(x)
    # itself often wins, so the starts are compared, not the answers)
    def seeded(seed: int) -> torch.Tensor:
        return starts(monkeypatch, lambda: purifier.purify(x, None, RunContext(seed=seed)))

    assert torch.equal(seeded(7), seeded(7)) and not torch.equal(seeded(7), seeded(8))


def test_project_takes_one_generator_per_image(env, digits):
    # project(rngs=...): image i's starts from rngs[i] alone, whatever the batch
    (purifier,) = dg.build({}, env)
    p = purifier.projector
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = dg.project(p.generator, digits[:2], p.settings, encoder=p.encoder, rngs=gens(11, 12))
    first = dg.project(p.generator, digits[:1], p.settings, encoder=p.encoder, rngs=gens(11))
    assert torch.allclose(both.initial_error[0], first.initial_error[0], rtol=1e-5)
    with pytest.raises(ValueError, match="one generator per image"):
        dg.project(p.generator, digits[:2], p.settings, encoder=p.encoder, rngs=gens(11))


def test_a_resend_through_predict_gets_the_same_answer(make_client, digits):
    # end to end: the runtime's key, the batcher's per-batch secrets.randbits seed. `paper`'s
    # N(0, I) starts, cut to a few steps: a fresh draw would show in every answer (the served
    # `default` starts one restart at E(x), which often wins whatever the others drew)
    dgan = {"defense": "defensegan", "projection": "paper", "overrides": {"steps": 5, "restarts": 2}}
    client = make_client(pipelines={"dg": {"defenses": [dgan]}})
    body = png(digits[5])
    seen = set()
    for _ in range(4):
        r = client.post("/predict?pipeline=dg", files=[("file", ("d.png", body, "image/png"))])
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        stages = [{k: v for k, v in st.items() if k != "seconds"}
                  for st in res["stages"] if st["defense"] == "defensegan"]
        assert any("generator_evals" in st for st in stages), stages
        seen.add((res["status"], res["label"], res["confidence"], repr(stages)))
    assert len(seen) == 1, seen
