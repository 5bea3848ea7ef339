pytest_plugins = [
    "tests.fixtures.triton",
    "tests.fixtures.registry",
    "tests.fixtures.otlp",
    "tests.fixtures.preprocessing",
    "tests.fixtures.fake_kube",
    "tests.fixtures.mesh",
    "tests.fixtures.fake_router",
]
