"""The API's bodies as pydantic models, and the OpenAPI document built from them.

The document is exact: the multipart fields each endpoint reads, the 200 body, and every error
status the service answers with its ``{"error", "detail"}`` body and the codes it can carry.
``/openapi.json`` serves it and ``/docs`` renders it (Swagger UI from BentoML's bundled assets).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from service.preprocess import MAX_SIDE


class TopK(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    """``POST /classify``: one image's softmax over every class, plus the top k."""

    model: str = Field(description="the model that answered")
    version: str = Field(description="first 12 hex digits of the artifact's sha256")
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="softmax over all classes, in the card's order")
    top_k: list[TopK] = Field(description="the k most probable classes, most probable first")
    ood_score: Optional[float] = Field(
        default=None, description="out-of-distribution score of the image (higher = further from the model's "
                                  "training data; the card's `ood` section says how it is computed and how it "
                                  "was measured). Present exactly when the model's card has an `ood` section")
    in_distribution: Optional[bool] = Field(
        default=None, description="`ood_score <= ood.threshold` of the model's card (the threshold keeps 95 % of "
                                  "the validation images): false means the image does not look like any of the "
                                  "model's classes. Present exactly when `ood_score` is")


class ErrorBody(BaseModel):
    """Every non-200 answer of the service."""

    error: str = Field(description="stable machine-readable code (listed per status)")
    detail: Any = Field(description="human-readable explanation (text, or an object for unknown_model)")


class FileError(BaseModel):
    """A file of a batch that could not be decoded (the others are scored)."""

    error: Literal["empty_file", "not_an_image", "corrupt_image", "image_too_large"]
    detail: str


class BatchPrediction(BaseModel):
    """``POST /classify_batch``: one result per uploaded file, in upload order."""

    model: str
    version: str
    results: list[Union[Prediction, FileError]]


class ModelList(BaseModel):
    default: str = Field(description="the model used when a request names none")
    models: dict[str, dict[str, Any]] = Field(description="the served models' cards, by name")


# status -> error codes (shared by both classify endpoints unless noted)
CLASSIFY_ERRORS: dict[int, tuple[str, list[str]]] = {
    400: ("bad request", ["no_file", "invalid_multipart", "invalid_request", "invalid_top_k",
                          "empty_file", "not_an_image", "corrupt_image"]),
    404: ("the model is not served (`detail.valid` lists the served names)", ["unknown_model"]),
    408: ("the request body did not arrive within IMGCLF_BODY_TIMEOUT_S", ["body_timeout"]),
    413: ("body over IMGCLF_MAX_BODY_BYTES, an image with more pixels than IMGCLF_MAX_PIXELS or a side "
          f"over {MAX_SIDE:,} px, or more files than IMGCLF_MAX_FILES",
          ["body_too_large", "image_too_large", "too_many_files"]),
    415: ("the body is not multipart/form-data", ["unsupported_media_type"]),
    503: ("overloaded: the request would wait longer than IMGCLF_MAX_LATENCY_MS (or find "
          "IMGCLF_MAX_QUEUE images queued, or IMGCLF_MAX_QUEUE_BYTES bytes of uploads being received or "
          "queued); retry after "
          "`Retry-After` seconds", ["overloaded"]),
}


# what /explain answers besides the classify errors (it reads no top_k and takes one file)
EXPLAIN_ERRORS: dict[int, tuple[str, list[str]]] = {
    400: ("bad request (`invalid_class`: `class` is neither a class name of the model nor an index)",
          ["invalid_class"]),
    501: ("the model cannot be explained: its registry entry has nothing Grad-CAM can run",
          ["not_explainable"]),
}


def _error_responses(skip: set[str], extra: dict[int, tuple[str, list[str]]] | None = None) -> dict[str, Any]:
    out = {}
    table = dict(CLASSIFY_ERRORS)
    for status, (text, codes) in (extra or {}).items():
        table[status] = (text, table[status][1] + codes) if status in table else (text, codes)
    for status, (text, codes) in sorted(table.items()):
        codes = [c for c in codes if c not in skip]
        response: dict[str, Any] = {
            "description": f"{text}; `error` is one of: {', '.join(codes)}",
            "content": {"application/json": {"schema": {
                "allOf": [{"$ref": "#/components/schemas/ErrorBody"}],
                "properties": {"error": {"type": "string", "enum": codes}}}}},
        }
        if status == 503:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                   "description": "seconds to wait before retrying"}}
        out[str(status)] = response
    return out


def _form(file_field: str, many: bool, models: list[str], default_model: str) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    return {"required": True, "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "required": [file_field],
            "properties": {
                file_field: {"type": "array", "items": binary, "minItems": 1} if many else binary,
                "model": {"type": "string", "enum": models, "default": default_model},
                "top_k": {"type": "integer", "minimum": 1, "default": 5,
                          "description": "clamped to the number of classes"},
            },
        },
        "encoding": {file_field: {"contentType": "image/*, application/octet-stream"}},
    }}}


def openapi_document(models: list[str], default_model: str, version: str = "1") -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (Prediction, BatchPrediction, ErrorBody, ModelList):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema

    def ok(name: str) -> dict[str, Any]:
        return {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}

    explain_form = _form("image", False, models, default_model)
    explain_fields = explain_form["content"]["multipart/form-data"]["schema"]["properties"]
    del explain_fields["top_k"]
    explain_fields["class"] = {"type": "string", "description": "the class to explain: a class name of the "
                               "model or its index (default: the most probable class)"}
    error_404 = {"description": "the model is not served", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "imgclf image classifier", "version": version,
                 "description": "Image classification. Every non-200 answer is JSON "
                                "`{\"error\": code, \"detail\": ...}`."},
        "paths": {
            "/classify": {"post": {
                "summary": "Classify one image", "operationId": "classify",
                "requestBody": _form("image", False, models, default_model),
                "responses": {"200": ok("Prediction"), **_error_responses(set())},
            }},
            "/classify_batch": {"post": {
                "summary": "Classify several images (results keep upload order)", "operationId": "classify_batch",
                "requestBody": _form("images", True, models, default_model),
                "responses": {"200": ok("BatchPrediction"),
                              **_error_responses({"empty_file", "not_an_image", "corrupt_image",
                                                  "image_too_large"})},
            }},
            "/explain": {"post": {
                "summary": "Grad-CAM: where in the image the evidence for a class lies", "operationId": "explain",
                "description": "The uploaded image, preprocessed as for /classify (the model's input size), "
                               "with the Grad-CAM heat of the class drawn over it, as a PNG at the model's "
                               "input size scaled up by a whole factor to at least 224 px on the short side "
                               "(cifar10: 224x224, catsdogs: 384x384).",
                "requestBody": explain_form,
                "responses": {"200": {"description": "the explanation", "content": {
                                  "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                              **_error_responses({"invalid_top_k"}, EXPLAIN_ERRORS)},
            }},
            "/models": {"get": {"summary": "The served models' cards", "operationId": "list_models",
                                "responses": {"200": ok("ModelList")}}},
            "/models/{name}": {"get": {
                "summary": "One served model's card", "operationId": "get_model",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": models}}],
                "responses": {"200": {"description": "the model card", "content": {
                    "application/json": {"schema": {"type": "object"}}}}, "404": error_404},
            }},
        },
        "components": {"schemas": schemas},
    }
