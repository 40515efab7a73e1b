"""The session's planted-secret scanner (tests/conftest.py), on its own registry: a planted
secret in a log file or in a test's captured output is found and reported redacted; a
registered secret file and chDB/JetStream data directories are not flagged."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import MAX_FILE_BYTES, SESSION, SecretScan, plant_secret


@pytest.fixture
def scan() -> SecretScan:
    return SecretScan()


def secret() -> str:
    return f"planted-unit-{secrets.token_hex(12)}"


def test_a_planted_secret_in_a_log_file_is_found_and_reported_redacted(scan: SecretScan, tmp_path: Path) -> None:
    value = scan.plant(secret(), "nats password of prober")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "prober.log").write_text(f"connecting\nnats://prober:{value}@127.0.0.1:4222\nbye\n")
    (tmp_path / "logs" / "clean.log").write_text("nothing to see\n")

    (leak,) = scan.scan_tree(tmp_path)
    assert leak.where == str(tmp_path / "logs" / "prober.log") and leak.label == "nats password of prober"
    assert value not in str(leak) and leak.redacted == f"plan*** {len(value)} chars"
    assert scan.files_scanned == 2 and scan.leaks == [leak]


def test_a_registered_secret_file_is_not_flagged_but_a_copy_elsewhere_is(scan: SecretScan, tmp_path: Path) -> None:
    value = scan.plant(secret(), "nats password of detector")
    password_file = scan.allow(tmp_path / "secrets" / "detector.password")
    password_file.parent.mkdir()
    password_file.write_text(value + "\n")
    creds_dir = scan.allow(tmp_path / "creds")
    creds_dir.mkdir()
    (creds_dir / "detector.creds").write_text(f"-----BEGIN USER NKEY SEED-----\n{value}\n")
    assert scan.scan_tree(tmp_path) == []

    (tmp_path / "service.log").write_text(f"password file said {value}")
    assert [leak.where for leak in scan.scan_tree(tmp_path)] == [str(tmp_path / "service.log")]


def test_data_directories_and_binaries_are_skipped_by_design(scan: SecretScan, tmp_path: Path) -> None:
    value = scan.plant(secret(), "clickhouse password")
    engine = tmp_path / "clickhouse"
    for sub in ("metadata", "store", "preprocessed_configs"):
        (engine / sub).mkdir(parents=True)
    (engine / "preprocessed_configs" / "users.xml").write_text(f"<password>{value}</password>")
    (tmp_path / "nats" / "jetstream").mkdir(parents=True)
    (tmp_path / "nats" / "jetstream" / "1.blk").write_text(value)
    (tmp_path / "core.bin").write_bytes(b"\0\1\2" + value.encode())
    assert scan.scan_tree(tmp_path) == []
    assert scan.files_scanned == 0


def test_a_secret_across_a_chunk_boundary_and_a_cut_large_file(scan: SecretScan, tmp_path: Path) -> None:
    value = scan.plant(secret(), "hmac secret")
    straddling = tmp_path / "straddle.log"
    straddling.write_text("x" * (1024 * 1024 - 10) + value + "\n")
    assert [leak.where for leak in scan.scan_tree(tmp_path)] == [str(straddling)]
    straddling.unlink()

    huge = tmp_path / "huge.log"
    with huge.open("w") as out:
        out.write("y" * (MAX_FILE_BYTES + 10))
        out.write(value)  # past the bound: not read, and counted as cut
    assert scan.scan_tree(tmp_path) == [] and scan.files_cut == 1
    huge.unlink()  # keeps the session's own scan cheap


def test_captured_output_and_failure_text_of_a_report_are_scanned(scan: SecretScan) -> None:
    value = scan.plant(secret().encode(), "nkey seed")  # bytes, as nkeys gives seeds
    report = pytest.TestReport(
        nodeid="tests/x.py::test_y", location=("tests/x.py", 1, "test_y"), keywords={}, outcome="failed",
        longrepr=f"AssertionError: {value} not in repr(auth)", when="call",
        sections=[("Captured stdout call", "ok\n"), ("Captured log call", f"INFO connected with {value}")],
    )  # fmt: skip
    leaks = scan.scan_report(report)
    assert [leak.where for leak in leaks] == [
        "tests/x.py::test_y [Captured log call]",
        "tests/x.py::test_y [failure]",
    ]
    assert all(leak.label == "nkey seed" and value not in str(leak) for leak in leaks)


def test_a_short_secret_is_refused_and_the_session_registry_is_the_module_one() -> None:
    with pytest.raises(ValueError, match="'too short' is 6 chars"):
        SecretScan().plant("s3cret", "too short")
    value = secret()
    assert plant_secret(value, "session registry self-check") == value
    assert SESSION.secrets[value] == "session registry self-check"


LEAKY = """
import secrets
from conftest import plant_secret

def test_leaks(tmp_path):
    value = plant_secret(secrets.token_hex(16), "webhook hmac secret", allowed_in=[tmp_path / "hmac.secret"])
    (tmp_path / "hmac.secret").write_text(value)  # allowed: not a leak
    (tmp_path / "receiver.log").write_text("signing with " + value)  # a leak in a file
    print("the secret is", value)  # a leak in captured stdout
"""


def test_a_leak_fails_a_whole_session_with_a_clear_redacted_message(tmp_path: Path) -> None:
    """The real hooks, in a pytest session of their own: the tests pass, the session fails."""
    shutil.copy(Path(__file__).parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "base"),
         "-o", "addopts=", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    leaks = [line for line in run.stdout.splitlines() if line.startswith("LEAK: webhook hmac secret (")]
    receiver_log = tmp_path / "base" / "test_leaks0" / "receiver.log"
    assert sorted(line.split(") in ", 1)[1] for line in leaks) == [
        str(receiver_log),
        "test_leaky.py::test_leaks [Captured stdout call]",
    ], run.stdout
    assert all(line.split(" (", 1)[1].startswith(tuple("0123456789abcdef")) for line in leaks)
    assert all("*** 32 chars)" in line for line in leaks), run.stdout  # redacted: 4 characters shown
    assert "2 leak(s)" in run.stdout
