"""mkdocs hook: render pipeline/openapi.json into the HTTP API reference at build time.

A page that holds the line ``<!-- openapi: pipeline/openapi.json -->`` gets it
replaced by Markdown for every operation and schema of that document, so the
page is made from the same file the service serves and cannot drift from it.
No network, no JavaScript: plain tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

MARKER = re.compile(r"<!-- openapi: (?P<path>[\w./-]+) -->")
METHODS = ("get", "put", "post", "patch", "delete")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.watch.append(str(_root(config) / "pipeline" / "openapi.json"))
    return config


def on_page_markdown(markdown: str, *, page: Page, config: MkDocsConfig, files: Files) -> str:
    def render(match: re.Match[str]) -> str:
        document = json.loads((_root(config) / match["path"]).read_text())
        return render_document(document)

    return MARKER.sub(render, markdown)


def _root(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).parent


def render_document(document: dict[str, Any]) -> str:
    info = document["info"]
    lines = [
        f"**{info['title']}**, version {info['version']} (OpenAPI {document['openapi']}).",
        "",
        _text(info.get("description", "")),
        "",
    ]
    schemes = document.get("components", {}).get("securitySchemes", {})
    if schemes:
        lines += ["## Authentication", "", "| scheme | type | how to get one |", "|---|---|---|"]
        for name, scheme in schemes.items():
            kind = f"{scheme['type']} {scheme.get('scheme', '')}".strip()
            lines.append(f"| `{name}` | {kind} | {_cell(scheme.get('description', ''))} |")
        lines.append("")
    lines += ["## Operations", ""]
    for path, operations in document["paths"].items():
        for method in METHODS:
            if method in operations:
                lines += _operation(method, path, operations[method])
    lines += ["## Schemas", ""]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += _schema(name, schema)
    return "\n".join(lines)


def _operation(method: str, path: str, operation: dict[str, Any]) -> list[str]:
    anchor = f"op-{operation.get('operationId', path).lower()}"
    anchor = re.sub(r"[^a-z0-9-]+", "-", anchor).strip("-")
    lines = [f"### `{method.upper()} {path}` {{#{anchor}}}", "", _text(operation["summary"]), ""]
    role = operation.get("x-required-role")
    public = operation.get("security") == []
    if public:
        lines += ["No token needed.", ""]
    elif role:
        lines += [f"Role `{role}` when tokens are configured.", ""]
    parameters = operation.get("parameters", [])
    if parameters:
        lines += [
            "| parameter | in | type | required | rules | description |",
            "|---|---|---|---|---|---|",
        ]
        for parameter in parameters:
            required = "yes" if parameter.get("required") else "no"
            lines.append(
                f"| `{parameter['name']}` | {parameter['in']} | {_type(parameter['schema'])} "
                f"| {required} | {_rules(parameter['schema'])} "
                f"| {_cell(parameter.get('description', ''))} |"
            )
        lines.append("")
    body = operation.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines += [f"Request body ({media}): {_type(content['schema'])}.", ""]
    lines += ["| status | body | meaning |", "|---|---|---|"]
    for status, response in operation.get("responses", {}).items():
        contents = response.get("content", {})
        bodies = ", ".join(
            f"{_type(content['schema'])} ({media})" if "schema" in content else media
            for media, content in contents.items()
        )
        meaning = _cell(response.get("description", ""))
        lines.append(f"| {status} | {bodies or 'none'} | {meaning} |")
    lines.append("")
    return lines


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name} {{#schema-{name.lower()}}}", ""]
    if "description" in schema:
        lines += [_text(schema["description"]), ""]
    properties = schema.get("properties", {})
    if not properties:
        return [*lines, f"Type: {_type(schema)}.", ""]
    required = set(schema.get("required", []))
    lines += ["| field | type | required | rules | description |", "|---|---|---|---|---|"]
    for field, spec in properties.items():
        lines.append(
            f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} "
            f"| {_rules(spec)} | {_cell(spec.get('description', ''))} |"
        )
    lines.append("")
    return lines


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return " or ".join(_type(option) for option in options)
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    return _container_type(schema)


def _container_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {_type(schema['additionalProperties'])}"
    return str(kind)


def _rules(schema: dict[str, Any]) -> str:
    rules = []
    for key, label in (
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minItems", "items ≥"),
        ("maxItems", "items ≤"),
        ("default", "default"),
    ):
        if key in schema:
            rules.append(f"{label} `{json.dumps(schema[key])}`")
    if "pattern" in schema:
        rules.append(f"pattern `{schema['pattern']}`")
    return _cell("; ".join(rules))


def _text(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    """One table cell: a pipe is escaped outside code spans (inside them it never splits)."""
    parts = _text(text).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))
