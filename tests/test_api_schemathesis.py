"""schemathesis (v4) against the live API server (tests/conftest.py `api_server`), every operation of
/openapi.json incl. a route prefix: zero server errors and zero response-conformance failures (status
codes, content types, headers, response schemas, SSE events).

Generated requests ask for at most 4 tokens (tests/schemathesis/hooks.py), so the run costs ~2-3 min on
this 2-core box; the seed is fixed so CI runs the same cases (SHRINKSERVE_SCHEMATHESIS_SEED overrides it,
SHRINKSERVE_SCHEMATHESIS_EXAMPLES the fuzzing examples per operation). The figures are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY, REPO, ServerProcess

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_conformance_failure(api_server: ServerProcess,
                                                                       tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    seed = os.environ.get("SHRINKSERVE_SCHEMATHESIS_SEED", "20261130")
    examples = os.environ.get("SHRINKSERVE_SCHEMATHESIS_EXAMPLES", "10")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", api_server.url + "/openapi.json",
           "--checks", ",".join(CHECKS), "--max-examples", examples, "--workers", "2", "--seed", seed,
           "--request-timeout", "120", "--generation-database", "none", "--no-color",
           "--header", f"Authorization: Bearer {API_KEY}", "--report", "json", "--report-json-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis.hooks", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    print(f"\nschemathesis {result['schemathesis_version']}: {result['operations']['tested']} operations, "
          f"{cases['generated']} cases, {cases['with_failures']} with failures, {cases['errored']} errored, "
          f"{result['running_time']:.0f} s (seed {seed}, {examples} examples)")
    assert result["operations"]["tested"] == result["operations"]["total"] >= 19
    assert cases["with_failures"] == 0 and not result["failures"], proc.stdout[-8000:]
    assert cases["errored"] == 0 and not result["errors"], proc.stdout[-8000:]
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "Traceback" not in api_server.log_path.read_text()
