"""service.app.ServiceFirst: the inference routes go straight to their endpoints, a path with a line
feed to the API app, everything else to the app it wraps (BentoML's). Fast tier: no server."""

from __future__ import annotations

import asyncio

import httpx

from service.app import Classify, ClassifyBatch, Explain, ServiceFirst, build_app, endpoints


def outer_app_marker() -> tuple[list[str], object]:
    seen: list[str] = []

    async def outer(scope, receive, send) -> None:  # stands for BentoML's app
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return seen, outer


def test_endpoints_are_the_three_inference_routes() -> None:
    found = endpoints(build_app(lambda: None))
    assert {path: type(endpoint) for path, endpoint in found.items()} == {
        "/classify": Classify, "/classify_batch": ClassifyBatch, "/explain": Explain}


def test_inference_routes_skip_the_wrapped_app_and_the_rest_reach_it() -> None:
    seen, outer = outer_app_marker()
    app = ServiceFirst(outer, api_app=build_app(lambda: None))

    async def go() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            return {path: await client.post(path) for path in ("/classify", "/classify_batch", "/explain")} | {
                "/livez": await client.get("/livez"), "/models/a%0Ab": await client.get("/models/a%0Ab")}

    answers = asyncio.run(go())
    for path in ("/classify", "/classify_batch", "/explain"):  # the endpoint itself: 503 starting (no Api yet)
        assert answers[path].status_code == 503 and answers[path].json()["error"] == "starting", path
    assert answers["/livez"].status_code == 299  # BentoML's app
    assert answers["/models/a%0Ab"].status_code == 503  # the API app: its JSON answer, not BentoML's
    assert answers["/models/a%0Ab"].json()["error"] == "starting"
    assert seen == ["/livez"]
