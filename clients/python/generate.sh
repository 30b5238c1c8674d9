#!/usr/bin/env bash
# Regenerates the protobuf/gRPC stubs under src/lakewriter_client/_proto from
# ../../proto (the server's own .proto files).
#
#   PYTHON=/path/to/python ./generate.sh     # that python needs grpcio-tools
#
# The generated modules check at import time that the installed protobuf and
# grpcio runtimes are at least the versions that generated them: after
# regenerating with a newer grpcio-tools, raise the floors of `protobuf` and
# `grpcio` in pyproject.toml to the versions printed at the end.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto="$(cd "$here/../../proto" && pwd)"
out="$here/src/lakewriter_client/_proto"
python="${PYTHON:-python3}"

rm -rf "$out/storage"
mkdir -p "$out/storage"
"$python" -m grpc_tools.protoc -I "$proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  storage/common.proto storage/ingestion.proto

# common.proto has no services: its (empty) gRPC module is not needed.
rm -f "$out/storage/common_pb2_grpc.py"

# protoc writes absolute imports of the proto package (`from storage import …`);
# make them relative so that no top-level `storage` package is needed.
sed -i -E 's/^from storage import /from . import /' "$out"/storage/*.py "$out"/storage/*.pyi
# …and register the message classes under their real module path.
sed -i -E "s/'storage\.([a-z_]+_pb2)'/'lakewriter_client._proto.storage.\1'/" "$out"/storage/*_pb2.py

cat > "$out/storage/__init__.py" <<'PY'
"""Generated from proto/storage/*.proto by clients/python/generate.sh; do not edit."""
PY
[ -f "$out/__init__.py" ] || echo '"""Generated protobuf/gRPC stubs (see clients/python/generate.sh)."""' > "$out/__init__.py"

echo "generated with: $("$python" -m grpc_tools.protoc --version)," \
     "grpcio-tools $("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')"
