"""Each clear-error path: one paragraph naming the problem and the fix, exit status 2 for
bad usage and 1 for a failure, no stack trace. All of these fail before Spark starts, so
they run in-process."""

from __future__ import annotations

import os
import re

import pytest

import etl
from conftest import run_etl
from sparkify_etl.cli import parse_args
from sparkify_etl.errors import UsageError
from sparkify_etl.settings import HERE, Settings, resolve_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No dl.cfg in the working folder and no AWS settings from the machine."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)


def fails_with(capsys, argv: list[str], pattern: str, status: int = 1) -> str:
    assert etl.main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("etl.py: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    return err


def test_missing_input_root_names_the_missing_folder(capsys, tmp_path):
    fails_with(capsys, ["--input", str(tmp_path / "nowhere")], r"has no song_data/ folder\. Point --input")


def test_input_without_json_files_is_refused(capsys, tmp_path):
    (tmp_path / "in" / "song_data" / "A").mkdir(parents=True)
    (tmp_path / "in" / "log_data").mkdir(parents=True)
    (tmp_path / "in" / "song_data" / "A" / "empty.json").write_text("")
    fails_with(capsys, ["--input", str(tmp_path / "in")], r"song_data holds no non-empty \.json files")


def test_missing_config_file_is_named(capsys, tmp_path):
    fails_with(
        capsys,
        ["--config", str(tmp_path / "absent.cfg")],
        r"Cannot read the config file .*absent\.cfg: No such file or directory",
        status=2,
    )


def test_config_file_that_is_not_ini_is_refused(capsys, tmp_path):
    bad = tmp_path / "dl.cfg"
    bad.write_text("AWS_ACCESS_KEY_ID = AKIDEXAMPLE\n")
    fails_with(capsys, [], r"dl\.cfg is not a valid INI file .*See dl\.cfg\.example", status=2)


def test_config_file_with_unknown_key_is_refused(capsys, tmp_path):
    (tmp_path / "my.cfg").write_text("[AWS]\nAWS_ACCES_KEY_ID = x\n")
    fails_with(capsys, ["--config", "my.cfg"], r"unknown key AWS_ACCES_KEY_ID in \[AWS\]", status=2)


def test_key_without_secret_is_refused_without_showing_the_key(capsys, tmp_path):
    (tmp_path / "dl.cfg").write_text("[AWS]\nAWS_ACCESS_KEY_ID = AKIDEXAMPLE123\n")
    err = fails_with(capsys, [], r"AWS credentials are incomplete", status=2)
    assert "AKIDEXAMPLE123" not in err


def test_unsupported_scheme_is_refused(capsys):
    fails_with(
        capsys,
        ["--output", "hdfs://namenode/out"],
        r"Unsupported location 'hdfs://namenode/out'.*On EMR, write to s3://",
        status=2,
    )


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        etl.main(["--inptu", "data"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --inptu" in capsys.readouterr().err


def test_cli_failure_prints_no_stack_trace(tmp_path):
    result = run_etl("--input", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "has no song_data/ folder" in result.stderr
    assert not (tmp_path / "output").exists(), "a run that cannot read its input writes nothing"


# --- settings precedence: defaults < dl.cfg < environment < flags --------------


def settings_for(argv: list[str], environ: dict) -> Settings:
    return resolve_settings(parse_args(argv), environ)


def test_settings_defaults_read_the_sample_and_write_to_output(tmp_path):
    settings = settings_for([], {})
    assert settings.input_root == str(HERE / "data" / "sample")
    assert settings.output_root == str(tmp_path / "output")
    assert settings.format == "parquet" and settings.catalog is None and settings.retain_days == 7
    assert settings.access_key_id is None and settings.endpoint_url is None


def test_settings_precedence_config_then_environment_then_flags(tmp_path):
    (tmp_path / "dl.cfg").write_text(
        "[AWS]\naws_access_key_id = CFGKEY\nAWS_SECRET_ACCESS_KEY = cfgsecret\nAWS_REGION = eu-west-1\n"
        "[ETL]\nINPUT = s3://udacity-dend/\nOUTPUT = s3a://lake/cfg/\n"
    )
    from_config = settings_for([], {})
    assert (from_config.input_root, from_config.output_root) == ("s3://udacity-dend", "s3a://lake/cfg")
    assert (from_config.access_key_id, from_config.secret_access_key, from_config.region) == (
        "CFGKEY",
        "cfgsecret",
        "eu-west-1",
    )

    environ = {
        "AWS_ACCESS_KEY_ID": "ENVKEY",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    from_env = settings_for([], environ)
    assert (from_env.access_key_id, from_env.secret_access_key, from_env.session_token) == ("ENVKEY", "envsecret", None)
    assert (from_env.region, from_env.endpoint_url) == ("us-west-2", "http://127.0.0.1:9000")

    from_flags = settings_for(["--output", "file:///tmp/My%20lake", "--input", "in", "--format", "delta"], environ)
    assert (from_flags.input_root, from_flags.output_root) == (str(tmp_path / "in"), "/tmp/My lake")
    assert from_flags.format == "delta"


def test_settings_repr_hides_secrets():
    settings = Settings(
        "/in", "/out", access_key_id="KEY", secret_access_key="very-secret", session_token="token-value"
    )
    assert "very-secret" not in repr(settings) and "token-value" not in repr(settings)


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--max-reject-rate", "2"], r"The reject limit '2' is not a fraction between 0 and 1"),
        (["--max-reject-rate", "lots"], r"The reject limit 'lots' is not a fraction"),
        (["--since", "2018-12-01", "--until", "2018-11-01"], r"--since 2018-12-01 is not before --until 2018-11-01"),
        (["--catalog", "my-db"], r"The catalog database name 'my-db' must be letters, digits and underscores"),
        (["--rollback"], r"--rollback returns Delta tables to earlier versions; parquet tables keep no history"),
    ],
)
def test_bad_load_options_are_refused_before_spark_starts(capsys, argv, pattern):
    with pytest.raises(UsageError, match=pattern):
        resolve_settings(parse_args(argv), {})
    fails_with(capsys, argv, pattern, status=2)


def test_a_window_bound_must_be_a_date(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--since", "November"])
    assert exit_info.value.code == 2
    assert "'November' is not a date like 2018-11-15" in capsys.readouterr().err


def test_unknown_config_values_are_refused(capsys, tmp_path):
    (tmp_path / "dl.cfg").write_text("[ETL]\nFORMAT = orc\n[SPARK]\nS3A_COMMITTER = partitioned\n")
    fails_with(capsys, [], r"\[SPARK\] S3A_COMMITTER = partitioned is not a committer etl.py supports", status=2)
    (tmp_path / "dl.cfg").write_text("[ETL]\nFORMAT = orc\n")
    fails_with(capsys, [], r"\[ETL\] FORMAT = orc is not a format etl.py writes; use parquet or delta", status=2)
    (tmp_path / "dl.cfg").write_text("[ETL]\nRETAIN_DAYS = 0\n")
    fails_with(capsys, [], r"\[ETL\] RETAIN_DAYS = 0 is not a whole number of days of at least 1", status=2)


# --- preflight: the output can be written, and input and output stay apart --------


def test_an_unwritable_output_is_refused_before_the_input_is_read(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            (tmp_path / "a-file").write_text("")
            locked = tmp_path / "a-file"
        fails_with(capsys, ["--output", str(locked / "lake")], r"Cannot write to the output .*lake: ")
    finally:
        (tmp_path / "locked").chmod(0o700)


@pytest.mark.parametrize("input_part, output_part", [("data", "data/lake"), ("data/inner", "data")])
def test_input_and_output_may_not_overlap(capsys, tmp_path, input_part, output_part):
    for dataset in ("song_data", "log_data"):
        (tmp_path / input_part / dataset).mkdir(parents=True)
        (tmp_path / input_part / dataset / "x.json").write_text("{}")
    fails_with(
        capsys,
        ["--input", str(tmp_path / input_part), "--output", str(tmp_path / output_part)],
        r"The input .* and the output .* overlap: a load replaces what is under its output",
    )
    assert not (tmp_path / "data" / "lake").exists()


def test_overlap_is_seen_through_symlinks(capsys, tmp_path):
    for dataset in ("song_data", "log_data"):
        (tmp_path / "data" / dataset).mkdir(parents=True)
        (tmp_path / "data" / dataset / "x.json").write_text("{}")
    os.symlink(tmp_path / "data", tmp_path / "alias")
    fails_with(capsys, ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "alias" / "lake")], r"overlap")
