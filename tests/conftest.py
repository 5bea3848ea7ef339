pytest_plugins = [
    "tests.fixtures.triton",
    "tests.fixtures.registry",
    "tests.fixtures.otlp",
    "tests.fixtures.preprocessing",
    "tests.fixtures.fake_kube",
    "tests.fixtures.mesh",
    "tests.fixtures.fake_router",
    "tests.fixtures.tenants",
]


def pytest_ignore_collect(collection_path, config):
    """tests/cluster (the chart's pods under podman, `make cluster-test`) only with `-m cluster`."""
    if collection_path.name == "cluster" and collection_path.parent.name == "tests":
        return "cluster" not in (config.option.markexpr or "")
    return None
