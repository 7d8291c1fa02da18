"""Schemathesis hooks for tests/openapi.rs.

One rule of the API cannot be written in OpenAPI: the history endpoints
refuse a `since` that is not before `until` (400), and `/api/top` compares
`since` with `until` or, without it, with now. Positive cases that break
that rule are mended by dropping `since`, so that "valid data is accepted"
holds for every case schemathesis calls valid; negative cases are left alone.
"""

import json
import os
import time

import schemathesis

RANGED = {"/api/history", "/api/history.pcap", "/api/top"}


@schemathesis.hook
def map_case(context, case):
    query = case.query
    meta = case.meta
    if (
        case.operation.path not in RANGED
        or not isinstance(query, dict)
        or "since" not in query
        or meta is None
        or not meta.generation.mode.is_positive
    ):
        return case
    until = query.get("until")
    if until is None and case.operation.path == "/api/top":
        # The agent's default `until` is now; a second of slack for the
        # time between here and the request.
        until = int(time.time() * 1000) - 1000
    try:
        ordered = until is None or int(query["since"]) < int(until)
    except (TypeError, ValueError):
        return case
    if not ordered:
        del query["since"]
    return case


@schemathesis.hook
def after_call(context, case, response):
    """Appends one JSON line per request to $OPENAPI_TEST_CALLS (when set):
    the operation, whether the case was valid, the query parameters it
    carried and the status, so the test can tell every parameter was
    exercised and every operation answered."""
    path = os.environ.get("OPENAPI_TEST_CALLS")
    if not path:
        return
    meta = case.meta
    record = {
        "path": case.operation.path,
        "positive": meta is not None and meta.generation.mode.is_positive,
        "query": sorted(case.query) if isinstance(case.query, dict) else [],
        "status": response.status_code,
    }
    with open(path, "a", encoding="utf-8") as calls:
        calls.write(json.dumps(record) + "\n")
