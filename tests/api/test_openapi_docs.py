"""/docs: every route in the OpenAPI schema carries an example."""


def _has_example(node, schemas, seen=()) -> bool:
    """True when `node` or anything it contains or references holds an example."""
    if isinstance(node, list):
        return any(_has_example(item, schemas, seen) for item in node)
    if not isinstance(node, dict):
        return False
    if "example" in node or "examples" in node:
        return True
    ref = node.get("$ref", "").rsplit("/", 1)[-1]
    if ref:
        return ref not in seen and _has_example(schemas[ref], schemas, (*seen, ref))
    return any(_has_example(value, schemas, seen) for value in node.values())


def test_every_route_has_an_example_and_docs_render(make_client, tiny_base):
    client = make_client(tiny_base)
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    missing = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            parts = [operation.get("requestBody"), operation.get("parameters"), operation.get("responses")]
            if not any(_has_example(part, schemas) for part in parts if part):
                missing.append(f"{method.upper()} {path}")
            if "requestBody" in operation and not _has_example(operation["requestBody"], schemas):
                missing.append(f"{method.upper()} {path} (request body)")
    assert not missing, f"routes without an example: {missing}"
    openai_paths = {"/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/fine_tuning/jobs",
                    "/v1/fine_tuning/jobs/{fine_tuning_job_id}", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
                    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"}
    assert openai_paths <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text


def test_the_example_check_notices_a_missing_example():
    schemas = {"Thing": {"properties": {"a": {"type": "string"}}}}
    assert not _has_example({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}}, schemas)
    schemas["Thing"]["properties"]["a"]["examples"] = ["x"]
    assert _has_example({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}}, schemas)


def test_the_chat_route_is_documented_with_this_nodes_token_limit(make_client, tiny_base):
    spec = make_client(tiny_base, max_new_tokens_limit=64).get("/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in ("max_completion_tokens", "max_tokens"):
        assert fields[field]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 64}
