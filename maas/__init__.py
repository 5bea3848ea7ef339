"""MaaS Mesh client package: the Python client, the `maas` CLI, the local runtime and the generated API (maas.v1)."""
