"""Settings: built-in defaults < the packaged `default_config.yaml` < your `--config FILE`
< `SHIELDSERVE_*` environment variables < explicit overrides (CLI flags, tests).

Nested fields use `__` in the environment, e.g. `SHIELDSERVE_BATCHING__MAX_BATCH_SIZE=64`.
A config file is merged over the packaged one: pipelines are merged by name, and a pipeline
set to `null` is removed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

log = logging.getLogger("shieldserve")

PACKAGED_CONFIG = Path(__file__).with_name("default_config.yaml")


def _default_bundle() -> Path:
    import models

    return Path(models.__file__).resolve().parent / "default"


class Section(BaseModel):
    """A section of the settings: a key it does not know (a typo) is refused, as at the top
    level, never ignored (the operator would believe it applied). Errors name the field, never
    its value (a secret may be in it)."""

    # inf and nan refused in every float setting: `cooldown_s: .inf` started, and the first
    # blocked client's Retry-After (int(inf)) was a 500 for every request batched with it
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)


class PipelineConfig(Section):
    description: str = ""
    # each entry: "name" or {"defense": "name", ...options}
    defenses: list[str | dict[str, Any]] = Field(default_factory=list)
    # the query monitor for this pipeline: true/false, or a mapping over `query_monitor.policy`
    # (enabled, action, threshold, block_after, block_window_s, cooldown_s); absent: the defaults
    query_monitor: bool | dict[str, Any] | None = None
    # torch intra-op threads for this pipeline's batches (at most torch_threads); absent: by
    # parallel_min_cost
    threads: int | None = Field(None, ge=1)


class MonitorPolicyConfig(Section):
    """What a monitored pipeline does with a query the monitor flags (per pipeline overridable)."""

    enabled: bool = Field(True, description="monitor every pipeline that does not turn it off")
    action: Literal["flag", "reject", "block"] = Field(
        "reject", description="flag: count only; reject: answer a rejection by query_monitor; block: reject, and "
                              "a client with more than block_after flags in block_window_s gets 429 for cooldown_s")
    threshold: int = Field(14, ge=1, description="hashes (of top_n plus one per column) a query must share with "
                                                  "remembered ones")
    suspect_threshold: int = Field(7, ge=1, description="the threshold for a client flagged within block_window_s")
    suspect_linf: float = Field(0.62, ge=0, le=1, description="a suspect's query within this L-inf distance of one "
                                                              "of its last suspect_history queries is flagged (0: off)")
    near_matches: int = Field(0, ge=0, description="any client's query within suspect_linf of this many of its "
                                                    "last suspect_history queries is flagged (0: suspects only)")
    block_after: int = Field(10, ge=0)
    block_window_s: float = Field(600.0, gt=0)
    cooldown_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _suspects_held_stricter(self) -> "MonitorPolicyConfig":
        # a suspect_threshold above threshold held a flagged client to a laxer bar than others
        if self.suspect_threshold > self.threshold:
            raise ValueError(f"suspect_threshold ({self.suspect_threshold}) is above threshold ({self.threshold}): "
                             f"a client flagged before is held to the stricter (lower) of the two")
        return self


class QueryMonitorConfig(Section):
    """The stateful detector of query-based attacks (service/defenses/query_monitor.py)."""

    policy: MonitorPolicyConfig = Field(default_factory=MonitorPolicyConfig)
    quantization: int = Field(25, ge=1, le=255, description="pixel levels are this many /255 apart")
    window: int = Field(50, ge=2, description="values per hashed window of the flattened image")
    top_n: int = Field(80, ge=1, description="hashes kept per query")
    informative: float = Field(0.25, ge=0, le=1, description="fraction of a window off the image's common level "
                                                             "for the window to count")
    memory_window_s: float = Field(3600.0, gt=0, description="a query is remembered at least half of this, never all of it (two generations in slots of half; docs/query_monitor.md)")
    max_queries: int = Field(100_000, gt=1, description="queries remembered at most (per store; ~8.5 KB each in the memory store for "
                                                 "distinct real digits, ~3.7 KB for queries sharing hashes, up to 5.8 KB "
                                                 "in Redis at worst)")
    suspect_history: int = Field(128, ge=1, description="a suspect's last queries kept for the suspect_linf check")
    store: Literal["memory", "redis"] = Field(
        "memory", description="memory: per process; redis: one store for every replica")
    redis_url: str = Field("redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    redis_prefix: str = "shieldserve:"
    secret: SecretStr | None = Field(
        None, description="hashing key; unset: random per process (memory) or agreed once in Redis (redis)")


class LimitsConfig(Section):
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body (413 above)")
    max_image_bytes: int = Field(4 * 1024 * 1024, gt=0, description="largest encoded image")
    max_pixels: int = Field(4096 * 4096, gt=0, description="width*height, checked before decoding")
    max_images_per_request: int = Field(64, gt=0)
    # 4096 * 4096, one max_pixels image's worth: 64 images of 512x512 (digits, thumbnails), or
    # one photo of up to 16.7 MP. Decoding and resizing cost ~10-30 ns a pixel, so this is
    # under half a second of one worker per request; without it, 64 images at max_pixels (a
    # 3 MB body of all-black PNGs) were ~30 s of worker CPU.
    max_request_pixels: int = Field(
        4096 * 4096, gt=0, description="width*height summed over a request's images, read from their headers "
                                       "before any is decoded (413 above)")
    formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG"])

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        # a misspelt name (JEPG) started, and every upload of the format meant was a 415
        from service.imaging import ALLOWED_CONTENT_TYPES, _FORMAT_ALIASES

        known = sorted(set(ALLOWED_CONTENT_TYPES.values()))
        unknown = [f for f in v if _FORMAT_ALIASES.get(str(f).upper(), str(f).upper()) not in known]
        if unknown or not v:
            raise ValueError(f"formats {unknown} are not image formats this service decodes; known: {known}"
                             if unknown else "formats must name at least one image format")
        return v
    resize: Literal["resize", "pad", "reject"] = "resize"
    # 15 s: nginx's client_body_timeout and the Ray proxy's SHIELDSERVE_RAY_BODY_TIMEOUT_S. uvicorn
    # has no timeout of its own while a body arrives: without this a client that sent part of a
    # body and stalled held its connection, and up to max_body_bytes of memory, for ever.
    body_idle_timeout_s: float = Field(
        15.0, gt=0, allow_inf_nan=False,
        description="longest wait for the next part of a request body: 408 request_timeout after it, the "
                    "connection closed (on /predict, /certify and /v2 infer the request's deadline also bounds "
                    "the whole read: 504 deadline_exceeded)")


class BatchingConfig(Section):
    enabled: bool = True
    max_batch_size: int = Field(64, gt=0, description="images per merged batch")
    # 0: an idle pipeline runs a request at once; requests that arrive while a batch runs
    # still merge into the next one. A delay > 0 trades single-client latency for batch size.
    max_delay_ms: float = Field(
        0.0, ge=0, description="how long the first request to reach an idle batcher waits for company; "
                               "requests queued behind a running batch go at once")
    # 5: decoding an ordinary upload takes well under a millisecond; measured at 8 clients
    # (docs/operations.md, "Waiting for company on its way"): larger batches, none for a lone client
    company_wait_ms: float = Field(
        5.0, ge=0, description="how long the first request to reach an idle batcher waits for requests that "
                               "were admitted before it and are still being decoded, or (at most a tenth of "
                               "the last batch's run) for as many requests as the last batch had; behind a "
                               "batch that ran for 10x this or longer, how long requests queued meanwhile "
                               "wait for that batch's clients to come back; a lone client never waits; "
                               "0: never")
    max_queue: int = Field(1024, gt=0, description="queued images per pipeline before 503 overloaded")
    retry_after_s: int = Field(1, ge=0)


class CertifyConfig(Section):
    """Randomized smoothing's service settings: sample counts for /predict, maxima for /certify,
    and the bounded store of recently posted images and their certificates."""

    predict_n: int = Field(
        4000, gt=0, description="the sequential test's sample budget per image on /predict (it stops as soon as "
                                "the answer at the target radius is settled; a pipeline's `n` overrides it)")
    predict_n0: int = Field(
        0, ge=0, description="selection samples per image on /predict; 0: c_A is the base function's answer on "
                             "the clean image (one forward pass)")
    default_n: int = Field(10_000, gt=0, description="estimation samples on /certify without n=")
    default_n0: int = Field(100, gt=0, description="selection samples on /certify without n0=")
    max_n: int = Field(100_000, gt=0, description="largest n a caller may ask for (422 above)")
    max_n0: int = Field(10_000, gt=0, description="largest n0 a caller may ask for (422 above)")
    alpha: float = Field(0.001, ge=1e-12, lt=0.5,
                         description="certificates' alpha; the bounds of /certify's alpha= (1e-12: "
                                     "service.defenses.smoothing.MIN_ALPHA, where scipy's bounds are exact)")
    batch_size: int = Field(8000, gt=0, description="noisy copies of an image drawn at once (the noise buffer; forward passes take at most 1,000 of them: the `forward_batch` option)")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="arithmetic of the sampled networks: auto is bfloat16 on a CPU with native bfloat16 "
                            "(AVX-512 BF16, AMX), else float32; the certificate is of the network so computed")
    pipeline: str = Field("smoothing", description="pipeline /certify uses without pipeline=")
    store_max_images: int = Field(4096, ge=0, description="images kept for GET /certify")
    store_max_certificates: int = Field(4096, ge=0)
    store_max_age_s: float = Field(3600.0, gt=0, description="older entries are forgotten")
    store: Literal["memory", "redis"] = Field(
        "memory", description="memory: per process; redis: shared by every replica (GET /certify on any)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the Redis of store=redis",
                           repr=False)  # may hold a password

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> "CertifyConfig":
        # a default above its maximum refused every /certify sent without n= (or n0=), naming a
        # parameter the client never sent
        for default, maximum in (("default_n", "max_n"), ("default_n0", "max_n0")):
            if getattr(self, default) > getattr(self, maximum):
                raise ValueError(f"certify.{default} ({getattr(self, default)}) is above certify.{maximum} "
                                 f"({getattr(self, maximum)}); SHIELDSERVE_CERTIFY__{default.upper()} sets the "
                                 f"default from the environment")
        return self
    redis_prefix: str = Field("shieldserve:", description="prefix of every key store=redis writes")


class AdmissionConfig(Section):
    """Backpressure by cost, per process: every request holds its cost (in sample units: one
    classifier forward pass on one image is 1) from admission until it is answered, and while
    a batch still computes the images of a request whose client left it (service/admission.py)."""

    max_cost: float = Field(200_000, gt=0, description="sample units in flight per process before 503 overloaded")
    max_concurrent: int = Field(256, gt=0, description="pipeline requests in flight per process before 503 overloaded")
    # >= 0: a negative one took the units in flight below 0, and max_cost limited nothing
    cost_per_image: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="per-pipeline cost of one image; a certifying pipeline adds (n0 + n) x w, w its sampled networks' FLOPs over the base classifier's")
    retry_after_s: int = Field(1, ge=0, description="Retry-After on a cost or concurrency refusal")
    max_client_cost: float | None = Field(
        None, gt=0, description="sample units one client (API key, else address) may hold in flight per "
                                "process before 429 overloaded; unset: no per-client share")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHIELDSERVE_", env_nested_delimiter="__",
                                      extra="forbid", validate_default=True, allow_inf_nan=False,
                                      hide_input_in_errors=True)  # a key pasted in by mistake is never echoed

    bundle: Path = Field(default_factory=_default_bundle)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    host: str = "127.0.0.1"
    # ge/le: uvicorn took 99999 and listened on 99999 mod 65536 (34463), logging 99999
    port: int = Field(8000, ge=0, le=65535, description="TCP port `serve` listens on, 0-65535 (0: one the "
                                                          "system picks)")
    # checked here: `verbose` named no setting, and `warn` failed in uvicorn after the whole load
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    json_logs: bool = True
    default_pipeline: str = "default"
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    certify: CertifyConfig = Field(default_factory=CertifyConfig)
    request_timeout_s: float = Field(60.0, gt=0, description="deadline of a request without X-Request-Timeout")
    max_request_timeout_s: float = Field(
        120.0, gt=0, description="the longest deadline a client may ask for with X-Request-Timeout (clamped)")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS; empty (the default): no CORS headers at all")
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    drain_seconds: float = Field(2.0, ge=0, description="after SIGTERM, answer /readyz 503 this long before closing")
    graceful_timeout_s: float = Field(30.0, ge=0, description="how long in-flight requests may take to finish")
    torch_threads: int = Field(
        0, ge=0, description="torch's intra-op threads, set once per serving process; 0: auto, torch's default "
                             "(every core it found) shared among the workers (at least 1 each); torch's default "
                             "where OMP_NUM_THREADS is set")
    parallel_min_cost: float = Field(
        2.0, ge=0, description="the batches of a pipeline whose image weighs fewer sample units than this "
                               "(admission's estimate: baseline 1, magnet 3, smoothing ~561) run on one torch "
                               "thread, the others on all torch_threads (a pipeline's threads: overrides it). "
                               "2 (default): baseline alone; 100: magnet and neuralfp too, steadier where other "
                               "processes share the cores; 0: every pipeline on all")
    fastapi_telemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry instrumentation (spans, metrics and logs through the "
                           "global OpenTelemetry providers); off by default: the service exports Prometheus "
                           "metrics itself, and the check costs ~0.05 ms a request even with no provider set")
    warmup: bool = True
    optimize_classifier: bool = Field(
        True, description="on CPU, decide with a TorchScript-frozen, oneDNN-optimised copy of the base classifier "
                          "(used only if its answers match the eager network's at start-up)")
    admin_api_key: SecretStr | None = None
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="client name -> sha256 hex of its API key (Authorization: Bearer or "
                                          "X-API-Key); empty: an open service, clients known by address")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or networks (CIDR) of gateways whose X-Forwarded-For is "
                                          "believed: the client is the first untrusted hop from the right")
    client_ipv6_prefix: int = Field(
        64, ge=1, le=128, description="an IPv6 client is its address's network of this prefix length (an "
                                      "attacker holds a whole /64); 128: each address on its own")
    trusted_imports: list[str] = Field(
        default_factory=list, description="Python modules (\"pkg\" covers pkg.*) or factories (\"pkg.mod:fn\") "
                                          "that a bundle's `import` architectures may run, and `torchscript:SHA256` "
                                          "for each TorchScript artifact it may load; empty (the default): a "
                                          "bundle naming Python code or holding a TorchScript file is refused at "
                                          "start-up")
    query_monitor: QueryMonitorConfig = Field(default_factory=QueryMonitorConfig)

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for i, (name, digest) in enumerate(v.items(), 1):
            d = digest.strip().lower().removeprefix("sha256:")
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                # never echo the value, nor the name: either may be a key pasted in by mistake
                # (`KEY: name`, the mapping the wrong way round, puts the key in the name)
                raise ValueError(f"api_keys: entry {i} of {len(v)} (in the order given) must map a client name to "
                                 f"the sha256 hex digest of its key (64 hex digits), not the key itself: "
                                 f"printf %s KEY | sha256sum")
            out[name] = d
        return out

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            ipaddress.ip_network(item, strict=False)  # ValueError: not an address or network
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _a_request_fits_the_queue(self) -> "Settings":
        # a request of more images than a pipeline queues was answered 503 `overloaded` with
        # Retry-After even on an idle replica: a retry that can never succeed
        if self.batching.max_queue < self.limits.max_images_per_request:
            raise ValueError(f"batching.max_queue ({self.batching.max_queue}) is below "
                             f"limits.max_images_per_request ({self.limits.max_images_per_request}): a request of "
                             f"that many images could never be queued; lower the limit too "
                             f"(SHIELDSERVE_LIMITS__MAX_IMAGES_PER_REQUEST)")
        # the default deadline past the longest a client may ask for: the gateway (sized for the
        # longest, docker/nginx.conf) gave up first and answered 504 while the replica computed
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s:g}) is above max_request_timeout_s "
                             f"({self.max_request_timeout_s:g}), the longest deadline a request may have; raise "
                             f"max_request_timeout_s too (and the gateway's proxy_read_timeout past it)")
        return self


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k == "pipelines" and isinstance(v, dict):
            merged = dict(out.get("pipelines") or {})
            for name, p in v.items():
                if p is None:
                    merged.pop(name, None)
                elif isinstance(p, dict) and "defenses" not in p and isinstance(merged.get(name), dict):
                    # `magnet: {query_monitor: ...}` changes that setting of the packaged
                    # pipeline; it replaced the pipeline, whose defenses ([] absent) were gone
                    # without a word: magnet and robust served the bare classifier
                    merged[name] = {**merged[name], **p}
                else:
                    merged[name] = p  # its own defenses: a pipeline of its own under that name
            out[k] = merged
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error without the text it quotes: PyYAML's message shows the offending line, which
    in a config file may hold a key or a secret (an unclosed quote on `admin_api_key:`)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
    what = "; ".join(str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part)
    return f"not valid YAML at {where}: {what or type(exc).__name__} (the line is not shown: it may hold a secret)"


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    data = yaml.safe_load(PACKAGED_CONFIG.read_text()) or {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} is a directory, not a file" if p.is_dir()
                                    else f"config file {p} does not exist")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {p}: {yaml_problem(exc)}") from None
        if not isinstance(user, dict):
            raise ValueError(f"config file {p} must hold a mapping")
        if "bundle" in user and not Path(user["bundle"]).is_absolute():
            user["bundle"] = str((p.parent / user["bundle"]).resolve())
        data = _deep_merge(data, user)
    return data


# SHIELDSERVE_* variables that are not settings: read by the CLI, the build, the evaluation,
# `serve --ray` (service/ray_app.py) and the tests; MONITOR_SECRET is docker-compose's (.env),
# which it hands to the replicas as SHIELDSERVE_QUERY_MONITOR__SECRET
NOT_SETTINGS = ("CONFIG", "WORK_DIR", "PROGRESS", "EVAL_API_KEY", "HYPOTHESIS_EXAMPLES", "FUZZ_EXAMPLES",
                "MONITOR_SECRET")
NOT_SETTINGS_PREFIXES = ("RAY_", "TEST_")


# what an orchestrator sets for a service or container named `shieldserve`: Kubernetes' service
# links (SHIELDSERVE_SERVICE_HOST, SHIELDSERVE_SERVICE_PORT[_NAME], SHIELDSERVE_PORT_8000_TCP[_ADDR,
# _PORT, _PROTO]) and Docker's legacy links (SHIELDSERVE_NAME, SHIELDSERVE_ENV_*, the same PORT_*)
_ORCHESTRATOR = re.compile(r"SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_ADDR|_PORT|_PROTO)?|NAME|ENV_\w+")


# Kubernetes' service link for a Service named `shieldserve` is SHIELDSERVE_PORT=tcp://IP:PORT,
# the name of the `port` setting: it named no port and start-up failed on "port: Input should be
# a valid integer"
_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://\S+:\d+", re.IGNORECASE)


class _WithoutServiceLink(PydanticBaseSettingsSource):
    """The environment's settings without SHIELDSERVE_PORT where it is a service link."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # unused: __call__ reads all
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = self.inner()
        if isinstance(data.get("port"), str) and _SERVICE_LINK.fullmatch(data["port"].strip()):
            del data["port"]
        return data


