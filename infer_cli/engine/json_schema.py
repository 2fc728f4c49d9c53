"""JSON Schema to GBNF, for llama.cpp's grammar sampler.

The rule: every text the grammar accepts parses as JSON and validates against the schema. The
grammar may accept fewer texts than the schema does (a subset is still valid: optional
properties in declaration order, no extra keys, bounded whitespace, one spelling per character
inside patterns), but never more. What cannot be enforced exactly is ``UnsupportedSchema``,
naming the keyword and where it is.

Supported: type (one or a list), enum, const, null/boolean/number/integer/string/array/object;
properties, required, additionalProperties, min/maxProperties when trivially met; items,
prefixItems, min/maxItems, uniqueItems when maxItems <= 1; minLength, maxLength, an anchored
``pattern`` in a regex subset, format date/time/date-time/uuid; integer bounds (inclusive and
exclusive); number bounds with integral values; anyOf, provably disjoint oneOf, allOf of
mergeable schemas, local $ref (recursion included), boolean schemas.

Formats: jsonschema's default validator does not check ``format``; the grammar enforces it
anyway (valid calendar dates, leap years included; times without leap seconds), so the output
also passes with a FormatChecker.
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["JSON_OBJECT_GBNF", "UnsupportedSchema", "to_gbnf"]


class UnsupportedSchema(ValueError):
    """A schema feature the grammar cannot enforce exactly; str() names the path and keyword."""

    def __init__(self, message: str, path: str):
        super().__init__(f"{path}: {message}")
        self.reason, self.path = message, path


ANNOTATIONS = frozenset({
    "title", "description", "examples", "default", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "contentSchema", "$defs",
    "definitions",
})
TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
# Keywords by the type they constrain; a schema without "type" is generated as the types its
# keywords name (a subset of "any type", so still valid).
KEYWORDS = {
    "object": {"properties", "required", "additionalProperties", "minProperties", "maxProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
}
KEYWORDS["integer"] = KEYWORDS["number"]
GENERAL = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
KNOWN = set().union(*KEYWORDS.values(), GENERAL, ANNOTATIONS)

# llama.cpp's grammar parser refuses repetition counts above 2000 and silently reads a larger
# maximum as no maximum, so longer runs are built from blocks (see counted()).
REPEAT_LIMIT = 2000
BLOCK = 1000
MAX_REPEAT = REPEAT_LIMIT * BLOCK  # the largest count supported at all
MAX_EXPANSION = 200_000     # the most grammar elements one pattern may expand to
NUMBER_BOUND = 10 ** 9      # number bounds beyond this lose exactness to float rounding
FRACTION_DIGITS = 6         # with number bounds: at most this many fraction digits

HEX = "[0-9a-fA-F]"
# One JSON string character: anything raw but '"', '\' and controls, or an escape. \u escapes
# of surrogates are left out, so that every escape decodes to exactly one character and
# maxLength/minLength count exactly.
CHAR = ('[^"\\\\\\x00-\\x1F] | "\\\\" ["\\\\/bfnrt] | "\\\\u" ([0-9a-cA-CefEF] ' + HEX + "{3}"
        " | [dD] [0-7] " + HEX + "{2})")
WS = '( " " | "\\n" [ \\t]{0,20} )?'  # bounded: a model cannot loop on whitespace
BASE_RULES = {
    "ws": WS,
    "char": CHAR,
    "string": '"\\"" char* "\\""',
    "integer": '"-"? ("0" | [1-9] [0-9]*)',
    "number": '"-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [-+]? [0-9]+)?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws ( string ws ":" ws value ( "," ws string ws ":" ws value )* ws )? "}"',
    "array": '"[" ws ( value ( "," ws value )* ws )? "]"',
}

_TWO = "(0[1-9]|1[0-2])"
# Calendar dates: day ranges per month, 29 February only in leap years; year 0000 is not a
# date for Python's datetime, so it is left out.
_YEAR = '([1-9] [0-9]{3} | "0" [1-9] [0-9]{2} | "00" [1-9] [0-9] | "000" [1-9])'
_LEAP = ('( [0-9]{2} ([02468] [48] | [13579] [26] | [2468] "0") '
         '| ([02468] [48] | [13579] [26] | [2468] "0") "00" )')
DATE = (f'{_YEAR} "-" ( ("01"|"03"|"05"|"07"|"08"|"10"|"12") "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
        f' | ("04"|"06"|"09"|"11") "-" ("0" [1-9] | [12] [0-9] | "30")'
        f' | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]) ) | {_LEAP} "-02-29"')
TIME = ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
        '("Z" | [-+] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])')
FORMATS = {  # format: (grammar of the text between the quotes, min length, max length)
    "date": (DATE, 10, 10),
    "time": (TIME, 9, 21),
    "date-time": (f'({DATE}) "T" {TIME}', 20, 32),
    "uuid": (f'{HEX}{{8}} "-" {HEX}{{4}} "-" {HEX}{{4}} "-" {HEX}{{4}} "-" {HEX}{{12}}', 36, 36),
}


def to_gbnf(schema: dict | bool) -> str:
    """GBNF text whose rule ``root`` accepts only JSON texts valid against ``schema``."""
    try:
        return _Converter(schema).convert()
    except (TypeError, AttributeError, KeyError, RecursionError) as e:
        # A keyword with a value of the wrong JSON type, or nesting beyond Python's stack.
        raise UnsupportedSchema(f"the schema is malformed ({type(e).__name__}: {e})", "$") from None


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_literal(value) -> str:
    return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _ptr(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", key) else f"{path}[{json.dumps(key)}]"


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(type(value).__name__)


def _value_key(value) -> str:
    """Equal keys for JSON values jsonschema counts as equal (1 == 1.0, but true != 1)."""
    def norm(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return ["#num", float(v) if isinstance(v, float) or abs(v) < 2 ** 53 else str(v)]
        if isinstance(v, list):
            return [norm(x) for x in v]
        return {k: norm(x) for k, x in v.items()}
    return json.dumps(norm(value), sort_keys=True)


class _Converter:
    def __init__(self, schema):
        self.root = schema
        self.rules: dict[str, str] = {}
        self.by_body: dict[str, str] = {}
        self.refs: dict[str, str] = {}      # ref -> rule name
        self.building: set[str] = set()     # refs whose rule body is being built
        self.pending: set[str] = set()      # refs entered since the last consumed character
        self.used_base: set[str] = set()

    # --- rules -----------------------------------------------------------------------------

    def convert(self) -> str:
        body = self.visit(self.root, "$")
        self.rules["root"] = body
        self._add_base()
        lines = [f"root ::= {self.rules.pop('root')}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    def _add_base(self):
        # The base rules used, and the ones they use in turn.
        need = set()
        text = " ".join(self.rules.values())
        for name in BASE_RULES:
            if re.search(rf"(?<![\w-]){name}(?![\w-])", _strip_literals(text)):
                need.add(name)
        deps = {"string": {"char"}, "value": {"object", "array", "string", "number", "boolean", "null"},
                "object": {"ws", "string", "value"}, "array": {"ws", "value"}}
        todo = list(need)
        while todo:
            for d in deps.get(todo.pop(), ()):
                if d not in need:
                    need.add(d)
                    todo.append(d)
        for name in BASE_RULES:
            if name in need and name not in self.rules:
                self.rules[name] = BASE_RULES[name]

    def rule(self, hint: str, body: str) -> str:
        """A rule name for ``body``, shared with an earlier rule of the same body."""
        if body in self.by_body:
            return self.by_body[body]
        name = self._name(hint)
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def _name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower() or "r"
        base = base[-40:].strip("-") or "r"
        if base in BASE_RULES or base == "root" or base[0].isdigit():
            base = "s-" + base
        name, i = base, 2
        while name in self.rules or name in BASE_RULES:
            name, i = f"{base}-{i}", i + 1
        return name

    # --- schemas ---------------------------------------------------------------------------

    def visit(self, schema, path: str) -> str:
        """A GBNF expression for the JSON texts valid against ``schema``."""
        if schema is True:
            return "value"
        if schema is False:
            raise UnsupportedSchema("the schema 'false' accepts no value", path)
        if not isinstance(schema, dict):
            raise UnsupportedSchema("a schema must be an object or a boolean", path)
        for key in schema:
            if key not in KNOWN:
                raise UnsupportedSchema(f"{key!r} is not supported", path)
        if "$id" in schema and schema is not self.root:
            # A nested $id moves the base that the refs below it resolve against.
            raise UnsupportedSchema("'$id' is supported only at the root", path)
        keys = {k for k in schema if k not in ANNOTATIONS}
        if "$ref" in schema:
            if keys == {"$ref"}:
                return self.ref(schema["$ref"], path)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self.visit(self.merge([self.resolve(schema["$ref"], path), rest], path), path)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or not parts:
                raise UnsupportedSchema("'allOf' must be a non-empty array", path)
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.visit(self.merge([rest, *parts], _ptr(path, "allOf")), path)
        for word in ("anyOf", "oneOf"):
            if word in schema:
                return self.alternatives(schema, word, path)
        if "const" in schema or "enum" in schema:
            return self.enum(schema, path)
        return self.typed(schema, path)

    def ref(self, ref, path: str) -> str:
        target = self.resolve(ref, path)
        if ref in self.building:
            if ref in self.pending:
                raise UnsupportedSchema(f"'$ref' {ref!r} recurses without consuming input", path)
            return self.refs[ref]
        if ref in self.refs:
            return self.refs[ref]
        name = self._name("ref-" + ref.rsplit("/", 1)[-1])
        self.rules[name] = ""   # reserved: the body may refer to the name
        self.refs[ref] = name
        self.building.add(ref)
        self.pending.add(ref)
        try:
            self.rules[name] = self.visit(target, ref.replace("#", "$", 1).replace("/", "."))
        finally:
            self.building.discard(ref)
            self.pending.discard(ref)
        return name

    def resolve(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema(f"'$ref' {ref!r} is not supported (only local '#/...' refs)",
                                    path)
        node = self.root
        if ref not in ("#", "#/"):
            if not ref.startswith("#/"):
                raise UnsupportedSchema(f"'$ref' {ref!r} is not supported (only JSON pointers)", path)
            from urllib.parse import unquote
            for part in ref[2:].split("/"):
                part = unquote(part).replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise UnsupportedSchema(f"'$ref' {ref!r} points at nothing", path)
        return node

    def counted(self, unit: str, lo: int, hi, hint: str) -> str:
        """``unit`` (a GBNF expression) repeated ``lo`` to ``hi`` times (hi may be infinite)."""
        u = unit if re.fullmatch(r"[a-z0-9-]+", unit) else f"( {unit} )"
        if lo <= REPEAT_LIMIT and (hi == math.inf or hi <= REPEAT_LIMIT):
            return _rep(u, lo, hi)
        # lo = q1 blocks + r1 units, then up to hi - lo more: fewer than q whole blocks and a
        # partial one, or q blocks and the rest. Nearly deterministic, so llama.cpp keeps few
        # parse stacks.
        blk = self.rule(hint + "-block", f"{u}{{{BLOCK}}}")
        q1, r1 = divmod(lo, BLOCK)
        parts = [_rep(blk, q1, q1), _rep(u, r1, r1)]
        if hi == math.inf:
            parts.append(f"{u}*")
        else:
            q, r = divmod(hi - lo, BLOCK)
            if q == 0:
                parts.append(_rep(u, 0, r))
            else:
                first = f"{_rep(blk, 0, q - 1)} {_rep(u, 0, BLOCK - 1)}".strip()
                second = f"{_rep(blk, q, q)} {_rep(u, 0, r)}".strip()
                parts.append(self.rule(hint + "-more", f"{first} | {second}"))
        return " ".join(p for p in parts if p) or '""'

    def consuming(self):
        """Entering a value that consumes input: recursion below it is not left recursion."""
        saved, self.pending = self.pending, set()
        return saved

    # --- combinators -----------------------------------------------------------------------

    def alternatives(self, schema, word: str, path: str) -> str:
        branches = schema[word]
        if not isinstance(branches, list) or not branches:
            raise UnsupportedSchema(f"{word!r} must be a non-empty array", path)
        rest = {k: v for k, v in schema.items() if k != word and k not in ANNOTATIONS}
        for other in ("anyOf", "oneOf"):
            if other != word and other in rest:
                raise UnsupportedSchema(f"{word!r} together with {other!r} is not supported", path)
        if word == "oneOf":
            self.check_disjoint(branches, _ptr(path, word))
        alts = []
        for i, b in enumerate(branches):
            bpath = _ptr(_ptr(path, word), i)
            if b is False:
                continue
            alts.append(self.visit(self.merge([rest, b], bpath) if rest else b, bpath))
        if not alts:
            raise UnsupportedSchema(f"every branch of {word!r} is 'false'", path)
        return "( " + " | ".join(alts) + " )" if len(alts) > 1 else alts[0]

    def check_disjoint(self, branches, path: str):
        """oneOf is anyOf when no value can match two branches; refuse what is not provably so."""
        flat = [self.flatten(b, _ptr(path, i)) for i, b in enumerate(branches)]
        for i in range(len(flat)):
            for j in range(len(flat)):
                if i != j and not self.disjoint(flat[i], flat[j]):
                    raise UnsupportedSchema(
                        f"'oneOf' branches {i} and {j} may both match (only branches of different "
                        "types or with different const/enum values of a required property are "
                        "supported)", path)

    def flatten(self, schema, path: str, depth: int = 0):
        """The schema with its top-level $ref and allOf merged in (for looking at keywords)."""
        if not isinstance(schema, dict):
            return schema
        if depth > 20:
            raise UnsupportedSchema("'$ref' nests too deeply to merge", path)
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return self.flatten(self.merge([self.resolve(schema["$ref"], path), rest], path),
                                path, depth + 1)
        if "allOf" in schema:
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.flatten(self.merge([rest, *schema["allOf"]], path), path, depth + 1)
        return schema

    @staticmethod
    def accepted_types(s) -> set[str]:
        """The JSON types of the values ``s`` may accept (over-approximated)."""
        if s is False:
            return set()
        if not isinstance(s, dict) or "type" not in s:
            return set(TYPES)
        t = s["type"]
        return _numeric(set(t if isinstance(t, list) else [t]))

    def generated_types(self, s) -> set[str]:
        """The JSON types of the values visit() generates for ``s`` (over-approximated)."""
        if not isinstance(s, dict):
            return set(TYPES) if s is not False else set()
        if "type" in s:
            return self.accepted_types(s)
        if "const" in s or "enum" in s:
            vals = [s["const"]] if "const" in s else s.get("enum", [])
            return _numeric({_type_of(v) for v in vals})
        if any(k in s for k in ("anyOf", "oneOf", "allOf", "$ref")):
            return set(TYPES)
        types = {t for t in ("object", "array", "string", "number") if KEYWORDS[t] & set(s)}
        return _numeric(types) if types else set(TYPES)

    def disjoint(self, a, b) -> bool:
        """Whether nothing generated for ``a`` is accepted by ``b``."""
        if not self.generated_types(a) & self.accepted_types(b):
            return True
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return False
        va, vb = _values(a), _values(b)
        if va is not None and vb is not None and not va & vb:
            return True
        # A discriminator: a property a requires (writing only objects), with const/enum values
        # that b's schema of the same property refuses.
        if self.generated_types(a) != {"object"}:
            return False
        for name in a.get("required", []):
            pa = self.flatten(a.get("properties", {}).get(name), "$")
            pb = self.flatten(b.get("properties", {}).get(name), "$")
            va, vb = _values(pa), _values(pb)
            if va is not None and vb is not None and not va & vb:
                return True
        return False

    def merge(self, parts, path: str) -> dict:
        """allOf of ``parts`` as one schema; UnsupportedSchema where they cannot be combined."""
        out: dict = {}
        for i, part in enumerate(parts):
            ppath = _ptr(path, i) if len(parts) > 1 else path
            if part is True:
                continue
            if part is False:
                raise UnsupportedSchema("'allOf' with 'false' accepts no value", ppath)
            if not isinstance(part, dict):
                raise UnsupportedSchema("a schema must be an object or a boolean", ppath)
            part = self.flatten(part, ppath)
            for key, value in part.items():
                if key in ANNOTATIONS:
                    continue
                if key not in KNOWN:
                    raise UnsupportedSchema(f"{key!r} is not supported", ppath)
                if key not in out:
                    out[key] = value
                elif out[key] == value:
                    continue
                elif key == "type":
                    a = set(out[key] if isinstance(out[key], list) else [out[key]])
                    b = set(value if isinstance(value, list) else [value])
                    both = (a & b) | ({"integer"} if ("integer" in a and "number" in b) or
                                      ("number" in a and "integer" in b) else set())
                    if not both:
                        raise UnsupportedSchema("'allOf' combines schemas of different types", ppath)
                    out[key] = sorted(both, key=TYPES.index)
                elif key == "properties":
                    props = dict(out[key])
                    for name, s in value.items():
                        props[name] = {"allOf": [props[name], s]} if name in props else s
                    out[key] = props
                elif key == "required":
                    out[key] = list(dict.fromkeys([*out[key], *value]))
                elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
                    out[key] = max(out[key], value)
                elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
                    out[key] = min(out[key], value)
                elif key == "items":
                    out[key] = {"allOf": [out[key], value]}
                elif key == "additionalProperties" and value is True:
                    continue
                elif key == "additionalProperties" and out[key] is True:
                    out[key] = value
                else:
                    raise UnsupportedSchema(f"'allOf' combines different {key!r} values", ppath)
        # additionalProperties of one part limits the properties another part may add.
        closed = [p for p in parts if isinstance(p, dict) and p.get("additionalProperties")
                  not in (None, True)]
        if closed and "properties" in out:
            names = set(out["properties"])
            for p in closed:
                if set(p.get("properties", {})) != names:
                    raise UnsupportedSchema("'allOf' with 'additionalProperties' and different "
                                            "'properties' is not supported", path)
        return out

    def enum(self, schema, path: str) -> str:
        if "const" in schema:
            values = [schema["const"]]
            key = "const"
        else:
            values, key = schema["enum"], "enum"
            if not isinstance(values, list) or not values:
                raise UnsupportedSchema("'enum' must be a non-empty array", path)
        other = {k for k in schema if k not in ANNOTATIONS and k not in ("const", "enum", "type")}
        if other:
            raise UnsupportedSchema(f"{key!r} together with {sorted(other)[0]!r} is not supported", path)
        if "const" in schema and "enum" in schema:
            keys = {_value_key(v) for v in schema["enum"]}
            values = [v for v in values if _value_key(v) in keys]
        if "type" in schema:
            t = schema["type"]
            allowed = set(t if isinstance(t, list) else [t])
            if "number" in allowed:
                allowed.add("integer")
            values = [v for v in values if _type_of(v) in allowed]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UnsupportedSchema(f"{key!r} holds a number JSON cannot write", path)
        if not values:
            raise UnsupportedSchema(f"{key!r} leaves no value of the schema's type", path)
        alts = list(dict.fromkeys(json_literal(v) for v in values))
        return alts[0] if len(alts) == 1 else "( " + " | ".join(alts) + " )"

    # --- types -----------------------------------------------------------------------------

    def typed(self, schema, path: str) -> str:
        if "type" in schema:
            t = schema["type"]
            types = t if isinstance(t, list) else [t]
            for x in types:
                if x not in TYPES:
                    raise UnsupportedSchema(f"'type' {x!r} is not a JSON Schema type", path)
            types = list(dict.fromkeys(types))
        else:
            types = [t for t in ("object", "array", "string", "number")
                     if KEYWORDS[t] & set(schema)]
            if not types:
                return "value"
        if "number" in types and "integer" in types:
            types.remove("integer")
        alts = [self.one_type(schema, t, path) for t in types]
        return alts[0] if len(alts) == 1 else "( " + " | ".join(alts) + " )"

    def one_type(self, s, t: str, path: str) -> str:
        if t in ("null", "boolean"):
            return t
        saved = self.consuming()
        try:
            if t == "object":
                return self.object(s, path)
            if t == "array":
                return self.array(s, path)
            if t == "string":
                return self.string(s, path)
            return self.number(s, t, path)
        finally:
            self.pending = saved

    def object(self, s, path: str) -> str:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise UnsupportedSchema("'properties' must be an object", path)
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise UnsupportedSchema("'required' must be an array of strings", path)
        extra = s.get("additionalProperties", None)
        names = list(props)
        for r in required:
            if r not in props:
                if extra is False:
                    raise UnsupportedSchema(f"'required' names {r!r}, which "
                                            "'additionalProperties' false forbids", path)
                names.append(r)
        if not names:
            # Free-form keys: any keys, each value valid against additionalProperties.
            # At most maxProperties pairs: a repeated key only lowers the count json.loads sees,
            # which is also why minProperties cannot be promised here.
            most = 0 if extra is False else s.get("maxProperties", math.inf)
            self.check_count({k: v for k, v in s.items() if k != "maxProperties"},
                             "Properties", 0, math.inf, path)
            if not (most == math.inf or isinstance(most, int) and not isinstance(most, bool)
                    and most >= 0):
                raise UnsupportedSchema("'maxProperties' must be a non-negative integer", path)
            if most == 0:
                return self.rule(path + "-obj", '"{" ws "}"')
            v = "value" if extra in (None, True) else self.visit(
                extra, _ptr(path, "additionalProperties"))
            kv = f'string ws ":" ws {v}'
            more = self.counted(f'"," ws {kv}', 0, most - 1, path + "-pairs")
            return self.rule(path + "-obj", f'"{{" ws ( {kv} {more} ws )? "}}"')
        # Declared properties only, in declaration order (a subset of what extra keys allow).
        kvs = []
        for name in names:
            sub = props.get(name, True)
            if name in props:
                v = self.visit(sub, _ptr(_ptr(path, "properties"), name))
            else:  # required but not declared: additionalProperties says what it holds
                v = self.visit(extra, _ptr(path, "additionalProperties")) if isinstance(
                    extra, dict) else "value"
            kvs.append(f"{literal(json.dumps(name, ensure_ascii=False))} ws \":\" ws {v}")
        req = [n in required for n in names]
        self.check_count(s, "Properties", sum(req), len(names), path)
        n = len(names)
        # after[i]: properties i.. once one is written, each after a comma.
        after = [""] * (n + 1)
        for i in range(n - 1, -1, -1):
            item = f'"," ws {kvs[i]}'
            part = item if req[i] else f"( {item} )?"
            after[i] = (part + " " + after[i + 1]).strip()
            if after[i] and i > 0:
                after[i] = self.rule(f"{path}-after-{names[i]}", after[i])
        # first[i]: the first property written is i or a later optional one.
        first = [""] * (n + 1)
        stop = req.index(True) if any(req) else n - 1  # later ones are never the first written
        for i in range(stop, -1, -1):
            here = (kvs[i] + " " + after[i + 1]).strip()
            if req[i] or not first[i + 1]:
                first[i] = here
            else:
                first[i] = self.rule(f"{path}-from-{names[i]}", f"{here} | {first[i + 1]}")
        if any(req):
            return self.rule(path + "-obj", f'"{{" ws {first[0]} ws "}}"')
        return self.rule(path + "-obj", f'"{{" ws ( {first[0]} ws )? "}}"')

    @staticmethod
    def check_count(s, what: str, lo, hi, path: str):
        """min/maxProperties (or Items) only when every generated value meets them already."""
        mn, mx = s.get("min" + what), s.get("max" + what)
        if mn is not None and mn > lo:
            raise UnsupportedSchema(f"'min{what}' is not supported beyond the required ones", path)
        if mx is not None and mx < hi:
            raise UnsupportedSchema(f"'max{what}' is not supported below the declared ones", path)

    def array(self, s, path: str) -> str:
        items = s.get("items", None)
        prefix = s.get("prefixItems", [])
        if isinstance(items, list):
            raise UnsupportedSchema("'items' as an array is not supported (use 'prefixItems')", path)
        if not isinstance(prefix, list):
            raise UnsupportedSchema("'prefixItems' must be an array", path)
        lo = s.get("minItems", 0)
        hi = s.get("maxItems", math.inf)
        if not (isinstance(lo, int) and not isinstance(lo, bool) and lo >= 0):
            raise UnsupportedSchema("'minItems' must be a non-negative integer", path)
        if hi != math.inf and not (isinstance(hi, int) and not isinstance(hi, bool) and hi >= 0):
            raise UnsupportedSchema("'maxItems' must be a non-negative integer", path)
        k = len(prefix)
        if items is False:
            hi = min(hi, k)
        if lo > hi:
            raise UnsupportedSchema("'minItems' is above what 'maxItems'/'items' allow", path)
        if s.get("uniqueItems") and hi > 1:
            raise UnsupportedSchema("'uniqueItems' is not supported (unless maxItems <= 1)", path)
        if hi != math.inf and hi > MAX_REPEAT:
            raise UnsupportedSchema(f"'maxItems' above {MAX_REPEAT} is not supported", path)
        if lo > MAX_REPEAT:
            raise UnsupportedSchema(f"'minItems' above {MAX_REPEAT} is not supported", path)
        elems = [self.visit(p, _ptr(_ptr(path, "prefixItems"), i)) for i, p in enumerate(prefix)]
        tail = None
        if hi > k:
            tail = "value" if items in (None, True) else self.visit(items, _ptr(path, "items"))

        def rep(expr, a, b):
            return self.counted(expr, a, b, path + "-items")

        # rest(i): what follows once i elements are written (each further one after a comma).
        def rest(i):
            if i >= hi:
                return ""
            if i >= k:
                rem_hi = hi - i if hi != math.inf else math.inf
                return rep(f'"," ws {tail}', max(0, lo - i), rem_hi)
            nxt = f'"," ws {elems[i]} {rest(i + 1)}'.strip()
            nxt = self.rule(f"{path}-item-{i}", nxt) if i > 0 else nxt
            return nxt if i < lo else f"( {nxt} )?"

        if hi == 0:
            return self.rule(path + "-arr", '"[" ws "]"')
        head = elems[0] if k else tail
        body = f"{head} {rest(1)}".strip()
        if lo >= 1:
            return self.rule(path + "-arr", f'"[" ws {body} ws "]"')
        return self.rule(path + "-arr", f'"[" ws ( {body} ws )? "]"')

    def string(self, s, path: str) -> str:
        lo = s.get("minLength", 0)
        hi = s.get("maxLength", math.inf)
        for key, v in (("minLength", lo), ("maxLength", hi)):
            if v != math.inf and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise UnsupportedSchema(f"{key!r} must be a non-negative integer", path)
        if lo > hi:
            raise UnsupportedSchema("'minLength' is above 'maxLength'", path)
        if "format" in s and "pattern" in s:
            raise UnsupportedSchema("'format' together with 'pattern' is not supported", path)
        if "format" in s:
            fmt = s["format"]
            if fmt not in FORMATS:
                raise UnsupportedSchema(f"'format' {fmt!r} is not supported "
                                        f"(supported: {', '.join(FORMATS)})", path)
            body, flo, fhi = FORMATS[fmt]
            if flo < lo or fhi > hi:
                raise UnsupportedSchema(f"'minLength'/'maxLength' with 'format' {fmt!r} "
                                        "is not supported", path)
            return self.rule(f"{fmt}-string", f'"\\"" ( {body} ) "\\""')
        if "pattern" in s:
            body = Pattern(s["pattern"], path, self).gbnf(lo, hi)
            return self.rule(path + "-str", f'"\\"" {body} "\\""')
        if hi != math.inf and hi > MAX_REPEAT:
            raise UnsupportedSchema(f"'maxLength' above {MAX_REPEAT} is not supported", path)
        if lo > MAX_REPEAT:
            raise UnsupportedSchema(f"'minLength' above {MAX_REPEAT} is not supported", path)
        if lo == 0 and hi == math.inf:
            return "string"
        return self.rule(path + "-str", f'"\\"" {self.counted("char", lo, hi, path + "-chars")} "\\""')

    def number(self, s, t: str, path: str) -> str:
        bounds = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in s:
                v = s[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise UnsupportedSchema(f"{key!r} must be a finite number", path)
                bounds[key] = v
        if not bounds:
            return t
        if t == "integer":
            lo, hi = -math.inf, math.inf
            if "minimum" in bounds:
                lo = max(lo, math.ceil(bounds["minimum"]))
            if "exclusiveMinimum" in bounds:
                lo = max(lo, math.floor(bounds["exclusiveMinimum"]) + 1)
            if "maximum" in bounds:
                hi = min(hi, math.floor(bounds["maximum"]))
            if "exclusiveMaximum" in bounds:
                hi = min(hi, math.ceil(bounds["exclusiveMaximum"]) - 1)
            if lo > hi:
                raise UnsupportedSchema("the bounds leave no integer", path)
            return self.rule(path + "-int", int_range(lo, hi))
        return self.rule(path + "-num", self.number_range(bounds, path))

    def number_range(self, b: dict, path: str) -> str:
        """Numbers within integral bounds, without exponents and with at most 6 fraction digits,
        so that json's float rounding cannot move a value onto an exclusive bound."""
        for key, v in b.items():
            if not float(v).is_integer():
                raise UnsupportedSchema(f"{key!r} with a fraction is not supported on 'number'", path)
            if abs(v) > NUMBER_BOUND:
                raise UnsupportedSchema(f"{key!r} beyond ±{NUMBER_BOUND} is not supported on "
                                        "'number'", path)
        lo, lo_incl = -math.inf, True
        for key, incl in (("minimum", True), ("exclusiveMinimum", False)):
            if key in b:
                v = int(b[key])
                if v > lo or (v == lo and not incl):
                    lo, lo_incl = v, incl
        hi, hi_incl = math.inf, True
        for key, incl in (("maximum", True), ("exclusiveMaximum", False)):
            if key in b:
                v = int(b[key])
                if v < hi or (v == hi and not incl):
                    hi, hi_incl = v, incl
        if lo > hi or (lo == hi and not (lo_incl and hi_incl)):
            raise UnsupportedSchema("the bounds leave no number", path)
        alts = []
        # Non-negative values, written unsigned: magnitude in [max(lo,0), hi].
        if hi >= 0 and not (hi == 0 and not hi_incl):
            if lo >= 0:
                alts.append(magnitude(lo, lo_incl, hi, hi_incl))
            else:
                alts.append(magnitude(0, True, hi, hi_incl))
        # Negative values, written with '-': magnitude in (0, -lo] mirrored.
        if lo < 0:
            if hi < 0:
                alts.append(magnitude(-hi, hi_incl, -lo, lo_incl))
            else:
                alts.append(magnitude(0, False, -lo, lo_incl))
            alts[-1] = f'"-" ( {alts[-1]} )' if alts[-1] else ""
        alts = [a for a in alts if a]
        if not alts:
            raise UnsupportedSchema("the bounds leave no number", path)
        return " | ".join(f"( {a} )" for a in alts)


