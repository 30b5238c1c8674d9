"""Generated from proto/storage/*.proto by clients/python/generate.sh; do not edit."""
