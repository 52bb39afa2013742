"""S3 through boto3: the client every process makes, and S3 errors as one paragraph."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .errors import EtlError

log = logging.getLogger("sparkify.etl")


def is_s3(root: str) -> bool:
    return root.startswith(("s3a://", "s3://"))


def bucket_and_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass(frozen=True)
class S3Access:
    """What a task needs to make its own S3 client: picklable, secrets kept out of repr."""

    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def client(self, connections: int = 10):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            region_name=self.region or "us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=connections,
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            ),
        )


def explain_s3_error(error: Exception, action: str, access: S3Access) -> EtlError:
    """One paragraph saying what went wrong talking to S3 and how to fix it."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = access.endpoint_url or "AWS S3"
    if isinstance(error, NoCredentialsError):
        return EtlError(
            f"No AWS credentials were found to {action}. Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or [AWS] in dl.cfg), or run where an instance profile provides them."
        )
    if isinstance(error, EndpointConnectionError) or not isinstance(error, ClientError):
        return EtlError(
            f"Cannot reach {where} to {action} ({type(error).__name__}). Check the network "
            "and AWS_ENDPOINT_URL_S3 / [AWS] AWS_ENDPOINT_URL_S3."
        )
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "InvalidAccessKeyId":
        return EtlError(
            f"{where} does not know the AWS access key in use, so it cannot {action}. "
            "Check AWS_ACCESS_KEY_ID (environment or dl.cfg [AWS])."
        )
    if code == "SignatureDoesNotMatch":
        return EtlError(
            f"The AWS secret key does not match the access key, so {where} refused to {action}. "
            "Check AWS_SECRET_ACCESS_KEY (environment or dl.cfg [AWS])."
        )
    if code in ("ExpiredToken", "TokenRefreshRequired"):
        return EtlError(
            f"The AWS session token has expired, so {where} refused to {action}. "
            "Get fresh temporary credentials and set AWS_SESSION_TOKEN again."
        )
    if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
        return EtlError(
            f"The bucket does not exist: cannot {action}. Check the bucket name in --input/--output "
            "(or [ETL] in dl.cfg) and the region."
        )
    if code in ("AccessDenied", "403", "Forbidden") or status == 403:
        return EtlError(
            f"Access denied: the AWS credentials in use may not {action}. Grant them s3:ListBucket, "
            "s3:GetObject, s3:PutObject and s3:DeleteObject on the buckets, or use other credentials."
        )
    return EtlError(f"{where} refused to {action}: {code or status}. Check the bucket, the credentials and the region.")


def create_bucket(client, bucket: str, access: S3Access) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    region = access.region or "us-east-1"
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **location)
    except (BotoCoreError, ClientError) as error:
        raise explain_s3_error(error, f"create the output bucket {bucket} in {region}", access) from None
    log.warning("created the output bucket %s in %s", bucket, region)


# =============================================================================
