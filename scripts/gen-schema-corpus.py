#!/usr/bin/env python3
"""Writes tests/fixtures/structured/schema-corpus.json: the JSON schemas the structured-output
corpus test (tests/integration/api_structured.rs) sends to a real model, each with a prompt.

Hand-written themes (people, orders, events, ...) plus systematic variations over every
schema feature the issue names: nested objects, arrays with bounds, enums, const, anyOf,
$ref/$defs, string formats, patterns, numbers and integers with ranges, nullable types,
additionalProperties, prefixItems. Strings are bounded (maxLength, enum, format or pattern)
so that a small model cannot ramble inside one forever; the test then requires every
output to validate. Deterministic: rerun after editing and commit the JSON.
"""

import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/structured/schema-corpus.json"


def s(n=24, **kw):
    return {"type": "string", "maxLength": n, **kw}


def obj(props, required=None, **kw):
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **kw,
    }


corpus = []


def add(name, prompt, schema):
    corpus.append({"name": name, "prompt": prompt, "schema": schema})


# --- Hand-written themes -------------------------------------------------------------
add("person", "Describe a person named Ann who is 31 years old.",
    obj({"name": s(), "age": {"type": "integer", "minimum": 0, "maximum": 120}}))
add("address", "Give the address of a bakery in Paris.",
    obj({"street": s(40), "city": s(), "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
         "country": {"enum": ["France", "Germany", "Italy", "Spain"]}}))
add("order", "Create an order of two books.",
    obj({"order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
         "items": {"type": "array", "minItems": 1, "maxItems": 3,
                   "items": obj({"title": s(30), "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                                 "price": {"type": "number", "minimum": 0, "maximum": 500}})},
         "paid": {"type": "boolean"}}))
add("event", "Describe a concert next summer.",
    obj({"title": s(30), "date": {"type": "string", "format": "date"},
         "venue": s(30), "tickets_left": {"type": "integer", "minimum": 0, "maximum": 10000}}))
add("recipe", "Write a short pancake recipe.",
    obj({"dish": s(), "servings": {"type": "integer", "minimum": 1, "maximum": 12},
         "ingredients": {"type": "array", "items": s(20), "minItems": 2, "maxItems": 4},
         "vegetarian": {"type": "boolean"}}))
add("weather", "Report the weather in Tokyo.",
    obj({"city": s(), "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
         "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "storm"]}}))
add("book", "Describe a famous novel.",
    obj({"title": s(40), "author": s(30), "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
         "genres": {"type": "array", "items": {"enum": ["fiction", "drama", "fantasy", "history", "poetry"]},
                    "maxItems": 2}}))
add("movie_rating", "Rate the movie Inception.",
    obj({"movie": s(30), "stars": {"type": "integer", "minimum": 1, "maximum": 5},
         "review": s(60)}))
add("user_account", "Create a user account for Bob.",
    obj({"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
         "email": {"type": "string", "format": "email", "maxLength": 40},
         "id": {"type": "string", "format": "uuid"}}))
add("server", "Describe a web server.",
    obj({"hostname": {"type": "string", "format": "hostname", "maxLength": 30},
         "ipv4": {"type": "string", "format": "ipv4"},
         "port": {"type": "integer", "minimum": 1, "maximum": 65535}}))
add("timestamped_log", "Write one log entry about a failed login.",
    obj({"at": {"type": "string", "format": "date-time", "maxLength": 30},
         "level": {"enum": ["debug", "info", "warn", "error"]}, "message": s(50)}))
add("product", "Describe a laptop for sale.",
    obj({"name": s(30), "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 5000},
         "in_stock": {"type": "boolean"}, "tags": {"type": "array", "items": s(12), "maxItems": 3}}))
add("meeting", "Schedule a team meeting.",
    obj({"topic": s(30), "start": {"type": "string", "format": "time", "maxLength": 20},
         "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 240, "multipleOf": 5},
         "attendees": {"type": "array", "items": s(15), "minItems": 1, "maxItems": 4}}))
add("geo_point", "Give the coordinates of Rome.",
    obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
         "lon": {"type": "number", "minimum": -180, "maximum": 180}}))
add("color", "Pick a color.",
    obj({"name": s(15), "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}))
add("company", "Describe a small software company.",
    obj({"name": s(30), "founded": {"type": "integer", "minimum": 1950, "maximum": 2026},
         "ceo": obj({"name": s(), "age": {"type": "integer", "minimum": 18, "maximum": 99}}),
         "offices": {"type": "array", "maxItems": 2, "items": obj({"city": s(), "staff": {"type": "integer", "minimum": 1, "maximum": 500}})}}))
add("quiz", "Write a quiz question about geography.",
    obj({"question": s(60), "options": {"type": "array", "items": s(20), "minItems": 3, "maxItems": 3},
         "answer_index": {"type": "integer", "minimum": 0, "maximum": 2}}))
add("sentiment", "Classify the sentiment of: I love this phone!",
    obj({"sentiment": {"enum": ["positive", "negative", "neutral"]},
         "confidence": {"type": "number", "minimum": 0, "maximum": 1}}))
add("translation", "Translate 'good morning' to Spanish.",
    obj({"source": s(30), "target": s(30), "language": {"const": "es"}}))
add("todo_list", "Make a todo list for Saturday.",
    obj({"items": {"type": "array", "minItems": 2, "maxItems": 4,
                   "items": obj({"task": s(30), "done": {"type": "boolean"}})}}))
add("flight", "Describe a flight from Berlin to Rome.",
    obj({"from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
         "departure": {"type": "string", "format": "date-time", "maxLength": 30}, "seats": {"type": "integer", "minimum": 1, "maximum": 400}}))
add("contact_nullable", "Give contact details for a shop that has no phone.",
    obj({"name": s(), "phone": {"type": ["string", "null"], "maxLength": 15}, "website": {"type": ["string", "null"], "format": "uri", "maxLength": 40}}))
add("invoice_refs", "Write an invoice with two lines.",
    {"$defs": {"line": obj({"item": s(20), "amount": {"type": "number", "minimum": 0, "maximum": 1000}})},
     **obj({"number": {"type": "integer", "minimum": 1, "maximum": 9999},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 1, "maxItems": 3}})})
add("shape_anyof", "Describe a geometric shape.",
    obj({"shape": {"anyOf": [
        obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 100}}),
        obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0, "maximum": 100}})]}}))
