"""Validate response bodies against OpenAI's own OpenAPI description (../shared/openai-openapi/openapi.json)."""
from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import jsonschema

SPEC = Path(os.environ.get("RAYLM_OPENAI_SPEC",
                           Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"))


def _nullable(node):
    """The spec is OpenAPI 3.1 but still marks some fields with 3.0's ``nullable: true``, which JSON Schema
    ignores: read it as "or null", as OpenAI's own SDK generators do."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _components() -> dict:
    components = _nullable(json.loads(SPEC.read_text())["components"])
    # Where OpenAI's API itself departs from this schema, and so does this server: an echoed prompt's first token
    # has no log-prob (null; lm-evaluation-harness relies on that position), and the streamed completion chunks
    # (which the spec says share this shape) carry finish_reason null until the last one.
    choice = components["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    logprobs = choice["logprobs"]["anyOf"][0]["properties"]
    logprobs["token_logprobs"]["items"] = {"type": ["number", "null"]}
    logprobs["top_logprobs"]["items"] = {"anyOf": [logprobs["top_logprobs"]["items"], {"type": "null"}]}
    return components


def validate(instance: dict, schema_name: str) -> None:
    """Raise jsonschema.ValidationError if ``instance`` is not a valid ``components.schemas[schema_name]``."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    jsonschema.Draft202012Validator(schema).validate(instance)
