"""JSON schemas for structured-output benchmarks: shaped like what API clients send
(nested objects, arrays, enums, bounded numbers, patterns, optional fields)."""

from __future__ import annotations

ORDER_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "unit_price": {"type": "number", "minimum": 0, "maximum": 10000},
                },
                "required": ["sku", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string", "maxLength": 60},
    },
    "required": ["order_id", "status", "customer", "items"],
    "additionalProperties": False,
}

ORDER_EXAMPLE: dict = {
    "order_id": "ORD-004211",
    "status": "shipped",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.org", "vip": True},
    "items": [
        {"sku": "KB-101", "quantity": 2, "unit_price": 49.5},
        {"sku": "MS-7", "quantity": 1, "unit_price": 19.99},
    ],
    "note": "leave at the door",
}