add("payment_anyof", "How did the customer pay?",
    obj({"payment": {"anyOf": [
        obj({"method": {"const": "card"}, "last4": {"type": "string", "pattern": "^[0-9]{4}$"}}),
        obj({"method": {"const": "cash"}}),
        obj({"method": {"const": "transfer"}, "iban": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{8}$"}})]}}))
add("linked_list_recursive_ref", "Write the linked list 1 -> 2 -> 3 as JSON; the last next is null.",
    {"type": "object", "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}},
     "required": ["value", "next"], "additionalProperties": False})
add("matrix", "Give a 2x2 matrix of small integers.",
    obj({"rows": {"type": "array", "minItems": 2, "maxItems": 2,
                  "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}}))
add("tuple_prefix_items", "Give a name, an age and a flag.",
    obj({"record": {"type": "array", "prefixItems": [s(15), {"type": "integer", "minimum": 0, "maximum": 99}, {"type": "boolean"}],
                    "items": False, "minItems": 3}}))
add("optional_fields", "Describe a cat; the nickname is optional.",
    obj({"name": s(), "nickname": s(), "age": {"type": "integer", "minimum": 0, "maximum": 30}}, required=["name", "age"]))
add("semver", "Give a software version.",
    obj({"package": s(20), "version": {"type": "string", "pattern": "^[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}$"}}))
add("bool_flags", "Which features are enabled?",
    obj({"dark_mode": {"type": "boolean"}, "beta": {"type": "boolean"}, "telemetry": {"type": "boolean"}}))
add("integer_enum", "Pick a dice roll.",
    obj({"roll": {"enum": [1, 2, 3, 4, 5, 6]}}))
add("mixed_enum", "Choose a setting value.",
    obj({"value": {"enum": ["auto", 0, 1, True, None]}}))
add("student_grades", "Report grades of a student.",
    obj({"student": s(), "grades": {"type": "array", "minItems": 1, "maxItems": 4,
                                      "items": obj({"subject": {"enum": ["math", "art", "music", "biology"]},
                                                    "grade": {"type": "integer", "minimum": 1, "maximum": 6}})}}))
add("map_pattern_props", "Count the fruits in a basket.",
    {"type": "object", "patternProperties": {"^[a-z]{1,10}$": {"type": "integer", "minimum": 0, "maximum": 20}},
     "additionalProperties": False, "maxProperties": 3})
add("coordinates_list", "List three points on a line.",
    obj({"points": {"type": "array", "minItems": 3, "maxItems": 3,
                    "items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "integer", "minimum": 0, "maximum": 50}], "items": False, "minItems": 2}}}))
add("allof_merge", "Describe an employee.",
    {"type": "object", "properties": {"name": True, "salary": True}, "additionalProperties": False,
     "allOf": [{"type": "object", "properties": {"name": s()}, "required": ["name"]},
               {"type": "object", "properties": {"salary": {"type": "integer", "minimum": 1000, "maximum": 9999}}, "required": ["salary"]}]})
add("duration", "How long does the film last?",
    obj({"film": s(30), "length": {"type": "string", "format": "duration", "maxLength": 20}}))
add("ipv6_host", "Give an IPv6 address for a server.",
    obj({"name": s(20), "address": {"type": "string", "format": "ipv6"}}))
add("nested_deep", "Describe a university with one department.",
    obj({"university": obj({"name": s(40), "department": obj({"name": s(30), "head": obj({"name": s(), "title": {"enum": ["Dr", "Prof"]}})})})}))
add("top_level_array", "List two animals.",
    {"type": "array", "minItems": 2, "maxItems": 2, "items": obj({"animal": s(15), "legs": {"type": "integer", "minimum": 0, "maximum": 8}})})
add("top_level_enum", "Is the sky blue? Answer yes or no.", {"enum": ["yes", "no"]})
add("top_level_integer", "How many days are in a week?", {"type": "integer", "minimum": 1, "maximum": 10})
add("top_level_string", "Name a planet.", {"type": "string", "maxLength": 12, "pattern": "^[A-Z][a-z]+$"})

# --- Systematic variations ------------------------------------------------------------
PROMPTS = [
    "Fill in realistic example data.",
    "Produce an example record.",
    "Give an example for a shop.",
    "Make up data about a city.",
    "Invent an example about a school.",
]
number_ranges = [(0, 1), (-5, 5), (10, 100), (0, 1000), (-1, 0), (1900, 2100)]
for i, (lo, hi) in enumerate(number_ranges):
    add(f"integer_range_{i}", PROMPTS[i % 5],
        obj({"value": {"type": "integer", "minimum": lo, "maximum": hi}, "label": s(16)}))
    add(f"number_range_{i}", PROMPTS[(i + 1) % 5],
        obj({"value": {"type": "number", "minimum": lo, "maximum": hi}, "unit": {"enum": ["m", "kg", "s"]}}))
for i, (lo, hi) in enumerate([(0, 10), (5, 15), (-20, -10)]):
    add(f"exclusive_range_{i}", PROMPTS[i % 5],
        obj({"x": {"type": "integer", "exclusiveMinimum": lo, "exclusiveMaximum": hi}}))
for i, m in enumerate([2, 3, 10, 25]):
    add(f"multiple_of_{m}", PROMPTS[i % 5],
        obj({"count": {"type": "integer", "minimum": 0, "maximum": 200, "multipleOf": m}}))
for i, (lo, hi) in enumerate([(0, 1), (1, 2), (2, 4), (3, 3), (0, 0)]):
    add(f"array_bounds_{lo}_{hi}", PROMPTS[i % 5],
        obj({"items": {"type": "array", "items": s(10), "minItems": lo, "maxItems": hi}}))
for i, (lo, hi) in enumerate([(1, 3), (5, 8), (2, 20), (10, 10)]):
    add(f"string_length_{lo}_{hi}", PROMPTS[i % 5],
        obj({"text": {"type": "string", "minLength": lo, "maxLength": hi}}))
for i, fmt in enumerate(["date", "time", "date-time", "email", "uuid", "ipv4", "ipv6", "hostname", "uri", "duration"]):
    # Formats with open-ended parts (fractions of seconds, labels) get a length bound.
    extra = {"maxLength": 40} if fmt in ("email", "hostname", "uri", "duration", "time", "date-time") else {}
    add(f"format_{fmt}", PROMPTS[i % 5],
        obj({"field": {"type": "string", "format": fmt, **extra}, "note": s(12)}))
patterns = ["^[A-Z]{2}-[0-9]{3}$", "^(red|green|blue)$", "^[a-z]{1,10}@[a-z]{1,10}\\.com$", "^\\+[0-9]{6,10}$",
            "^[0-9]{4}-[0-9]{2}$", "^v[0-9]{1,3}$", "^[A-Za-z ]{1,15}$", "^(yes|no|maybe)$"]
for i, p in enumerate(patterns):
    add(f"pattern_{i}", PROMPTS[i % 5], obj({"code": {"type": "string", "pattern": p}}))
enums = [["small", "medium", "large"], ["north", "south", "east", "west"], [1, 2, 3], ["a", 1, None],
         ["Mon", "Tue", "Wed", "Thu", "Fri"], [True, False]]
for i, e in enumerate(enums):
    add(f"enum_{i}", PROMPTS[i % 5], obj({"choice": {"enum": e}, "reason": s(20)}))
for i, c in enumerate(["fixed", 42, True]):
    add(f"const_{i}", PROMPTS[i % 5], obj({"kind": {"const": c}, "name": s(12)}))
nullable = [["string", "null"], ["integer", "null"], ["boolean", "null"], ["number", "string"]]
for i, t in enumerate(nullable):
    extra = {"maxLength": 12} if "string" in t else {}
    extra |= {"minimum": 0, "maximum": 100} if ("integer" in t or "number" in t) else {}
    add(f"type_union_{i}", PROMPTS[i % 5], obj({"v": {"type": t, **extra}}))
anyofs = [
    [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 5}],
    [obj({"a": {"type": "boolean"}}), obj({"b": {"type": "integer", "minimum": 0, "maximum": 3}})],
    [{"type": "null"}, s(10)],
    [{"enum": ["x", "y"]}, {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5}, "maxItems": 2}],
]
for i, a in enumerate(anyofs):
    add(f"anyof_{i}", PROMPTS[i % 5], obj({"value": {"anyOf": a}}))
for depth in range(1, 6):
    inner = obj({"leaf": s(10)})
    for d in range(depth):
        inner = obj({f"level{d}": inner, "id": {"type": "integer", "minimum": 0, "maximum": 9}})
    add(f"nesting_depth_{depth}", PROMPTS[depth % 5], inner)
for i in range(4):
    defs = {"item": obj({"name": s(10), "n": {"type": "integer", "minimum": 0, "maximum": 5}})}
    props = {f"f{j}": {"$ref": "#/$defs/item"} for j in range(i + 1)}
    add(f"ref_reuse_{i}", PROMPTS[i % 5], {"$defs": defs, **obj(props)})
for i, n in enumerate([1, 3, 6, 9]):
    kinds = [s(10), {"type": "integer", "minimum": 0, "maximum": 50}, {"type": "boolean"},
             {"enum": ["p", "q"]}, {"type": "number", "minimum": 0, "maximum": 1}]
    props = {f"field_{j}": kinds[j % len(kinds)] for j in range(n)}
    add(f"wide_object_{n}", PROMPTS[i % 5], obj(props))
for i, req in enumerate([[], ["a"], ["b", "c"]]):
    add(f"required_subset_{i}", PROMPTS[i % 5],
        obj({"a": s(8), "b": {"type": "integer", "minimum": 0, "maximum": 9}, "c": {"type": "boolean"}}, required=req))
add("additional_props_typed", PROMPTS[0],
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["id"],
     "additionalProperties": {"type": "boolean"}, "maxProperties": 3})
add("array_of_enums_unique_like", PROMPTS[1],
    obj({"days": {"type": "array", "items": {"enum": ["sat", "sun"]}, "minItems": 1, "maxItems": 2}}))
add("array_of_arrays_of_objects", PROMPTS[2],
    obj({"groups": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2, "items": obj({"n": {"type": "integer", "minimum": 0, "maximum": 9}})}}}))
add("pydantic_style", "Describe a user.",
    {"title": "User", "type": "object", "description": "A user.",
     "properties": {"name": {"title": "Name", "type": "string", "maxLength": 20},
                    "age": {"title": "Age", "type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"$ref": "#/$defs/Role"}},
     "required": ["name", "age", "role"],
     "$defs": {"Role": {"title": "Role", "enum": ["admin", "member"], "type": "string"}}})
add("definitions_draft7", PROMPTS[3],
    {"definitions": {"pt": obj({"x": {"type": "integer", "minimum": 0, "maximum": 9}})},
     **obj({"a": {"$ref": "#/definitions/pt"}, "b": {"$ref": "#/definitions/pt"}})})
add("empty_object", PROMPTS[4], {"type": "object", "properties": {}, "additionalProperties": False})
add("number_no_bounds_integer", PROMPTS[0], obj({"n": {"type": "integer", "minimum": -1000000, "maximum": 1000000}}))
add("string_enum_long", PROMPTS[1],
    obj({"country": {"enum": ["Argentina", "Brazil", "Canada", "Denmark", "Egypt", "Finland", "Greece", "Hungary", "India", "Japan"]}}))

assert len(corpus) >= 100, len(corpus)
names = [c["name"] for c in corpus]
assert len(names) == len(set(names)), "duplicate names"
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps(corpus, indent=1) + "\n")
print(f"{len(corpus)} schemas -> {OUT}")
