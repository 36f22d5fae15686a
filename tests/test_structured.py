"""Structured output: every constrained output matches its constraint, under every scheduler."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import lark
import numpy as np
import pytest

from helpers import make_engine, ordinary_model
from tandem.engine import Constraint, ConstraintKind, EngineConfig, FinishReason, InvalidRequestError
from tandem.engine.build import build_core
from tandem.engine.request import GenerationRequest, SamplingParams, StoppingCriteria
from tandem.schedulers import load_scheduler
from tandem.schedulers.testing import Arrival, run_workload

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array-of-enums": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 1,
        "maxItems": 5,
    },
    "bounded-numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "count": {"type": "integer", "minimum": 10, "maximum": 99},
        },
        "required": ["age", "score", "count"],
        "additionalProperties": False,
    },
    "optional-and-pattern": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "active": {"type": "boolean"},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
}
REGEX = r"[A-Z][a-z]{2,6} [0-9]{1,3}(\.[0-9]{2})?"
CHOICES = ("yes", "no", "maybe so", 'ask "later"')
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""
GBNF = r"""
root ::= greeting " " name
greeting ::= "hello" | "hi"
name ::= [a-z]{3,8}
"""

UNBOUNDED = {"json-object", "lark"}  # any JSON object; an expression of any length
PARAMS = {
    "greedy": SamplingParams(temperature=0),
    "seeded": SamplingParams(temperature=1.0, seed=7),
    "seeded-top-p": SamplingParams(temperature=0.8, top_p=0.9, seed=11),
}
STOP = StoppingCriteria(max_new_tokens=400)


def _constraints() -> dict[str, Constraint]:
    out = {name: Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(s)) for name, s in SCHEMAS.items()}
    out["json-object"] = Constraint(ConstraintKind.JSON_OBJECT)
    out["regex"] = Constraint(ConstraintKind.REGEX, REGEX)
    out["choice"] = Constraint(ConstraintKind.CHOICE, CHOICES)
    out["lark"] = Constraint(ConstraintKind.GRAMMAR, LARK)
    out["gbnf"] = Constraint(ConstraintKind.GRAMMAR, GBNF)
    return out


def assert_matches(name: str, c: Constraint, text: str) -> None:
    if name in SCHEMAS:
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    elif c.kind is ConstraintKind.JSON_OBJECT:
        assert isinstance(json.loads(text), dict)
    elif c.kind is ConstraintKind.REGEX:
        assert re.fullmatch(REGEX, text), text
    elif c.kind is ConstraintKind.CHOICE:
        assert text in CHOICES, text
    elif name == "lark":
        lark.Lark(LARK).parse(text)
    else:
        assert re.fullmatch(r"(hello|hi) [a-z]{3,8}", text), text


@pytest.fixture(scope="module", params=["preset", "ordinary-weights"])
def model(request, tmp_path_factory) -> str:
    """The preset (wide weights) and an ordinarily initialised model (near-ties, as real ones)."""
    return "tiny-llama" if request.param == "preset" else str(ordinary_model(tmp_path_factory.mktemp("ordinary")))


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_constrained_outputs_match_their_constraint(model: str, scheduler: str) -> None:
    constraints = _constraints()
    prompts: list[str] = []
    params: list[SamplingParams] = []
    cons: list[Constraint | None] = []
    names: list[str] = []
    for i, (name, c) in enumerate(constraints.items()):
        for label, p in PARAMS.items():
            prompts.append(f"request {i} {label}: answer")
            params.append(p)
            cons.append(c)
            names.append(name)
    prompts.append("an unconstrained row in the same batches")
    params.append(SamplingParams(temperature=0))
    cons.append(None)
    names.append("none")
    with make_engine(scheduler, model=model) as eng:
        results = eng.generate(prompts, params, STOP, constraint=cons)
        assert eng.core.grammars.compiled == len(constraints)  # one compile per constraint: the cache
        for name, maybe, r in zip(names, cons, results):
            if maybe is None:
                continue
            c = maybe
            if name in UNBOUNDED and r.finish_reason is FinishReason.LENGTH:
                # Random weights may never close an unbounded string: every token was still allowed.
                assert eng.core.grammars.state(c).matcher.validate_tokens(r.token_ids) == len(r.token_ids)
                continue
            assert r.finish_reason is FinishReason.EOS, (name, r.finish_reason, r.text)
            assert_matches(name, c, r.text)


def _workload(seed: int, sampled: bool) -> list[Arrival]:
    """Constrained and unconstrained requests arriving over time, some with n samples, two
    aborted: small KV pools make the policies preempt."""
    rng = np.random.default_rng(seed)
    constraints = list(_constraints().values()) + [None, None]
    arrivals = []
    for i in range(10):
        c = constraints[int(rng.integers(0, len(constraints)))]
        params = SamplingParams(temperature=0.9, seed=100 + i) if sampled else SamplingParams(temperature=0)
        stop = StoppingCriteria(max_new_tokens=int(rng.integers(8, 40)), ignore_eos=c is None)
        prompt = rng.integers(4, 500, int(rng.integers(2, 28))).tolist()
        n = 3 if i % 4 == 3 else 1  # samples fork off one prefill, each with its own matcher
        request = GenerationRequest(prompt, params, stop, request_id=f"r{i}", constraint=c, n=n)
        arrivals.append(Arrival(int(rng.integers(0, 12)), request, 3 if i in (2, 7) else None))
    return arrivals


def _run(name: str, options: dict[str, str], seed: int, sampled: bool):
    cfg = EngineConfig(model="tiny-llama", block_size=4, kv_blocks=20, max_batch_tokens=24, max_num_seqs=5)
    core, info = build_core(cfg, load_scheduler(name, options))
    try:
        return run_workload(core, info, _workload(seed, sampled), name), core.num_preemptions
    finally:
        core.close()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_constrained_outputs_are_equal_under_every_scheduler(sampled: bool) -> None:
    schedulers = [
        ("fcfs", {}),
        ("prefill-priority", {}),
        ("async-overlap", {"policy": "fcfs"}),
        ("async-overlap", {"policy": "prefill-priority"}),
    ]
    for seed in range(2):
        runs = [_run(name, opts, seed, sampled) for name, opts in schedulers]
        assert any(preemptions for _, preemptions in runs)
        want = runs[0][0]
        assert any("#" in rid for rid in want)  # samples i > 0 of n = 3 requests are in the results
        for got, _ in runs[1:]:
            for rid, (tokens, reason) in want.items():
                got_tokens, got_reason = got[rid]
                if FinishReason.ABORTED in (reason, got_reason):  # aborted at a step: lengths differ
                    shorter, longer = sorted([tokens, got_tokens], key=len)
                    assert longer[: len(shorter)] == shorter, rid
                else:
                    assert (got_tokens, got_reason) == (tokens, reason), rid


def test_a_grammar_that_cannot_finish_ends_with_length(engine) -> None:
    c = Constraint(ConstraintKind.REGEX, "a{50,}")
    [r] = engine.generate(["x"], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=10), constraint=c)
    assert r.finish_reason is FinishReason.LENGTH and r.text == "a" * len(r.text) and len(r.token_ids) == 10


BAD = [
    (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), "constraint.json_schema", "JSONDecodeError"),
    (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "nonsense"}'), "constraint.json_schema", "nonsense"),
    (Constraint(ConstraintKind.JSON_SCHEMA, "[1, 2]"), "constraint.json_schema", "object or a boolean"),
    (Constraint(ConstraintKind.JSON_SCHEMA, " "), "constraint.json_schema", "empty"),
    (Constraint(ConstraintKind.REGEX, "[a-"), "constraint.regex", "unclosed character class"),
    (Constraint(ConstraintKind.REGEX, "(a"), "constraint.regex", "unclosed group"),
    (Constraint(ConstraintKind.GRAMMAR, 'start: "a" | foo'), "constraint.grammar", "unknown name"),
    (Constraint(ConstraintKind.GRAMMAR, "root ::= ("), "constraint.grammar", ""),
    (Constraint(ConstraintKind.CHOICE, ()), "constraint.choice", "at least one"),
    (Constraint(ConstraintKind.CHOICE, ("a", "")), "constraint.choice", "non-empty"),
    (Constraint(ConstraintKind.REGEX, "a" * 70000), "constraint.regex", "over this server's limit"),
]


@pytest.mark.parametrize(("constraint", "field", "message"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_constraints_are_refused_naming_the_field(engine, constraint, field, message) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.generate(["x"], constraint=constraint)
    assert info.value.field == field and message in str(info.value)


def test_the_cache_is_bounded_and_least_recently_used_goes_first(engine) -> None:
    grammars = engine.core.grammars
    size, grammars.cache_size = grammars.cache_size, 2
    try:
        compiled = grammars.compiled
        a, b, c = (Constraint(ConstraintKind.REGEX, f"cache-{x}") for x in "abc")
        for constraint in (a, b, a, c, a, b):  # c evicts b (a was used since); b compiles again
            grammars.state(constraint)
        assert grammars.compiled - compiled == 4
    finally:
        grammars.cache_size = size


def test_cli_generate_with_a_json_schema(tmp_path: Path) -> None:
    import subprocess
    import sys

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["bounded-numbers"]))
    tandem = Path(sys.executable).parent / "tandem"
    run = subprocess.run(
        [
            str(tandem),
            "generate",
            "--model",
            "tiny-llama",
            "--json-schema",
            str(schema),
            "--max-new-tokens",
            "200",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    jsonschema.validate(json.loads(run.stdout), SCHEMAS["bounded-numbers"])
