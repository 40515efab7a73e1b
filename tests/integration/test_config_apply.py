# ruff: noqa: F811  (the web_and_api fixture from test_cli is used as a parameter)
"""``autoserve apply`` / ``check`` with a file that is empty, truncated or ambiguous: exit 2,
every problem named, and nothing in KV touched; ``apps: {}`` removes every app on purpose."""

from __future__ import annotations

from pathlib import Path

from nats.aio.client import Client

from autoserve_events import SETTINGS_BUCKET

from .test_cli import apply, autoserve, kv_keys, web_and_api  # noqa: F401

HINT = "write `apps: {}` to remove every app on purpose"

REFUSED = {
    "empty.yaml": ("", "{path}: empty (no apps, no settings); " + HINT),
    "comments.yaml": ("# apps:\n#   web: {}\n\n", "{path}: empty (no apps, no settings); " + HINT),
    "cut.yaml": ("apps:\n", "apps: must be a mapping, got nothing; " + HINT),
    "settings.yaml": (
        "detector: {max_response_time_ms: 3000}\n",
        "apps: required: apply replaces every app with the file's; " + HINT,
    ),
    "list.yaml": ("- web\n", "{path}: the top level must be a mapping with an apps key, got list ['web']"),
    "twice.yaml": (
        "apps:\n  web:\n    health_check: {port: 8080}\n    health_check: {port: 8081}\n",
        "apps.web.health_check: duplicate key (line 4), first on line 3",
    ),
}


async def test_an_empty_truncated_or_ambiguous_file_exits_2_and_only_apps_empty_removes_every_app(
    tmp_path: Path, web_and_api: tuple[Path, str], nc: Client
) -> None:
    both, url = web_and_api
    assert apply(both, url).returncode == 0
    settings = await nc.jetstream().key_value(SETTINGS_BUCKET)
    detector_revision = (await settings.get("detector")).revision

    for name, (text, problem) in REFUSED.items():
        path = tmp_path / name
        path.write_text(text)
        for command in ("check", "apply"):
            result = autoserve(command, "-c", str(path), *(["--nats-url", url] if command == "apply" else []))
            assert result.returncode == 2, (name, command, result.stdout, result.stderr)
            assert result.stderr.splitlines() == [
                f"{path}: 1 problem(s), nothing applied:",
                "  " + problem.replace("{path}", str(path)),
            ], name
            assert result.stdout == ""
        assert await kv_keys(nc) == {"web", "api"}, name
        assert (await settings.get("detector")).revision == detector_revision, name

    # Only an explicit `apps: {}` removes every app.
    none = tmp_path / "none.yaml"
    none.write_text("# every app retired on purpose\napps: {}\n")
    assert autoserve("check", "-c", str(none)).stdout.strip() == f"{none}: ok (0 apps, 0 static instances)"
    result = apply(none, url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"applied to {url}: removed: api, web"
    assert await kv_keys(nc) == set()
