"""RMC: nearest neighbours, per-image fine-tuning, isolation between clients, the online
stream's reset and the admin key that guards it. Real digits, real PGD, real HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import png

pytest.importorskip("faiss")

from models.bundle import Bundle  # noqa: E402
from service.attacks import pgd  # noqa: E402
from service.defenses.base import DeadlineExceeded, DefenseEnv, RunContext  # noqa: E402
from service.defenses.rmc import (  # noqa: E402
    RMC, FaissIndex, FinetuneSettings, TorchIndex, build_faiss_index, deserialize_index,
    extract_features, from_uint8, serialize_index,
)

KEY = "test-admin-key-7f3a"
ONLINE = {"rmc-online": {"defenses": [{"defense": "rmc", "mode": "online", "snapshot_every": 2}]}}


def _files(images: torch.Tensor) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", png(x), "image/png")) for i, x in enumerate(images)]


@pytest.fixture(scope="module")
def rmc_env(quick_bundle: Path) -> DefenseEnv:
    bundle = Bundle.load(quick_bundle)
    return DefenseEnv(bundle, bundle.classifier(), torch.device("cpu"))


@pytest.fixture(scope="module")
def attack(rmc_env: DefenseEnv, mnist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """20 test digits (2 per class) and their PGD-20 eps=0.3 copies against the base classifier."""
    t = mnist.test.per_class(2)
    adv = pgd(rmc_env.classifier, t.x, t.y, 0.3, steps=20, generator=torch.Generator().manual_seed(0))
    return t.x, t.y, adv


@pytest.mark.parametrize("kind", ["flat", "hnsw", "torch"])
def test_knn_finds_the_planted_neighbours_of_a_point(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    background = torch.rand(2000, 32, generator=g) * 20 - 10
    query = torch.rand(1, 32, generator=g) * 20 - 10
    planted = query + 0.01 * torch.randn(7, 32, generator=g)
    feats = torch.cat([background[:900], planted, background[900:]])
    if kind == "torch":
        index = TorchIndex(feats)
    else:  # through the bundle's byte format, as serving loads it
        index = FaissIndex(deserialize_index(serialize_index(build_faiss_index(feats, kind))), torch.device("cpu"))
    dist, ids = index.search(query, 7)
    assert sorted(ids[0].tolist()) == list(range(900, 907))
    assert float(dist.max()) < 0.01 * 32  # squared L2 of the planted noise, far below the background's


def test_bundle_index_matches_the_stored_images(quick_bundle: Path, rmc_env: DefenseEnv) -> None:
    bundle = Bundle.load(quick_bundle)
    section = bundle.defense("rmc")
    data = bundle.tensors("rmc_dataset")
    n_train = bundle.manifest["dataset"]["train"]
    steps = data["pgd_steps"]
    assert data["images"].dtype == torch.uint8 and len(data["labels"]) == section["metrics"]["dprime"]
    assert int((steps == 0).sum()) == n_train and set(steps.unique().tolist()) == {0, 2, 4, 8}
    index = FaissIndex(deserialize_index(bundle.tensors("rmc_index")["index"]), torch.device("cpu"))
    assert index.size == len(data["labels"])
    rows = torch.tensor([0, 5, n_train + 3, len(steps) - 1])
    feats = extract_features(rmc_env.classifier, from_uint8(data["images"][rows]))
    dist, ids = index.search(feats, 1)
    assert torch.equal(ids[:, 0], rows) and float(dist.max()) < 1e-6


@pytest.mark.parametrize("trainable", ["head", "all", "last"])
def test_batched_adaptation_equals_one_image_at_a_time(rmc_env: DefenseEnv, attack, trainable: str) -> None:
    x, _, adv = attack
    rmc = RMC(rmc_env, steps=4, trainable=trainable)
    batch = torch.cat([x[:2], adv[:2]])
    ids, _ = rmc.neighbours(batch)
    nx, ny = from_uint8(rmc.images[ids]), rmc.labels[ids]
    together, params, details = rmc.finetuner.run(batch, nx, ny, rmc.settings)
    alone = torch.cat([rmc.finetuner.run(batch[i:i + 1], nx[i:i + 1], ny[i:i + 1], rmc.settings)[0]
                       for i in range(len(batch))])
    assert torch.allclose(together, alone, atol=1e-4)
    assert int(details["rmc_steps"].max()) >= 1
    moved = [any(not torch.equal(params[n][b], p) for n, p in rmc.finetuner.initial.items())
             for b in range(len(batch))]
    assert moved[2] and moved[3], "fine-tuning left the adversarial digits' weights where they were"


@pytest.mark.parametrize("trainable", ["head", "last"])
def test_the_frozen_features_of_dprime_computed_once_give_the_answers_computed_per_request(
        rmc_env: DefenseEnv, attack, trainable: str) -> None:
    """A differential test of the cache (`frozen_cache_mb`): D′'s frozen features computed at
    load give the logits that running the frozen part on each request's neighbours gives,
    up to float rounding; "all" fine-tunes the body, so it never caches."""
    x, _, adv = attack
    batch = torch.cat([x[:3], adv[:3]])
    cached = RMC(rmc_env, steps=4, trainable=trainable)
    per_request = RMC(rmc_env, steps=4, trainable=trainable, frozen_cache_mb=0)
    assert cached.frozen_dprime is not None and per_request.frozen_dprime is None
    assert cached.public_settings()["frozen_features_cached"] is True
    a = cached.adapt(batch, rmc_env.classifier, RunContext()).logits
    b = per_request.adapt(batch, rmc_env.classifier, RunContext()).logits
    assert torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(1), b.argmax(1))
    assert RMC(rmc_env, steps=1, trainable="all").frozen_dprime is None
    assert RMC(rmc_env, steps=1, trainable=trainable, frozen_cache_mb=1e-6).frozen_dprime is None  # over the limit


def test_rmc_answers_adversarial_digits_the_base_classifier_gets_wrong(rmc_env: DefenseEnv, attack) -> None:
    x, y, adv = attack
    with torch.no_grad():
        base = float((rmc_env.classifier(adv).argmax(1) == y).float().mean())
    adapted = RMC(rmc_env, trainable="head", lr=0.01).adapt(adv, rmc_env.classifier, RunContext())
    defended = float((adapted(adv).argmax(1) == y).float().mean())
    assert base <= 0.1
    assert defended >= base + 0.2, (base, defended)


def test_a_passed_deadline_stops_fine_tuning(rmc_env: DefenseEnv, attack) -> None:
    rmc = RMC(rmc_env)
    with pytest.raises(DeadlineExceeded):
        rmc.adapt(attack[0][:2], rmc_env.classifier, RunContext(deadline=time.monotonic() - 1))


def test_unknown_and_bad_options_fail_at_start_up(rmc_env: DefenseEnv) -> None:
    from service.defenses import build_defense

    for options in ({"neighbours": 5}, {"mode": "shared"}, {"k": 0}, {"trainable": "body"}):
        with pytest.raises(ValueError):
            build_defense("rmc", options, rmc_env)
    assert FinetuneSettings().steps > 0


def test_isolated_mode_gives_the_same_answer_after_other_clients_attack(make_client, attack) -> None:
    """The same digit, before and after a burst of other clients' adversarial requests: in
    isolated mode the answer is identical to the last digit; in online mode the burst moves it."""
    x, _, adv = attack
    client = make_client(pipelines=ONLINE)
    probe = {"content": png(x[3]), "headers": {"content-type": "image/png"}}

    def ask(pipeline: str) -> dict:
        r = client.post(f"/predict?pipeline={pipeline}", **probe)
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        assert res["status"] == "accepted" and res["stages"][0]["defense"] == "rmc"
        return res

    def burst(pipeline: str) -> None:
        def send(chunk: torch.Tensor) -> int:
            return client.post(f"/predict?pipeline={pipeline}", files=_files(chunk)).status_code

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(send, adv.split(5))) == {200}

    before = {p: ask(p) for p in ("rmc", "rmc-online")}
    for p in ("rmc", "rmc-online"):
        burst(p)
    after = {p: ask(p) for p in ("rmc", "rmc-online")}
    assert (after["rmc"]["label"], after["rmc"]["confidence"]) == (before["rmc"]["label"], before["rmc"]["confidence"])
    assert after["rmc-online"]["confidence"] != before["rmc-online"]["confidence"]


def test_online_reset_restores_the_bundle_weights_and_needs_the_key(make_client, attack) -> None:
    _, _, adv = attack
    client = make_client(pipelines=ONLINE, admin_api_key=KEY)
    rmc = client.app.state.runtime.pipelines["rmc-online"].components[0]
    bundle_weights = {n: p.clone() for n, p in rmc.finetuner.initial.items()}
    assert client.post("/predict?pipeline=rmc-online", files=_files(adv[:5])).status_code == 200
    drifted = rmc.current_parameters()
    assert any(not torch.equal(drifted[n], p) for n, p in bundle_weights.items())

    url = "/admin/rmc/reset?pipeline=rmc-online"
    r = client.post(url)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post(url, headers={"X-API-Key": KEY + "x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert any(not torch.equal(rmc.current_parameters()[n], p) for n, p in bundle_weights.items())

    r = client.post(url + "&to=snapshot", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["restored"].startswith("snapshot@")
    r = client.post(url, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert r.json()["restored"] == "bundle" and r.json()["mode"] == "online"
    restored = rmc.current_parameters()
    assert all(torch.equal(restored[n], p) for n, p in bundle_weights.items())
    assert client.post("/admin/rmc/reset?pipeline=nope", headers={"X-API-Key": KEY}).status_code == 404
    assert client.post("/admin/rmc/reset?pipeline=baseline", headers={"X-API-Key": KEY}).status_code == 422


def test_admin_api_is_disabled_without_a_configured_key(make_client) -> None:
    client = make_client()
    r = client.post("/admin/rmc/reset?pipeline=rmc", headers={"X-API-Key": "anything"})
    assert r.status_code == 403
    assert "admin API disabled" in r.json()["error"]["message"]
    pipelines = {p["name"]: p for p in client.get("/pipelines").json()["pipelines"]}
    settings = pipelines["rmc"]["defenses"][0]["settings"]
    assert settings["mode"] == "isolated" and settings["search"] == "faiss-cpu" and settings["k"] >= 1
