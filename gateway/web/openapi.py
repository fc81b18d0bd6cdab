"""OpenAPI 3.0 description of the coordinator API (served at /api/v1/openapi.json)."""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}
_OBJ = {"type": "object"}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or _OBJ}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in (401, 403, *codes)}


_SLUG = {"name": "slug", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGE = [{"name": "page", "in": "query",
          "schema": {"type": "integer", "minimum": 1, "maximum": 1000000}},
         {"name": "per_page", "in": "query",
          "schema": {"type": "integer", "minimum": 1, "maximum": 500}}]
_FILE = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}}}}}}


def _json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": properties, "required": required,
        "additionalProperties": False}}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "CivicDial coordinator API", "version": "1",
             "description": "Questionnaires, campaigns, contacts and invitations. Bearer tokens "
                            "with roles admin > coordinator > viewer (`civicdial token create`)."},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/questionnaires": {
            "get": {"summary": "Questionnaire versions",
                    "responses": {"200": _ok("versions", {"type": "array", "items": _OBJ}),
                                  **_errors()}},
            "post": {"summary": "Upload an XLSForm (viewer: 403)", "requestBody": _FILE,
                     "responses": {"200": _ok("already loaded"), "201": _ok("loaded"),
                                   **_errors(400, 413, 422)}},
        },
        "/api/v1/campaigns": {
            "get": {"summary": "Campaigns",
                    "responses": {"200": _ok("campaigns", {"type": "array", "items": _OBJ}),
                                  **_errors()}},
            "post": {"summary": "Create a campaign (draft)",
                     "requestBody": _json_body({
                         "slug": {"type": "string"}, "name": {"type": "string"},
                         "questionnaire_version": {"type": "string"},
                         "target_size": {"type": "integer", "minimum": 1}},
                         ["slug", "name", "questionnaire_version"]),
                     "responses": {"201": _ok("created"), **_errors(400, 409, 422)}},
        },
        "/api/v1/campaigns/{slug}": {
            "get": {"summary": "One campaign", "parameters": [_SLUG],
                    "responses": {"200": _ok("campaign"), **_errors(404)}},
            "patch": {"summary": "Questionnaire version, reminder schedule, airtime thank-you",
                      "parameters": [_SLUG],
                      "requestBody": _json_body({
                          "questionnaire_version": {"type": "string"},
                          "languages": {"type": "array", "nullable": True,
                                        "items": {"type": "string"}},
                          "reminder_hours": {"type": "integer", "minimum": 1,
                                             "maximum": 1440},
                          "reminder_max": {"type": "integer", "minimum": 0, "maximum": 10},
                          "airtime": {"type": "object", "nullable": True,
                                      "additionalProperties": False,
                                      "required": ["currency", "amount", "budget"],
                                      "properties": {
                                          "currency": {"type": "string",
                                                       "pattern": "^[A-Z]{3}$"},
                                          "amount": {"type": "string"},
                                          "budget": {"type": "string"}}}}, []),
                      "responses": {"200": _ok("campaign"), **_errors(400, 404, 422)}},
        },
        "/api/v1/campaigns/{slug}/quotas": {
            "get": {"summary": "Quotas and their fill per cell", "parameters": [_SLUG],
                    "responses": {"200": _ok("quotas"), **_errors(404)}},
            "put": {"summary": "Replace the quotas", "parameters": [_SLUG],
                    "requestBody": _json_body({
                        "on": {"type": "array", "items": {"type": "string"}},
                        "cells": {"type": "array", "items": {
                            "type": "object", "required": ["values", "target"],
                            "additionalProperties": False,
                            "properties": {
                                "values": {"type": "object",
                                           "additionalProperties": {"type": "string"}},
                                "target": {"type": "integer", "minimum": 0}}}}},
                        ["on", "cells"]),
                    "responses": {"200": _ok("quotas"), **_errors(400, 404, 422)}},
            "delete": {"summary": "Remove the quotas", "parameters": [_SLUG],
                       "responses": {"200": _ok("quotas"), **_errors(404)}},
        },
        **{f"/api/v1/campaigns/{{slug}}/{verb}": {
            "post": {"summary": f"{verb.capitalize()} a campaign", "parameters": [_SLUG],
                     "responses": {"200": _ok("campaign"), **_errors(404, 409)}},
        } for verb in ("open", "pause", "close")},
        "/api/v1/campaigns/{slug}/stats": {
            "get": {"summary": "Counts", "parameters": [_SLUG],
                    "responses": {"200": _ok("counts"), **_errors(404)}},
        },
        "/api/v1/campaigns/{slug}/contacts": {
            "post": {"summary": "Import a contact CSV into the campaign", "parameters": [_SLUG],
                     "requestBody": _FILE,
                     "responses": {"200": _ok("import result"), **_errors(400, 404, 413, 422)}},
        },
        "/api/v1/campaigns/{slug}/invitations": {
            "post": {"summary": "Invite the campaign's contacts by SMS", "parameters": [_SLUG],
                     "requestBody": {"required": False, "content": {"application/json": {
                         "schema": {"type": "object", "additionalProperties": False,
                                    "properties": {
                                        "region": {"type": "string"},
                                        "language": {"type": "string"},
                                        "attributes": {"type": "object",
                                                       "additionalProperties": {
                                                           "type": "string"}},
                                        "limit": {"type": "integer", "minimum": 1}}}}}},
                     "responses": {"202": _ok("queued"), **_errors(400, 404, 409, 422)}},
        },
        "/api/v1/campaigns/{slug}/tally": {
            "post": {"summary": "Tally the indicator into a new snapshot", "parameters": [_SLUG],
                     "responses": {"201": _ok("snapshot"), **_errors(404)}},
        },
        "/api/v1/campaigns/{slug}/publish": {
            "post": {"summary": "Publish the latest snapshot (RESULTS, subscriber SMS)",
                     "parameters": [_SLUG],
                     "responses": {"200": _ok("published"), **_errors(404, 409)}},
        },
        "/api/v1/campaigns/{slug}/export": {
            "get": {"summary": "Download the indicator table or microdata",
                    "parameters": [_SLUG,
                                   {"name": "format", "in": "query", "schema": {
                                       "type": "string",
                                       "enum": ["csv", "xlsx", "sdmx", "microdata"]}},
                                   {"name": "snapshot", "in": "query",
                                    "schema": {"type": "integer", "minimum": 1}}],
                    "responses": {"200": {"description": "the file", "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet":
                            {"schema": {"type": "string", "format": "binary"}}}},
                        **_errors(404, 422)}},
        },
        "/api/v1/contacts": {
            "get": {"summary": "Contacts, paginated (phone numbers never shown to viewers)",
                    "parameters": _PAGE,
                    "responses": {"200": _ok("a page of contacts"), **_errors(422)}},
        },
        "/api/v1/contacts/{contact_id}/opt-out": {
            "post": {"summary": "Opt a contact out of every campaign",
                     "parameters": [{"name": "contact_id", "in": "path", "required": True,
                                     "schema": {"type": "integer"}}],
                     "responses": {"200": _ok("opted out"), **_errors(404)}},
        },
        "/api/v1/audit": {
            "get": {"summary": "Audit log, newest first (admin)", "parameters": _PAGE,
                    "responses": {"200": _ok("entries", {"type": "array", "items": _OBJ}),
                                  **_errors(422)}},
        },
        "/api/v1/tokens": {
            "post": {"summary": "Create an API token (admin); shown once",
                     "requestBody": _json_body({"name": {"type": "string"},
                                                "role": {"type": "string",
                                                         "enum": ["admin", "coordinator",
                                                                  "viewer"]}},
                                               ["name", "role"]),
                     "responses": {"201": _ok("token"), **_errors(400, 422)}},
        },
    },
}
