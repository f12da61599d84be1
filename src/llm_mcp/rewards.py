"""GRPO's rewards as data, never as code: a fixed set of reward types, each given as {"type": ..., "weight": w, ...}.

Specs are checked here (the server refuses a bad one before any worker starts) and scored here, in plain Python
with bounds: patterns run through the `regex` module with a time limit per match (a catastrophic pattern scores 0,
it cannot stall a worker), patterns and schemas have a size limit, completions are cut to MAX_SCORED_CHARS.
Each reward scores a completion in [0, 1]; GRPO weighs them by `weight`. Leaf module: no torch.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_mcp.errors import InvalidArgument

MAX_REWARDS = 16
MAX_PATTERN_CHARS = 2_000
MAX_SCHEMA_CHARS = 20_000
MAX_SCORED_CHARS = 100_000  # of a completion: a reward never reads more
MATCH_TIMEOUT_S = 0.05  # per pattern match

_NORMALISE = {"ignore_case": True, "ignore_whitespace": True, "ignore_punctuation": False}
# each type: its options and their defaults (None: required); "weight" is every type's
OPTIONS: dict[str, dict[str, Any]] = {
    "exact_match": {**_NORMALISE},
    "contains": {**_NORMALISE},
    "regex": {"pattern": None, "full_match": False, "ignore_case": False},
    "numeric_match": {"tolerance": 1e-6},
    "json_valid": {"allow_code_fence": True},
    "json_schema": {"schema": None, "allow_code_fence": True},
    "length": {"min": 0, "max": None, "unit": "tokens"},
    "format": {"one_line": False, "ends_with_eos": False, "starts_with": None, "ends_with": None},
}
REWARD_TYPES = tuple(OPTIONS)
NEEDS_ANSWER = ("exact_match", "contains", "numeric_match")  # compare against the row's `answer`
LENGTH_UNITS = ("tokens", "words", "chars")
HELP = ("a list of reward objects {\"type\": one of " + ", ".join(REWARD_TYPES) + ", \"weight\": a number (default "
        "1), and the type's options}")


@dataclass(frozen=True)
class RewardSpec:
    """One reward: its type, its weight in GRPO's sum, and its options (every default filled in)."""

    type: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_answer(self) -> bool:
        return self.type in NEEDS_ANSWER

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "weight": self.weight, **self.options}


def parse_rewards(value: Any, param: str = "rewards") -> tuple[RewardSpec, ...]:
    """The reward specs in `value`, each checked: a known type, its options of the right kind, patterns that
    compile, schemas that are schemas. Errors name the reward (rewards[i].option) and what is allowed."""
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidArgument(param, value, HELP)
    if len(value) > MAX_REWARDS:
        raise InvalidArgument(param, f"{len(value)} rewards", f"at most {MAX_REWARDS}")
    return tuple(_parse_one(item, f"{param}[{i}]") for i, item in enumerate(value))


def _parse_one(item: Any, where: str) -> RewardSpec:
    if isinstance(item, RewardSpec):
        return item
    if not isinstance(item, dict) or "type" not in item:
        raise InvalidArgument(where, item, HELP)
    kind = item["type"]
    if kind not in OPTIONS:
        raise InvalidArgument(f"{where}.type", kind, "one of " + ", ".join(REWARD_TYPES) + " (rewards are declared "
                              "from this fixed set; no code is run)")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or abs(weight) > 1000:
        raise InvalidArgument(f"{where}.weight", weight, "a number in [-1000, 1000]")
    unknown = sorted(set(item) - set(OPTIONS[kind]) - {"type", "weight"})
    if unknown:
        raise InvalidArgument(f"{where}.{unknown[0]}", item[unknown[0]], f"an option of {kind!r}: "
                              f"{', '.join(OPTIONS[kind]) or 'none'} (and weight)")
    options = {name: item.get(name, default) for name, default in OPTIONS[kind].items()}
    _check_options(kind, options, where)
    return RewardSpec(kind, float(weight), options)


