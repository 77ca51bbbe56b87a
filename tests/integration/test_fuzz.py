"""Every public route's OpenAPI schema, fuzzed by schemathesis against the running app:
no answer is a 500, and every error comes in the shape of its API (OpenAI's `error`
object, Replicate's problem details, FastAPI's `detail` elsewhere).

Settings (committed here, part of `make test`): up to 25 generated cases per operation,
schemathesis' default generation (valid and invalid inputs), no deadline per case.
"""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.integration.conftest import AUTH

_OPENAI = ("/v1/images",)
_REPLICATE = ("/v1/predictions", "/v1/models/")


@schemathesis.check
def error_in_its_api_shape(ctx, response, case):
    """An error answer has the body its API's clients parse."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} without a JSON body: "
                             f"{response.text[:200]!r}") from None
    path = case.formatted_path
    if path.startswith(_OPENAI):
        assert {"message", "type", "param", "code"} <= set(body["error"]), body
    elif path.startswith(_REPLICATE):
        assert body["status"] == response.status_code and body["detail"], body
        assert response.headers["content-type"][0].startswith("application/problem+json")
    else:
        assert "detail" in body, body
    return


def _fuzz(operation, base_url):
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(base_url=base_url, headers=AUTH,
                               checks=[not_a_server_error, error_in_its_api_shape])

    run()


def test_no_route_answers_500_and_errors_keep_their_shape(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # every public route is in the schema
    failures = {}
    for operation in operations:
        try:
            _fuzz(operation, base_url)
        except Exception as exc:  # noqa: BLE001 - gather every operation's failure
            failures[operation.label] = str(exc)[:2000]
    assert not failures, failures
