"""A bucket on the local S3 protocol server: credentials, client, upload, listing."""

from __future__ import annotations

from pathlib import Path

import boto3

KEY_ID, SECRET = "AKIDTESTSPARKIFY", "s3cr3t-that-must-never-be-printed"
REGION = "eu-west-1"


def s3_environment(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                        aws_secret_access_key=SECRET)


def upload(s3, root: Path, bucket: str, prefix: str) -> int:
    files = [path for path in root.rglob("*.json")]
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")
    return len(files)


def all_keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]
