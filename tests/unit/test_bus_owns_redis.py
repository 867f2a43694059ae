"""Redis only behind ``runtime.Bus`` (issue #21 item 3): a walk over the package sources.

No module but the bus touches a Bus's Redis client (``bus.redis``, ``self.redis``, any
``.redis`` attribute): each call a role needs is a named Bus method. And no module opens a
Redis client of its own, except the few that are not a job's workers (the operator's status
reader, ``rlhfspec report --from-redis``). The walk is of the syntax tree, so a comment or a
docstring naming ``bus.redis`` is not a finding.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [
    ROOT / "workers" / "rlhfspec_workers",
    ROOT / "operator" / "rlhfspec_operator",
    ROOT / "operator" / "rlhfspec_cli",
    ROOT / "operator" / "rlhfspec_api",
]
BUS = "workers/rlhfspec_workers/runtime.py"
OWN_CLIENTS = {
    BUS,
    # A CLI reading a job's metrics stream from a URL the user gives: no job, no worker env.
    "workers/rlhfspec_workers/observability/report.py",
    # The operator reads progress with its own async client (it runs no Bus).
    "operator/rlhfspec_operator/redis_progress.py",
}


def _sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in package.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def redis_attribute_uses(source: str) -> list[int]:
    """Lines where ``source`` reads an attribute named ``redis`` (``x.redis``)."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "redis"
    ]


def client_constructions(source: str) -> list[int]:
    """Lines where ``source`` builds a Redis client: ``Redis(...)``, ``redis.Redis(...)``,
    ``StrictRedis(...)`` or ``....from_url(...)`` on one of those."""

    def is_client_class(node: ast.expr) -> bool:
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
        return name in ("Redis", "StrictRedis")

    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "from_url":
            func = func.value  # Redis.from_url(...): the class it is called on
        if is_client_class(func):
            lines.append(node.lineno)
    return lines


def test_the_walk_covers_the_packages_and_the_bus() -> None:
    names = {_name(path) for path in _sources()}
    assert BUS in names
    assert "workers/rlhfspec_workers/coordinator/loop.py" in names
    assert "operator/rlhfspec_operator/redis_progress.py" in names
    assert len(names) > 100


def test_no_module_but_the_bus_touches_its_redis_client() -> None:
    found = [
        f"{_name(path)}:{line}"
        for path in _sources()
        if _name(path) != BUS
        for line in redis_attribute_uses(path.read_text(encoding="utf-8"))
    ]
    assert found == [], f"raw Redis calls past the Bus (add a Bus method instead): {found}"


def test_no_worker_module_opens_a_redis_client_of_its_own() -> None:
    found = [
        f"{_name(path)}:{line}"
        for path in _sources()
        if _name(path) not in OWN_CLIENTS
        for line in client_constructions(path.read_text(encoding="utf-8"))
    ]
    assert found == [], f"Redis clients opened outside the Bus: {found}"
    # The allowed ones still do (a stale allowance would hide the next one).
    for name in OWN_CLIENTS:
        assert client_constructions((ROOT / name).read_text(encoding="utf-8")), name


@pytest.mark.parametrize(
    ("source", "attribute_lines", "client_lines"),
    [
        ("bus.redis.set(k, v)\n", [1], []),
        ("x = 1\nself.bus.redis.delete(k)\n", [2], []),
        ("client = bus.redis\n", [1], []),
        ("'''bus.redis.set in a docstring'''\n# bus.redis in a comment\n", [], []),
        ("import redis\nc = redis.Redis(host='h')\n", [], [2]),
        ("from redis import Redis\nc = Redis.from_url(u)\n", [], [2]),
        ("import redis\nc = redis.StrictRedis.from_url(u)\n", [], [2]),
        ("import redis\ntry:\n    pass\nexcept redis.ResponseError:\n    pass\n", [], []),
    ],
)
def test_the_checks_find_what_they_look_for(
    source: str, attribute_lines: list[int], client_lines: list[int]
) -> None:
    assert redis_attribute_uses(source) == attribute_lines
    assert client_constructions(source) == client_lines