def _rep(u: str, a: int, b) -> str:
    """``u`` (a name or a parenthesised expression) a..b times, with counts llama.cpp reads."""
    if b == 0:
        return ""
    if b == math.inf:
        return {0: f"{u}*", 1: f"{u}+"}.get(a, f"{u}{{{a},}}")
    if (a, b) == (0, 1):
        return f"{u}?"
    if a == b:
        return u if a == 1 else f"{u}{{{a}}}"
    return f"{u}{{{a},{b}}}"


def _has_rep(node) -> bool:
    if node[0] == "rep":
        return True
    return node[0] in ("seq", "alt") and any(_has_rep(n) for n in node[1])


def _numeric(types: set[str]) -> set[str]:
    """integer and number overlap both ways for jsonschema (1.0 is an integer)."""
    return types | {"integer", "number"} if types & {"integer", "number"} else types


def _values(s):
    """The set of value keys a schema's const/enum allows, or None."""
    if not isinstance(s, dict):
        return None
    if "const" in s:
        return {_value_key(s["const"])}
    if "enum" in s and isinstance(s["enum"], list):
        return {_value_key(v) for v in s["enum"]}
    return None


def _strip_literals(text: str) -> str:
    """Rule bodies without their string literals and classes (to find rule references)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return re.sub(r"\[(?:[^\]\\]|\\.)*\]", "[]", text)


# --- integers ------------------------------------------------------------------------------

def int_range(lo, hi) -> str:
    """GBNF for the decimal integers in [lo, hi] (either may be infinite), no leading zeros,
    no "-0"."""
    alts = []
    if hi >= 0:
        alts += nat_range(max(lo, 0), hi)
    if lo < 0:
        # -n for n in [max(1, -hi), -lo]
        neg = nat_range(max(1, -hi) if hi < 0 else 1, -lo)
        alts += ['"-" ' + (a if " " not in a else f"( {a} )") for a in neg]
    return " | ".join(alts)


def nat_range(a: int, b) -> list[str]:
    """Alternatives for the naturals in [a, b] (b may be infinite), without leading zeros."""
    if a > b:
        return []
    out = []
    la = len(str(a))
    top = len(str(b)) if b != math.inf else la
    for length in range(la, top + 1):
        first = 10 ** (length - 1) if length > 1 else 0
        last = 10 ** length - 1
        x, y = max(a, first), min(b, last)
        if x <= y:
            out += same_length(str(x), str(y))
    if b == math.inf:
        out.append(f"[1-9] [0-9]{{{la},}}")
    return out


def same_length(x: str, y: str) -> list[str]:
    """Alternatives for the digit strings of one length between x and y (inclusive)."""
    if not x:
        return [""]
    n = len(x) - 1
    if x[0] == y[0]:
        return [_cat(f'"{x[0]}"', r) for r in same_length(x[1:], y[1:])]
    out = []
    lo_d, hi_d = int(x[0]), int(y[0])
    if x[1:] != "0" * n:
        out += [_cat(f'"{x[0]}"', r) for r in same_length(x[1:], "9" * n)]
        lo_d += 1
    tail_full = y[1:] == "9" * n
    mid_hi = hi_d if tail_full else hi_d - 1
    if lo_d <= mid_hi:
        d = f'"{lo_d}"' if lo_d == mid_hi else f"[{lo_d}-{mid_hi}]"
        out.append(_cat(d, f"[0-9]{{{n}}}" if n > 1 else ("[0-9]" if n == 1 else "")))
    if not tail_full:
        out += [_cat(f'"{y[0]}"', r) for r in same_length("0" * n, y[1:])]
    return out


def _cat(a: str, b: str) -> str:
    return f"{a} {b}".strip()


def magnitude(p: int, p_incl: bool, q, q_incl: bool) -> str:
    """Unsigned decimals y with p <= y <= q (strict where not incl), p and q integers >= 0."""
    ANY, ZERO = f'( "." [0-9]{{1,{FRACTION_DIGITS}}} )?', f'( "." "0"{{1,{FRACTION_DIGITS}}} )?'
    NONZERO = f'"." [0-9]{{0,{FRACTION_DIGITS - 1}}} [1-9]'  # no trailing zeros: a subset
    alts = []
    start = p if p_incl else p + 1
    end = q - 1  # integer parts whose every fraction is below q
    if start <= end:
        for a in nat_range(start, end):
            alts.append(f"( {a} ) {ANY}" if " " in a else f"{a} {ANY}")
    if not p_incl and p < q:
        alts.append(f'( {" | ".join(nat_range(p, p))} ) {NONZERO}')
    if q != math.inf and q_incl and q >= start:
        alts.append(f'( {" | ".join(nat_range(q, q))} ) {ZERO}')
    return " | ".join(f"( {a} )" for a in alts)


# --- patterns ------------------------------------------------------------------------------

SAFE = [(0x20, 0x7E)]  # where negations of \d \w \s are taken: their ASCII meaning is exact here
UNIVERSE = [(0x20, 0x7E), (0xA0, 0x2027), (0x202A, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
DIGIT = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE = [(0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20)]  # a subset of both ECMA's and Python's \s
META = set("^$\\.|?*+()[]{}")


def _norm(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(ranges, remove):
    out = []
    remove = _norm(remove)
    for a, b in _norm(ranges):
        for c, d in remove:
            if d < a or c > b:
                continue
            if c > a:
                out.append((a, c - 1))
            a = max(a, d + 1)
            if a > b:
                break
        if a <= b:
            out.append((a, b))
    return out


def _class_gbnf(ranges) -> str:
    """GBNF for one decoded character in ``ranges``, written as JSON writes it inside a string
    (one spelling each: raw, or \\" \\\\ and \\uXXXX-style escapes for controls)."""
    ranges = _norm(ranges)
    ranges = _minus(ranges, [(0xD800, 0xDFFF)])  # no UTF-8 for surrogates
    raw = _minus(ranges, [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])
    alts = []
    if raw:
        parts = []
        for a, b in raw:
            parts.append(_cc(a) if a == b else f"{_cc(a)}-{_cc(b)}")
        alts.append("[" + "".join(parts) + "]")
    for a, b in ranges:
        for c in range(a, min(b, 0x5C) + 1):
            if c < 0x20 or c in (0x22, 0x5C):
                alts.append(literal(json.dumps(chr(c))[1:-1]))
    if not alts:
        return ""
    return alts[0] if len(alts) == 1 else "( " + " | ".join(alts) + " )"


def _cc(c: int) -> str:
    ch = chr(c)
    if ch in "]\\-^[":
        return "\\" + ch
    if c < 0x20 or c == 0x7F:
        return f"\\x{c:02X}"
    return ch


class Pattern:
    """An anchored regex in the subset both ECMA-262 and Python's re read the same way
    (jsonschema checks patterns with Python's re.search)."""

    def __init__(self, source, path: str, conv: _Converter):
        self.conv = conv
        if not isinstance(source, str):
            raise UnsupportedSchema("'pattern' must be a string", path)
        self.src, self.path, self.i = source, path, 0
        slashes = len(source[:-1]) - len(source[:-1].rstrip("\\"))  # an odd count escapes '$'
        if not (source.startswith("^") and source.endswith("$") and slashes % 2 == 0
                and len(source) >= 2):
            raise UnsupportedSchema("'pattern' must be anchored with ^...$ (an unanchored pattern "
                                    "only means 'contains')", path)
        self.i = 1
        self.tree = self.alternation()
        if self.i != len(source) - 1:
            raise self.fail("'pattern' has an unsupported construct")

    def fail(self, msg: str) -> UnsupportedSchema:
        return UnsupportedSchema(f"{msg} at offset {self.i} of {self.src!r}", self.path)

    def peek(self):
        return self.src[self.i] if self.i < len(self.src) else None

    def end(self) -> bool:
        return self.i >= len(self.src) - 1  # the final '$' ends the body

    # Trees: ("set", ranges) | ("seq", [..]) | ("alt", [..]) | ("rep", node, lo, hi)

    def alternation(self):
        alts = [self.sequence()]
        while not self.end() and self.peek() == "|":
            self.i += 1
            alts.append(self.sequence())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self):
        items = []
        while not self.end() and self.peek() not in "|)":
            items.append(self.quantified())
        return ("seq", items)

    def quantified(self):
        atom = self.atom()
        c = self.peek() if not self.end() else None
        if c in ("?", "*", "+"):
            self.i += 1
            lo, hi = {"?": (0, 1), "*": (0, math.inf), "+": (1, math.inf)}[c]
        elif c == "{":
            m = re.compile(r"\{(\d+)(,(\d*))?\}").match(self.src, self.i)
            if not m:
                raise self.fail("'pattern' has a '{' that is not a {m}, {m,} or {m,n} quantifier")
            self.i = m.end()
            lo = int(m.group(1))
            hi = lo if not m.group(2) else (int(m.group(3)) if m.group(3) else math.inf)
            if hi < lo:
                raise self.fail("'pattern' has a quantifier {m,n} with n < m")
            if max(lo, 0 if hi == math.inf else hi) > MAX_REPEAT:
                raise self.fail(f"'pattern' repeats more than {MAX_REPEAT} times")
        else:
            return atom
        if not self.end() and self.peek() == "?":
            self.i += 1  # lazy: the same language once anchored
        if not self.end() and self.peek() in "?*+{":
            raise self.fail("'pattern' has a possessive or doubled quantifier")
        return ("rep", atom, lo, hi)

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.src.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.fail("'pattern' lookarounds and named or flagged groups are not supported")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("'pattern' has an unclosed group")
            self.i += 1
            return inner
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return ("set", _minus(UNIVERSE, [(0x2028, 0x2029)]))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in ("^", "$"):
            raise self.fail("'pattern' may have ^ and $ only at its ends")
        if c in ("*", "+", "?", "{", "}", ")", "]"):
            raise self.fail(f"'pattern' has a stray {c!r}")
        self.i += 1
        return ("set", [(ord(c), ord(c))])

    def escape(self, in_class: bool):
        """The ranges of an escape at self.i (a backslash)."""
        self.i += 1
        c = self.peek()
        if c is None:
            raise self.fail("'pattern' ends in a backslash")
        self.i += 1
        simple = {"d": DIGIT, "w": WORD, "s": SPACE,
                  "D": _minus(SAFE, DIGIT), "W": _minus(SAFE, WORD), "S": _minus(SAFE, SPACE)}
        if c in simple:
            return simple[c]
        ctrl = {"t": 9, "n": 10, "r": 13, "f": 12, "v": 11}
        if c in ctrl:
            return [(ctrl[c], ctrl[c])]
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.src[self.i:self.i + n]
            if not re.fullmatch(f"[0-9a-fA-F]{{{n}}}", digits):
                raise self.fail(f"'pattern' has a bad \\{c} escape")
            self.i += n
            cp = int(digits, 16)
            if 0xD800 <= cp <= 0xDFFF:
                raise self.fail("'pattern' has a surrogate escape")
            return [(cp, cp)]
        if c == "b" and in_class:
            return [(8, 8)]
        if c.isascii() and not c.isalnum() and c != "_":
            return [(ord(c), ord(c))]  # an escaped punctuation character: itself in both dialects
        raise self.fail(f"'pattern' escape \\{c} (backreferences, assertions, \\p and the like) "
                        "is not supported")

    def char_class(self):
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges, shorthand, first = [], False, True
        while True:
            c = self.peek()
            if c is None or self.i >= len(self.src) - 1 and c != "]":
                raise self.fail("'pattern' has an unclosed character class")
            if c == "]" and not first:
                self.i += 1
                break
            if c == "]" or c == "[":
                raise self.fail("'pattern' has a '[' or leading ']' inside a class (read "
                                "differently by ECMA and Python)")
            lo = self._class_atom()
            if lo is None:
                shorthand = True
                ranges += self._last
                if self.peek() == "-" and self.src[self.i + 1:self.i + 2] != "]":
                    raise self.fail("'pattern' has a range from a shorthand class")
            elif self.peek() == "-" and self.src[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self._class_atom()
                if hi is None or hi < lo:
                    raise self.fail("'pattern' has a bad range in a character class")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
            first = False
        if negate:
            # With \d \w \s inside, Python's Unicode meaning of them is wider than ours: take the
            # complement within ASCII, where both meanings agree.
            ranges = _minus(SAFE if shorthand else UNIVERSE, ranges)
        return ("set", ranges)

    def _class_atom(self):
        """A code point, or None for a shorthand class (its ranges in self._last)."""
        c = self.peek()
        if c == "\\":
            nxt = self.src[self.i + 1:self.i + 2]
            r = self.escape(in_class=True)
            if nxt in "dwsDWS":
                self._last = r
                return None
            return r[0][0]
        self.i += 1
        return ord(c)

    # --- to GBNF ---------------------------------------------------------------------------

    def lengths(self, node):
        kind = node[0]
        if kind == "set":
            return (1, 1) if node[1] else (math.inf, math.inf)
        if kind == "seq":
            lo = sum(self.lengths(n)[0] for n in node[1])
            hi = sum(self.lengths(n)[1] for n in node[1])
            return lo, hi
        if kind == "alt":
            ls = [self.lengths(n) for n in node[1]]
            return min(x[0] for x in ls), max(x[1] for x in ls)
        lo, hi = self.lengths(node[1])
        return lo * node[2], (hi * node[3] if hi else 0)

    def size(self, node) -> float:
        kind = node[0]
        if kind == "set":
            return 1
        if kind in ("seq", "alt"):
            return sum(self.size(n) for n in node[1]) + 1
        return self.size(node[1]) * max(node[2], node[3] if node[3] != math.inf else 1, 1)

    def gbnf(self, min_len: int, max_len) -> str:
        tree = self.tree
        lo, hi = self.lengths(tree)
        if lo > max_len or hi < min_len:
            raise UnsupportedSchema("'pattern' and 'minLength'/'maxLength' leave no string", self.path)
        if lo < min_len or hi > max_len:
            tree = self.clamp(tree, min_len, max_len)
        if self.size(tree) > MAX_EXPANSION:
            raise UnsupportedSchema("'pattern' expands to too large a grammar", self.path)
        return self.emit(tree) or '""'

    def clamp(self, tree, min_len, max_len):
        """Enforce the length bounds in a sequence with one variable-length item of single
        characters; anything else is refused."""
        items = tree[1] if tree[0] == "seq" else [tree]
        var = [i for i, n in enumerate(items) if self.lengths(n)[0] != self.lengths(n)[1]]
        ok = (len(var) == 1 and items[var[0]][0] == "rep"
              and self.lengths(items[var[0]][1]) == (1, 1))
        if not ok:
            raise UnsupportedSchema("'pattern' together with 'minLength'/'maxLength' is only "
                                    "supported when one part of the pattern varies in length",
                                    self.path)
        j = var[0]
        fixed = sum(self.lengths(n)[0] for i, n in enumerate(items) if i != j)
        _, node, a, b = items[j]
        a, b = max(a, min_len - fixed), min(b, max_len - fixed)
        if a > b:
            raise UnsupportedSchema("'pattern' and 'minLength'/'maxLength' leave no string", self.path)
        items = list(items)
        items[j] = ("rep", node, a, b)
        return ("seq", items)

    def emit(self, node) -> str:
        kind = node[0]
        if kind == "set":
            g = _class_gbnf(node[1])
            if not g:
                raise UnsupportedSchema("'pattern' has a character class that matches nothing "
                                        "this server writes", self.path)
            return g
        if kind == "seq":
            return " ".join(x for x in (self.emit(n) for n in node[1]) if x)
        if kind == "alt":
            return "( " + " | ".join(self.emit(n) or '""' for n in node[1]) + " )"
        _, inner, lo, hi = node
        body = self.emit(inner)
        if not body:
            return ""
        if _has_rep(inner):
            # A repetition inside a repetition of the same rule multiplies against llama.cpp's
            # limit; a rule of its own does not.
            body = self.conv.rule(self.path + "-group", body)
        return self.conv.counted(body, lo, hi, self.path + "-rep")


JSON_OBJECT_GBNF = to_gbnf({"type": "object"})
