"""What an HTTP probe sends: the URL and the headers, the same on both HTTP paths. Pure."""

from __future__ import annotations

from .target import Target

USER_AGENT = "AutoServe-HealthChecker/1.0"
BASE_HEADERS = {"User-Agent": USER_AGENT, "Accept": "application/json, text/plain, */*"}


def target_url(target: Target) -> str:
    return f"{target.check.scheme}://{target.authority}{target.check.path}"


def probe_headers(target: Target) -> dict[str, str]:
    """The check's own headers, then who is probing whom; ``BASE_HEADERS`` go first, each path adds them."""
    check = target.check
    headers = {
        **(check.headers or {}),
        "X-Health-Check": "true",
        "X-Instance-ID": target.instance_id[:12],
        "X-App-Name": target.app_name,
    }
    if not check.keep_alive:
        headers["Connection"] = "close"
    return headers
