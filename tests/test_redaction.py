"""Credentials written into a URL (`s3://user:secret@bucket/...`) never reach an output, a log
line or the terminal: redaction happens in one place (storage.write_json, the CLI's log filter
and prints)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from posmine.cli import main
from posmine.io import storage

# Passwords as users type them: AWS secret keys hold `/`; `@`, `:` and percent-escapes too.
PASSWORDS = ["Zq9x/wJal+rX", "Zq9x@wJalrX", "Zq9x:wJal/rX", "Zq9x%2FwJalrX", "Zq9x/wJ@1:2%40"]


def test_manifests_and_summaries_hold_no_credentials(tmp_path: Path) -> None:
    doc = {"model_dir": "s3://AKIAEXAMPLE:topsecret@bucket/run/train/model",
           "nested": [{"dir": "gs://u:topsecret@b/x"}, "http://u:topsecret@host:9000/p"],
           "ok": "s3://bucket/plain", "n": 3}
    storage.write_json(str(tmp_path / "m.json"), doc)
    text = (tmp_path / "m.json").read_text()
    assert "topsecret" not in text and "AKIAEXAMPLE" not in text
    back = json.loads(text)
    assert back["model_dir"] == "s3://bucket/run/train/model" and back["ok"] == "s3://bucket/plain"
    assert back["nested"][1] == "http://host:9000/p" and back["n"] == 3


def test_log_lines_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("posmine.test")
    caplog.handler.addFilter(storage.RedactingFilter())
    logger.warning("reading %s", "s3://u:topsecret@bucket/x")
    assert "topsecret" not in caplog.text and "s3://bucket/x" in caplog.text


def test_cli_error_names_the_url_without_credentials(s3_server: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A missing bucket named in a URL that carries credentials: the error says which bucket,
    never the secret."""
    code = main(["data", "check", "s3://someone:topsecret@no-such-bucket-x/beir/scifact"])
    out, err = capsys.readouterr()
    assert code == 1 and "no-such-bucket-x" in err
    assert "topsecret" not in out + err and "someone" not in out + err


def test_credentials_in_config_urls_are_refused_at_load() -> None:
    from posmine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"output\.dir: credentials in a URL are refused") as e:
        load_config(None, ["output.dir=s3://someone:topsecret@bucket/run"])
    assert "topsecret" not in str(e.value)


def test_debug_logging_never_shows_the_keys(s3_bucket: str, tiny_beir: Path,
                                            caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`posmine -v` logs at DEBUG, where botocore would log signed request headers (the access
    key id): the CLI keeps those loggers at INFO. Without that guard this test fails."""
    fs, root = storage.filesystem(f"{s3_bucket}/beir/tiny")
    fs.put(str(tiny_beir) + "/", root, recursive=True)
    caplog.set_level(logging.DEBUG)  # the root logger, as `-v` sets it
    assert main(["-v", "data", "check", f"{s3_bucket}/beir/tiny"]) == 0
    out, err = capsys.readouterr()
    seen = caplog.text + out + err
    assert json.loads(out)["corpus"] == 40
    assert "testing-key-id" not in seen and "testing-secret" not in seen


@pytest.mark.parametrize("password", PASSWORDS)
def test_any_password_is_redacted_from_every_output(password: str, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The password's distinctive part never survives: not in a manifest, not in a log line,
    and `filesystem` refuses the URL rather than parse it (s3fs would take `AKIATEST:Zq9x` for a
    bucket name and print it)."""
    url = f"s3://AKIATEST:{password}@bucket/run/x"
    storage.write_json(str(tmp_path / "m.json"), {"dir": url, "list": [f"see {url} now"]})
    caplog.handler.addFilter(storage.RedactingFilter())
    logging.getLogger("posmine.test").warning("reading %s", url)
    with pytest.raises(storage.StorageError) as refused:
        storage.filesystem(url)
    with pytest.raises(storage.StorageError):
        storage.read_bytes(url)
    for text in ((tmp_path / "m.json").read_text(), caplog.text, str(refused.value)):
        assert "Zq9x" not in text and "AKIATEST" not in text, text
    assert json.loads((tmp_path / "m.json").read_text())["dir"] == "s3://bucket/run/x"
    assert storage.redact("s3://bucket/a@b/c") == "s3://bucket/a@b/c"  # a path's own `@` stays


@pytest.mark.parametrize("password", PASSWORDS)
def test_any_password_is_refused_by_the_cli_and_the_config(password: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from posmine.config import ConfigError, load_config

    assert main(["data", "check", f"s3://AKIATEST:{password}@bucket-x/beir/scifact"]) == 1
    out, err = capsys.readouterr()
    assert "credentials in a URL are refused" in err
    assert "Zq9x" not in out + err and "AKIATEST" not in out + err
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"output.dir=s3://AKIATEST:{password}@bucket/run"])
    assert "Zq9x" not in str(e.value) and "AKIATEST" not in str(e.value)
