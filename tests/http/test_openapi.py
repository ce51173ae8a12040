"""The OpenAPI document matches the routes, passes a strict validator; the docs UI is offline."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from tests.conftest import Gateway

UNDOCUMENTED = {"/openapi.json", "/reference", "/reference/", "/reference/static"}


async def test_spec_is_valid_openapi_3(gateway: Gateway) -> None:
    resp = await gateway.client.get("/openapi.json")
    assert resp.status == 200
    spec = await resp.json()
    assert spec["openapi"].startswith("3.0")
    validate(spec)


async def test_every_route_is_documented_with_its_errors(gateway: Gateway) -> None:
    spec = await (await gateway.client.get("/openapi.json")).json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    app = gateway.client.server.app
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        if not path or path in UNDOCUMENTED or path.startswith(("/reference", "/sandbox")):
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: "{" + m.group(1) + "}", path)
        for route in resource:
            if route.method in ("HEAD", "OPTIONS"):
                continue
            assert (path, route.method) in documented, f"{route.method} {path} is not in the spec"
    create = spec["paths"]["/api/v1/transactions"]["post"]
    assert {"201", "200", "401", "413", "415", "422"} <= set(create["responses"])
    assert "requestBody" in create


async def test_reference_ui_needs_no_internet(gateway: Gateway) -> None:
    resp = await gateway.client.get("/reference")
    html = await resp.text()
    assert resp.status == 200
    assert "swagger" in html.lower()
    assert not re.search(r"(src|href)=\"https?://", html), "every asset is served by us"


# The routes as the design names them, path parameters included.
CONTRACT_PATHS = {
    ("/api/v1/transactions", "POST"),
    ("/api/v1/transactions", "GET"),
    ("/api/v1/transactions/{jobId}", "GET"),
    ("/api/v1/transactions/{jobId}", "DELETE"),
    ("/api/v1/transactions/{jobId}/events", "GET"),
    ("/api/v1/deliveries", "GET"),
    ("/api/v1/deliveries/{id}", "GET"),
    ("/api/v1/deliveries/{id}/retry", "POST"),
    ("/api/v1/khqr", "POST"),
    ("/api/v1/transaction/token", "POST"),
    ("/api/v1/transaction/email", "POST"),
    ("/api/v1/transaction/{md5}/md5", "GET"),
    ("/api/v1/transaction/{jobId}/track", "GET"),
    ("/pay/{jobId}", "GET"),
}


async def test_the_designs_routes_are_in_the_spec_by_their_names(gateway: Gateway) -> None:
    spec = await (await gateway.client.get("/openapi.json")).json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    assert documented >= CONTRACT_PATHS, sorted(CONTRACT_PATHS - documented)


async def test_every_json_success_of_the_api_has_a_schema(gateway: Gateway) -> None:
    spec = await (await gateway.client.get("/openapi.json")).json()
    missing = []
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, op in ops.items():
            if not isinstance(op, dict) or method == "head":
                continue
            for code, response in op.get("responses", {}).items():
                content = response.get("content", {})
                if code.startswith("2") and code != "204" and "text/event-stream" not in content:
                    if not any("schema" in c for c in content.values()):
                        missing.append(f"{method.upper()} {path} {code}")
    assert missing == []


async def test_the_reference_lists_the_v1_api_first_and_no_head_duplicates(
    gateway: Gateway,
) -> None:
    spec = await (await gateway.client.get("/openapi.json")).json()
    heads = [path for path, ops in spec["paths"].items() if "head" in ops]
    assert heads == [], "every GET was listed twice"
    tags = [tag["name"] for tag in spec["tags"]]
    assert tags[0] == "transactions" and tags[-1] == "operations", tags
    first = next(iter(spec["paths"]))
    assert first == "/api/v1/transactions", first
    order = [next(iter(op["tags"])) for ops in spec["paths"].values() for op in ops.values()]
    assert order == sorted(order, key=tags.index), "paths follow the order of the tags"


async def test_the_webhook_body_and_headers_are_documented(gateway: Gateway) -> None:
    spec = await (await gateway.client.get("/openapi.json")).json()
    body = spec["components"]["schemas"]["WebhookBody"]
    assert set(body["properties"]["status"]["enum"]) == {"success", "failed", "timeout", "mismatch"}
    assert {"status", "data", "md5", "jobId"} <= set(body["required"])
    assert {"reason", "metadata", "late", "previousStatus"} <= set(body["properties"])
    assert "transaction_failed" in body["properties"]["reason"]["description"]
    headers = spec["components"]["headers"]
    assert {"webhook-id", "webhook-timestamp", "webhook-signature", "x-webhook-signature"} <= set(
        headers
    )
    assert "body only" in headers["x-webhook-signature"]["description"]
    assert "WebhookBody" in spec["info"]["description"]
    validate(spec)
