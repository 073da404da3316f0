"""Property-based fuzzing of `xybrid serve` from its own OpenAPI schema.

schemathesis generates requests for every operation in the schema the app
publishes (valid and invalid ones) and sends them to a real server process.
Whatever arrives: no 5xx, the process stays up, and every error body is in
OpenAI's shape. Examples per operation are bounded so the run stays short;
``XYBRID_FUZZ_EXAMPLES`` raises it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server_support import ServerProcess, start_server
from xybrid.server.app import create_app
from xybrid.server.settings import ServerSettings

EXAMPLES = int(os.environ.get("XYBRID_FUZZ_EXAMPLES", "25"))

# The schema of the app as served (building the app loads no model).
schema = schemathesis.openapi.from_dict(create_app(ServerSettings()).openapi())


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # Small generations: the fuzzer's valid requests run for real.
    srv = start_server("--max-tokens-limit", "8", "--default-max-tokens", "4", "--max-n", "2",
                       "--max-messages", "8", "--max-tools", "4")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_every_operation(case: schemathesis.Case, server: ServerProcess) -> None:
    response = case.call(base_url=server.base_url, headers=server.headers, timeout=60)
    assert response.status_code < 500, (case.as_curl_command(), response.status_code,
                                        response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert server.proc.poll() is None, server.log()
