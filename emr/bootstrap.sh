#!/bin/bash
# EMR bootstrap action: boto3 for etl.py's S3 preflight check, on every node.
set -euo pipefail
sudo python3 -m pip install --quiet 'boto3>=1.34'
