"""s3a end to end against a real S3 protocol server (moto) on 127.0.0.1, and the S3 preflight."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import datagen
import etl
from conftest import BAD_DATA_ALLOWED, free_port, run_etl
from oracle import expected_tables
from s3store import KEY_ID, REGION, SECRET, all_keys, client, s3_environment, upload
from tables import COLUMNS, assert_one_file_per_partition_folder, read_table

@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory) -> Path:
    """Every quirk and kind of bad record, small: each S3 request costs the Python server time."""
    root = tmp_path_factory.mktemp("s3-input")
    datagen.generate(root, datagen.Scale(songs=90, days=3, events_per_day=80), seed=11, corrupt=True)
    return root


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, s3_dataset, tmp_path_factory):
    """The quirky dataset uploaded to one bucket, loaded by ``python etl.py`` into another
    bucket that does not exist yet, with the Spark event log kept for inspection."""
    s3 = client(s3_endpoint)
    s3.create_bucket(Bucket="sparkify-raw", CreateBucketConfiguration={"LocationConstraint": REGION})
    upload(s3, s3_dataset, "sparkify-raw", "udacity/")
    events = tmp_path_factory.mktemp("event-log")
    env = {**s3_environment(s3_endpoint),
           "PYSPARK_SUBMIT_ARGS": f"--conf spark.eventLog.enabled=true --conf spark.eventLog.dir={events.as_uri()} "
                                  "pyspark-shell"}
    result = run_etl("--input", "s3a://sparkify-raw/udacity/", "--output", "s3://sparkify-lake/star",
                     *BAD_DATA_ALLOWED, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return s3, result, events


def test_s3a_run_writes_tables_that_match_the_oracle(spark, s3_endpoint, s3_dataset, s3_run):
    expected, songs, logs = expected_tables(s3_dataset)
    assert songs.rejects and logs.rejects, "the S3 dataset should hold bad records"
    hadoop_conf = spark.sparkContext._jsc.hadoopConfiguration()
    settings = etl.Settings("s3a://sparkify-lake/star", "s3a://sparkify-lake/star", KEY_ID, SECRET,
                            region=REGION, endpoint_url=s3_endpoint)
    for key, value in etl.s3a_options(settings).items():
        hadoop_conf.set(key, value)
    for table in COLUMNS:
        assert read_table(spark, "s3a://sparkify-lake/star", table) == expected[table], table


def test_s3a_run_creates_the_output_bucket_in_the_region(s3_run):
    s3, _, _ = s3_run
    assert s3.get_bucket_location(Bucket="sparkify-lake")["LocationConstraint"] == REGION


def test_s3a_output_has_one_object_per_partition_folder_and_no_stray_keys(s3_run):
    s3, _, _ = s3_run
    keys = [key[len("star/"):] for key in all_keys(s3, "sparkify-lake")]
    assert_one_file_per_partition_folder([key for key in keys if key.endswith(".parquet")])
    allowed = re.compile(r"^(?:(?:songplays|users|songs|artists|time)/(?:.+/)?part-[^/]+\.parquet"
                         r"|_quarantine/(?:song|log)_data/part-[^/]+\.json"
                         r"|_state/user_latest_event/part-[^/]+\.parquet|_runs/[^/]+\.json"
                         r"|[^/]+(?:/[^/]+)?/_SUCCESS"
                         # S3A's zero-byte directory markers of the folders above
                         r"|(?:songplays|users|songs|artists|time|_quarantine(?:/song_data|/log_data)?"
                         r"|_state(?:/user_latest_event)?|_runs)?/?)$")
    stray = [key for key in keys if not allowed.match(key)]
    markers = [key for key in keys if key.endswith("/") or not key]
    assert all(s3.head_object(Bucket="sparkify-lake", Key=f"star/{key}")["ContentLength"] == 0 for key in markers)
    assert stray == [], f"unexpected keys: {stray[:5]}"
    assert not any("_temporary" in key or "__magic" in key or ".pending" in key for key in keys)
    assert s3.list_multipart_uploads(Bucket="sparkify-lake").get("Uploads", []) == []


def test_s3a_output_is_committed_by_the_s3a_committer(s3_run):
    """The S3A committers write a JSON _SUCCESS manifest; the rename-based one writes 0 bytes."""
    s3, _, _ = s3_run
    for table in COLUMNS:
        manifest = json.loads(s3.get_object(Bucket="sparkify-lake", Key=f"star/{table}/_SUCCESS")["Body"].read())
        assert manifest["committer"] == "magic", table


def test_the_run_report_lands_in_the_bucket_without_the_secret(s3_run):
    s3, _, _ = s3_run
    (key,) = [key for key in all_keys(s3, "sparkify-lake") if key.startswith("star/_runs/")]
    text = s3.get_object(Bucket="sparkify-lake", Key=key)["Body"].read().decode()
    report = json.loads(text)
    assert report["status"] == "succeeded" and report["settings"]["output_root"] == "s3a://sparkify-lake/star"
    assert SECRET not in text and KEY_ID not in text
    assert report["settings"]["access_key_id"] == "****" + KEY_ID[-4:]


def test_an_incremental_load_to_s3_is_refused(s3_endpoint, s3_run):
    result = run_etl("--input", "s3a://sparkify-raw/udacity/", "--output", "s3a://sparkify-lake/star",
                     "--since", "2018-11-02", *BAD_DATA_ALLOWED, env=s3_environment(s3_endpoint))
    assert result.returncode == 1
    assert "etl.py: --since/--until replace single partitions of songplays and time" in result.stderr


def test_secrets_never_appear_in_output_or_event_log(s3_run):
    _, result, events = s3_run
    assert SECRET not in result.stdout + result.stderr
    logs = [path.read_text(errors="replace") for path in events.rglob("*") if path.is_file()]
    assert logs, "the run wrote no event log"
    assert not any(SECRET in text for text in logs)


# --- preflight: clear errors before Spark starts ------------------------------

@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    def use(endpoint: str) -> None:
        for name, value in s3_environment(endpoint).items():
            monkeypatch.setenv(name, value)

    return use


def fails_before_spark(capsys, argv: list[str], pattern: str) -> None:
    assert etl.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("etl.py: ") and "Traceback" not in err and SECRET not in err, err
    assert re.search(pattern, err), err


def test_missing_input_bucket_is_named(capsys, s3_env, s3_endpoint):
    s3_env(s3_endpoint)
    fails_before_spark(capsys, ["--input", "s3a://no-such-bucket/", "--output", "s3a://out/"],
                       r"The bucket does not exist: cannot list s3://no-such-bucket/song_data/")


def test_empty_input_prefix_is_refused(capsys, s3_env, s3_endpoint):
    s3_env(s3_endpoint)
    client(s3_endpoint).create_bucket(Bucket="empty-raw", CreateBucketConfiguration={"LocationConstraint": REGION})
    fails_before_spark(capsys, ["--input", "s3a://empty-raw/", "--output", "s3a://out/"],
                       r"s3://empty-raw/song_data/ holds no objects")


def test_unreachable_endpoint_is_reported(capsys, s3_env):
    s3_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    fails_before_spark(capsys, ["--input", "s3a://raw/", "--output", "s3a://out/"],
                       r"Cannot reach http://127\.0\.0\.1:\d+ to list s3://raw/song_data/")


@pytest.mark.parametrize("code, pattern", [
    ("AccessDenied", r"Access denied: the AWS credentials in use may not list s3://raw/song_data/"),
    ("InvalidAccessKeyId", r"does not know the AWS access key in use.*Check AWS_ACCESS_KEY_ID"),
    ("SignatureDoesNotMatch", r"secret key does not match the access key.*Check AWS_SECRET_ACCESS_KEY"),
])
def test_refused_credentials_get_one_clear_paragraph(capsys, s3_env, s3_error_endpoint, code, pattern):
    s3_env(s3_error_endpoint(403, code))
    fails_before_spark(capsys, ["--input", "s3a://raw/", "--output", "s3a://out/"], pattern)


def test_output_bucket_access_denied_is_reported(s3_error_endpoint):
    """Input readable, output bucket refused: the run stops before Spark with the bucket named."""
    settings = etl.Settings("file:///in", "s3a://locked-lake/star", KEY_ID, SECRET, region=REGION,
                            endpoint_url=s3_error_endpoint(403, "AccessDenied"))
    with pytest.raises(etl.EtlError, match=r"Access denied: the AWS credentials in use may not write to bucket locked-lake"):
        etl.check_s3_access(settings)


def test_connector_matches_the_installed_spark():
    names = ["spark-core_2.13-4.1.4.jar", "hadoop-client-api-3.4.2.jar", "hadoop-client-runtime-3.4.2.jar"]
    assert etl.connector_packages(names, "4.1.4") == (
        "org.apache.hadoop:hadoop-aws:3.4.2,org.apache.spark:spark-hadoop-cloud_2.13:4.1.+")
    names_35 = ["spark-core_2.12-3.5.9.jar", "hadoop-client-api-3.3.4.jar"]
    assert etl.connector_packages(names_35, "3.5.9") == (
        "org.apache.hadoop:hadoop-aws:3.3.4,org.apache.spark:spark-hadoop-cloud_2.12:3.5.+")
    assert etl.connector_packages(names + ["hadoop-aws-3.4.2.jar"], "4.1.4") is None


def test_s3a_options_carry_credentials_endpoint_and_committer():
    settings = etl.Settings("s3a://raw", "s3a://lake", "KEY", "SECRET", "TOKEN", "us-west-2",
                            "http://127.0.0.1:9000")
    options = etl.s3a_options(settings)
    assert options["fs.s3a.aws.credentials.provider"] == "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
    assert (options["fs.s3a.access.key"], options["fs.s3a.secret.key"], options["fs.s3a.session.token"]) == (
        "KEY", "SECRET", "TOKEN")
    assert (options["fs.s3a.endpoint"], options["fs.s3a.path.style.access"],
            options["fs.s3a.connection.ssl.enabled"], options["fs.s3a.endpoint.region"]) == (
        "http://127.0.0.1:9000", "true", "false", "us-west-2")
    assert options["fs.s3a.committer.name"] == "magic"
    default_chain = etl.s3a_options(etl.Settings("s3a://raw", "s3a://lake"))
    assert not any(key.startswith(("fs.s3a.access", "fs.s3a.secret", "fs.s3a.aws.credentials"))
                   for key in default_chain)
