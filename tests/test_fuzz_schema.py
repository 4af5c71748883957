"""schemathesis against the served OpenAPI schema, over real HTTP: every operation gets
generated requests (valid ones and, in negative mode, ones that break the schema), and no
answer may be a 5xx. The total is counted and must reach the target.

SHIELDSERVE_FUZZ_EXAMPLES (default 1000) sets the target number of requests; it is spread
over the operations, half positive and half negative examples each. A bench or tools run can
ask for more: `SHIELDSERVE_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz_schema.py`.
The quick bundle, only the `baseline` and a small-sample `smoothing` pipeline.
"""

from __future__ import annotations

import math
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed as hseed, settings as hsettings  # noqa: E402

from tests.live_server import config_file, live_server  # noqa: E402

TARGET = int(os.environ.get("SHIELDSERVE_FUZZ_EXAMPLES", "1000"))


@pytest.mark.timeout(600)
def test_generated_requests_never_get_a_5xx(quick_bundle, tmp_path):
    from schemathesis import GenerationMode

    from service.settings import load_settings

    config = config_file(tmp_path, {"baseline", "smoothing"}, default_pipeline="baseline")
    s = load_settings(config, bundle=quick_bundle, warmup=False, log_level="warning",
                      certify={"max_n": 200, "max_n0": 50, "default_n": 100, "default_n0": 20,
                               "predict_n": 50, "predict_n0": 10, "batch_size": 256},
                      limits={"max_body_bytes": 256 * 1024})
    with live_server(s) as (url, app):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 15
        sent: dict[str, int] = {}
        failures: list[str] = []

        def fuzz(op, mode, examples: int, round_: int) -> int:
            before = sum(sent.values())

            @hseed(round_)
            @hsettings(max_examples=examples, deadline=None, database=None,
                       phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call(base_url=url, timeout=30)
                sent[op.label] = sent.get(op.label, 0) + 1
                if response.status_code >= 500:
                    failures.append(f"{op.label} [{mode.value}] -> {response.status_code}: "
                                    f"{response.text[:300]}\n  {case.as_curl_command()}")

            try:
                run()
            except Exception as exc:  # hypothesis may give up on a strategy it cannot fill
                if "Unsatisfiable" not in type(exc).__name__:
                    raise
            return sum(sent.values()) - before

        # Operations without parameters run out of distinct examples fast: the rest of the
        # target goes, in later rounds (other seeds), to those that produced all they were asked.
        plan = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        for round_ in range(6):
            total = sum(sent.values())
            if total >= TARGET or not plan:
                break
            per = max(1, math.ceil((TARGET - total) / len(plan)))
            plan = [(op, mode) for op, mode in plan if fuzz(op, mode, per, round_) >= per]
        total = sum(sent.values())
        print(f"\nschemathesis: {total} requests over {len(operations)} operations, "
              f"{len(failures)} answered 5xx")
        for label, n in sorted(sent.items()):
            print(f"  {n:5d}  {label}")
        assert not failures, "\n".join(failures[:10])
        assert total >= TARGET, f"only {total} requests were generated (target {TARGET})"