def names_a_setting(key: str) -> bool:
    """Whether the SHIELDSERVE_* variable `key` sets a setting (SHIELDSERVE_<NAME> or a section's
    SHIELDSERVE_<SECTION>__<NAME>; any case, as pydantic-settings reads them)."""
    return key[len("SHIELDSERVE_"):].upper().split("__")[0] in {name.upper() for name in Settings.model_fields}


def unknown_environment(environ: Any = None) -> list[str]:
    """SHIELDSERVE_* variables that name no setting (nor one the project or an orchestrator
    sets). pydantic-settings drops them without a word (a key it does not know inside a
    section's variable is refused, as in YAML)."""
    env = os.environ if environ is None else environ
    out = []
    for key in env:
        if not key.upper().startswith("SHIELDSERVE_"):
            continue
        name = key[len("SHIELDSERVE_"):].upper()
        if (names_a_setting(key) or name in NOT_SETTINGS or name.startswith(NOT_SETTINGS_PREFIXES)
                or _ORCHESTRATOR.fullmatch(name)):
            continue
        out.append(key)
    return sorted(out)


def _did_you_mean(key: str) -> str:
    name = key[len("SHIELDSERVE_"):].upper()
    for field, info in Settings.model_fields.items():
        section = getattr(info.annotation, "model_fields", None)
        head = field.upper() + "_"
        if section and name.startswith(head) and name[len(head):].lower() in section:
            return f" (did you mean SHIELDSERVE_{field.upper()}__{name[len(head):]}?)"
    return ""


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the config files, the environment and explicit overrides. A
    SHIELDSERVE_* variable that names no setting is refused where it is a section's variable
    written with one underscore, logged as a WARNING otherwise (unknown_environment)."""
    unknown = unknown_environment()
    typos = {k: hint for k in unknown if (hint := _did_you_mean(k))}
    if typos:  # a section's variable with one underscore: a setting the operator meant, surely
        raise ValueError("environment variables that name no setting (pydantic-settings would ignore them without "
                         "a word): " + ", ".join(f"{k}{hint}" for k, hint in list(typos.items())[:10])
                         + "; settings are SHIELDSERVE_<NAME>, a section's SHIELDSERVE_<SECTION>__<NAME>")
    if unknown:
        log.warning("environment variables that name no setting, ignored: %s (settings are SHIELDSERVE_<NAME>, a "
                    "section's SHIELDSERVE_<SECTION>__<NAME>)", ", ".join(unknown[:10]))
    link = os.environ.get("SHIELDSERVE_PORT", "")
    if _SERVICE_LINK.fullmatch(link.strip()):
        log.warning("SHIELDSERVE_PORT=%s is ignored: it is the service link Kubernetes sets for a Service named "
                    "shieldserve, not a port (the port comes from --port, the config file or its default; name "
                    "the Service otherwise, or set enableServiceLinks: false, to be rid of it)", link.strip())
    file_data = read_config_file(config or os.environ.get("SHIELDSERVE_CONFIG"))
    explicit = {k: v for k, v in overrides.items() if v is not None}

    class _Loaded(Settings):
        # a validation error is titled by the model: "settings", not this class's name
        model_config = SettingsConfigDict(**{**Settings.model_config, "title": "settings"})

        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                       init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource,
                                       dotenv_settings: PydanticBaseSettingsSource,
                                       file_secret_settings: PydanticBaseSettingsSource,
                                       ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, _WithoutServiceLink(settings_cls, env_settings),
                    InitSettingsSource(settings_cls, file_data))

    try:
        return _Loaded(**explicit)
    except SettingsError as exc:
        # pydantic-settings names the field only: a list or mapping setting read from the
        # environment is JSON, which an operator writing SHIELDSERVE_TRUSTED_PROXIES=10.0.0.1 cannot guess
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        raise ValueError(f"{exc}: the environment variable of setting {field} (SHIELDSERVE_{field.upper()}, or a "
                         f"SHIELDSERVE_{field.upper()}__* one) holds a list or mapping, written in JSON in the "
                         f"environment, e.g. SHIELDSERVE_TRUSTED_PROXIES='[\"172.28.5.10\"]'") from None
