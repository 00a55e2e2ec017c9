#!/usr/bin/env bash
# Regenerates creditservice/v1/ from proto/ (the one way generated code is made).
# CI runs it and fails if the committed code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f creditservice/v1/*_pb2*.py creditservice/v1/*_pb2*.pyi
python -m grpc_tools.protoc -Iproto \
  --python_out=. --grpc_python_out=. \
  --mypy_out=. --mypy_grpc_out=. \
  proto/creditservice/v1/*.proto