def _check_options(kind: str, o: dict[str, Any], where: str) -> None:
    for name in ("ignore_case", "ignore_whitespace", "ignore_punctuation", "full_match", "allow_code_fence",
                 "one_line", "ends_with_eos"):
        if name in o and not isinstance(o[name], bool):
            raise InvalidArgument(f"{where}.{name}", o[name], "true or false")
    if kind == "regex":
        _compile(o["pattern"], f"{where}.pattern", o["ignore_case"])
    elif kind == "numeric_match":
        tol = o["tolerance"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise InvalidArgument(f"{where}.tolerance", tol, "a number >= 0 (absolute difference allowed)")
    elif kind == "json_schema":
        _validator(o["schema"], f"{where}.schema")
    elif kind == "length":
        for name in ("min", "max"):
            v = o[name]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidArgument(f"{where}.{name}", v, "an integer >= 0" + (" or null" if name == "max" else ""))
        if o["max"] is not None and o["max"] < o["min"]:
            raise InvalidArgument(f"{where}.max", o["max"], f"an integer >= min ({o['min']})")
        if o["max"] is None and o["min"] == 0:
            raise InvalidArgument(f"{where}", "no band", "min > 0 and/or max: the length band to reward")
        if o["unit"] not in LENGTH_UNITS:
            raise InvalidArgument(f"{where}.unit", o["unit"], "one of " + ", ".join(LENGTH_UNITS))
    elif kind == "format":
        for name in ("starts_with", "ends_with"):
            if o[name] is not None and (not isinstance(o[name], str) or not o[name] or len(o[name]) > 1000):
                raise InvalidArgument(f"{where}.{name}", o[name], "a non-empty string of at most 1000 characters")
        if not (o["one_line"] or o["ends_with_eos"] or o["starts_with"] or o["ends_with"]):
            raise InvalidArgument(where, "no check", "at least one of one_line, ends_with_eos, starts_with, ends_with")


def _compile(pattern: Any, where: str, ignore_case: bool = False) -> Any:
    import regex

    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidArgument(where, pattern, f"a regular expression of 1 to {MAX_PATTERN_CHARS} characters")
    try:
        return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise InvalidArgument(where, pattern, f"a valid regular expression ({exc})") from None


def _validator(schema: Any, where: str) -> Any:
    """A JSON Schema (draft 2020-12) validator whose `pattern` keyword runs with the time bound."""
    import jsonschema

    if not isinstance(schema, dict) or len(json.dumps(schema, default=str)) > MAX_SCHEMA_CHARS:
        raise InvalidArgument(where, schema, f"a JSON Schema object of at most {MAX_SCHEMA_CHARS} characters")
    if "patternProperties" in json.dumps(schema):
        raise InvalidArgument(where, "patternProperties", "a schema without patternProperties (use properties, or a "
                              "regex reward, whose patterns run with a time bound)")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgument(where, schema, f"a valid JSON Schema ({exc.message})") from None

    def bounded_pattern(validator: Any, pattern: str, instance: Any, _schema: Any) -> Any:
        if validator.is_type(instance, "string") and not _search(_compile(pattern, where), instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    return jsonschema.validators.extend(cls, {"pattern": bounded_pattern})(schema)


def _search(compiled: Any, text: str, full: bool = False) -> bool:
    """A bounded match: False when it runs past MATCH_TIMEOUT_S."""
    try:
        found = (compiled.fullmatch if full else compiled.search)(text[:MAX_SCORED_CHARS], timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        return False
    return found is not None


# -- scoring ---------------------------------------------------------------------------------------------------------

def completion_text(completion: Any) -> str:
    """A completion as TRL hands it to reward functions: a string, or (conversational) a list of messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)[:MAX_SCORED_CHARS]


def _normalised(text: str, o: dict[str, Any]) -> str:
    if o["ignore_case"]:
        text = text.casefold()
    if o["ignore_punctuation"]:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if o["ignore_whitespace"]:
        text = " ".join(text.split())
    return text


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text[-10_000:])
    for token in reversed(found):
        try:
            return float(token.replace(",", ""))
        except ValueError:
            continue
    return None


def _json_of(text: str, allow_fence: bool) -> tuple[bool, Any]:
    body = text.strip()
    if allow_fence and body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        return True, json.loads(body)
    except (ValueError, RecursionError):
        return False, None


class Scorer:
    """One reward as a function of TRL's reward signature; __name__ names its curve (rewards/<name>/mean)."""

    def __init__(self, spec: RewardSpec, name: str, eos_token_id: int | None = None) -> None:
        self.spec, self.__name__, self.eos_token_id = spec, name, eos_token_id
        self._compiled: Any = None
        if spec.type == "regex":
            self._compiled = _compile(spec.options["pattern"], "pattern", spec.options["ignore_case"])
        elif spec.type == "json_schema":
            self._compiled = _validator(spec.options["schema"], "schema")

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                 answer: list[Any] | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            ids = completion_ids[i] if completion_ids is not None else None
            out.append(self.score(completion_text(completion), None if answer is None else answer[i], ids))
        return out

    def score(self, text: str, answer: Any, ids: list[int] | None = None) -> float:
        o, kind = self.spec.options, self.spec.type
        if kind in ("exact_match", "contains"):
            if answer is None:
                return 0.0
            got, want = _normalised(text, o), _normalised(str(answer), o)
            return float(got == want if kind == "exact_match" else want in got)
        if kind == "regex":
            return float(_search(self._compiled, text, full=o["full_match"]))
        if kind == "numeric_match":
            got = last_number(text)
            want = last_number(str(answer)) if answer is not None else None
            return float(got is not None and want is not None and abs(got - want) <= o["tolerance"])
        if kind == "json_valid":
            return float(_json_of(text, o["allow_code_fence"])[0])
        if kind == "json_schema":
            ok, value = _json_of(text, o["allow_code_fence"])
            return float(ok and self._valid(value))
        if kind == "length":
            return _in_band(_length(text, ids, o["unit"]), o["min"], o["max"])
        checks = []
        if o["one_line"]:
            checks.append("\n" not in text.strip())
        if o["ends_with_eos"]:
            checks.append(bool(ids) and self.eos_token_id is not None and ids[-1] == self.eos_token_id)
        if o["starts_with"]:
            checks.append(text.lstrip().startswith(o["starts_with"]))
        if o["ends_with"]:
            checks.append(text.rstrip().endswith(o["ends_with"]))
        return sum(checks) / len(checks)

    def _valid(self, value: Any) -> bool:
        try:
            return self._compiled.is_valid(value)
        except RecursionError:
            return False


def _length(text: str, ids: list[int] | None, unit: str) -> int:
    if unit == "tokens" and ids is not None:
        return len(ids)
    return len(text.split()) if unit in ("words", "tokens") else len(text)


def _in_band(n: int, low: int, high: int | None) -> float:
    """1 inside [low, high]; outside, falling linearly to 0 at twice the distance of the nearer bound."""
    if n < low:
        return max(0.0, n / low)
    if high is not None and n > high:
        return max(0.0, 1.0 - (n - high) / max(high, 1))
    return 1.0


def scorers(specs: tuple[RewardSpec, ...], eos_token_id: int | None = None) -> list[Callable[..., list[float]]]:
    """One scorer per spec, named by its type (type_2, type_3 ... for repeats): GRPO's reward functions."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        seen[spec.type] = seen.get(spec.type, 0) + 1
        name = spec.type if seen[spec.type] == 1 else f"{spec.type}_{seen[spec.type]}"
        out.append(Scorer(spec, name, eos_token_id))
    return out
